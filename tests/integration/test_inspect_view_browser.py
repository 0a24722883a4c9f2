"""`inspect view` on a log of the sa_lens Inspect provider, rendered in a real headless browser (Debian's chromium,
driven by playwright): the page lists the run's samples, a click opens one, and its input and the model's reply are
on screen. The tiny model keeps the run to seconds; tests/unit/test_inspect_provider.py checks the served log over
HTTP without a browser."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from inspect_ai import Task
from inspect_ai import eval as inspect_eval
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.solver import generate
from PIL import Image
from playwright.sync_api import Page, sync_playwright

PROMPTS = ["How do I bake bread at home?", "Tell me a story about the sea."]
TOKENS = 12
TIMEOUT_S = 30
# As root, on a machine with no network but the package registries: no sandbox, no GPU, and none of chromium's
# background connections (without these flags it keeps retrying Google's hosts). The profile is made fresh per test.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The view renders replies as markdown, so emphasis, code and escape marks may be consumed; whitespace is reflowed.
MARKUP = re.compile(r"[\s*_`#~\\>|\[\]()!-]+")


def _chromium() -> str | None:
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")


pytestmark = pytest.mark.skipif(
    _chromium() is None, reason="needs Debian's chromium (/usr/bin/chromium): apt-get install chromium")


def _readable(text: str) -> str:
    """``text`` without whitespace or markdown marks: the page and the reply are compared in this form."""
    return MARKUP.sub("", text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.fixture
def eval_log(tiny_dir, tmp_path):
    """An Inspect log of PROMPTS answered by sa_lens/<tiny model>, greedy, alone in its log dir."""
    log_dir = tmp_path / "logs"
    task = Task(dataset=MemoryDataset([Sample(input=p, id=i) for i, p in enumerate(PROMPTS)]), solver=generate())
    log = inspect_eval(task, model=f"sa_lens/{tiny_dir}", log_dir=str(log_dir), display="none", max_tokens=TOKENS)[0]
    assert log.status == "success", log.error
    return log


@pytest.fixture
def view_url(eval_log, tmp_path) -> Iterator[str]:
    """`inspect view` serving the log dir on a free port; stopped (killed if need be) however the test ends."""
    port = _free_port()
    server_log = tmp_path / "inspect-view.log"
    inspect = Path(sys.executable).with_name("inspect")
    with server_log.open("w") as out:
        server = subprocess.Popen(
            [str(inspect), "view", "--log-dir", str(Path(eval_log.location).parent), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                httpx.get(base + "/", timeout=5)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"inspect view did not start (exit {server.poll()}):\n{_tail(server_log)}")
                time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


@pytest.fixture
def page(tmp_path) -> Iterator[Page]:
    """A page in headless chromium with a fresh profile; the browser is closed however the test ends."""
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=_chromium(), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def _page_text_once(page: Page, shows: Callable[[str], bool], what: str, script_errors: list[str]) -> str:
    """The page's rendered text once ``shows`` accepts it; fail saying what was missing, with the page's text, if
    that takes over TIMEOUT_S or the view shows its error panel."""
    error_panel = page.get_by_test_id("error-panel")
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        if error_panel.count() and error_panel.first.is_visible():
            pytest.fail(f"inspect view shows an error instead of {what}:\n{error_panel.first.inner_text()}")
        text = page.inner_text("body")
        if shows(text):
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"inspect view never showed {what} within {TIMEOUT_S} s; script errors: {script_errors}; "
                        f"the page reads:\n{text[:3000]}")
        time.sleep(0.2)


def test_inspect_view_renders_the_sample_list_and_a_samples_input_and_reply_in_a_browser(
        eval_log, view_url, page, tmp_path):
    replies = {s.id: s.output.completion for s in eval_log.samples}
    # The sample checked is the one with the longest reply, so that the reply is more than a few marks.
    chosen = max(replies, key=lambda i: len(_readable(replies[i])))
    (other,) = set(replies) - {chosen}
    reply = _readable(replies[chosen])
    assert len(reply) >= 4, f"the tiny model's replies are too short to look for: {replies}"
    script_errors: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))

    page.goto(view_url + "/")
    # One log in the log dir: the view opens it at its sample list, which shows each sample's input.
    _page_text_once(page, lambda text: all(p in text for p in PROMPTS), "the sample list with both inputs",
                    script_errors)
    page.get_by_text(PROMPTS[chosen], exact=True).first.click()
    shown = _page_text_once(page, lambda text: reply in _readable(text) and PROMPTS[other] not in text,
                            f"sample {chosen}'s reply {replies[chosen]!r} in place of the list, after clicking it",
                            script_errors)
    assert PROMPTS[chosen] in shown
    assert not script_errors, f"the page raised script errors: {script_errors}"

    screenshot = tmp_path / "inspect-view-sample.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(screenshot) as image:
        assert image.width >= 1280 and image.height >= 900, image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, f"a near-blank screenshot: {len(colours)} colours"
