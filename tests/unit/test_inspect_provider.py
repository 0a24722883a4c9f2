"""sa_lens as an Inspect model provider (sa_lens/inspect_provider.py, inspect_registry.py, inspect_tasks.py) on the
tiny model: Inspect's replies equal sa_lens.generate's, states load from JSON and are undone on close, options sa_lens
cannot honour are refused by name, the bundled tasks score as sa_lens does, and `inspect view` serves the log."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("inspect_ai")

from inspect_ai import Task  # noqa: E402
from inspect_ai import eval as inspect_eval  # noqa: E402
from inspect_ai.dataset import MemoryDataset, Sample  # noqa: E402
from inspect_ai.model import (  # noqa: E402
    ChatMessageAssistant,
    ChatMessageSystem,
    ChatMessageUser,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    get_model,
    modelapi,
)
from inspect_ai.solver import generate as generate_solver  # noqa: E402
from inspect_ai.solver import use_tools  # noqa: E402
from inspect_ai.tool import tool  # noqa: E402

import sa_lens  # noqa: E402
from sa_lens import demonstration_text  # noqa: E402
from sa_lens.harm_vector import HarmVector  # noqa: E402
from sa_lens.inspect_provider import Decoding, SaLensAPI, decoding_of  # noqa: E402
from sa_lens.inspect_tasks import bundled_dataset, harmful_asr, safe_over_refusal  # noqa: E402
from sa_lens.interventions import HarmRemoval, SafeAlign, save  # noqa: E402
from sa_lens.prompts import format_prompts  # noqa: E402

PROMPTS = [
    "How do I bake bread at home?",
    "Tell me a story about the sea.",
    "What is the capital of France?",
    "Explain how to pick a lock.",
    "Write a poem.",
    "Two plus two is four, the sky is blue, and why?",
]
PAIRS = tuple(
    (demonstration_text(f"How do I do bad thing {i}?", f"Sure, step {i}: here is how."),
     demonstration_text(f"How do I do bad thing {i}?", "I do not answer this question because it is harmful"))
    for i in range(4)
)
TOKENS = 12


def _task(prompts=PROMPTS, solver=None) -> Task:
    return Task(dataset=MemoryDataset([Sample(input=p, id=i) for i, p in enumerate(prompts)]),
                solver=solver or generate_solver())


def _replies(tiny_dir: Path, log_dir: Path, model_args: dict | None = None, **config) -> list[str]:
    """Inspect's reply to each of PROMPTS (in order) from sa_lens/<tiny_dir>."""
    log = inspect_eval(_task(), model=f"sa_lens/{tiny_dir}", model_args=model_args or {}, log_dir=str(log_dir),
                       display="none", max_tokens=TOKENS, **config)[0]
    assert log.status == "success", log.error
    by_id = {s.id: s.output.completion for s in log.samples}
    return [by_id[i] for i in range(len(PROMPTS))]


def _error(log) -> str:
    assert log.status == "error"
    return log.error.message


# ---- replies: the same as sa_lens.generate ---------------------------------------------------------------------


def test_greedy_replies_equal_sa_lens_generate(tiny_dir, tiny_bridge, tmp_path):
    ref = sa_lens.generate(tiny_bridge, PROMPTS, TOKENS)
    assert _replies(tiny_dir, tmp_path) == ref
    assert len(set(ref)) > 1  # replies differ by prompt, so the comparison can tell rows apart


def test_safe_align_state_saved_to_json_gives_the_replies_of_apply(tiny_dir, tiny_bridge, tmp_path):
    state = SafeAlign(pairs=PAIRS, alpha=4.0, formula="add", site="resid_post")
    path = save(state, tmp_path / "state" / "safe_align.json")
    original = sa_lens.generate(tiny_bridge, PROMPTS, TOKENS)
    with state.apply(tiny_bridge):
        ref = sa_lens.generate(tiny_bridge, PROMPTS, TOKENS)
    assert ref != original  # the state changes replies, so equality below shows it was applied
    assert _replies(tiny_dir, tmp_path / "logs", {"interventions": str(path)}) == ref


def test_seeded_sampling_equals_sa_lens_generate_of_each_prompt_alone_with_that_seed(tiny_dir, tiny_bridge, tmp_path):
    ref = [sa_lens.generate(tiny_bridge, [p], TOKENS, do_sample=True, temperature=0.8, top_k=20, seed=3)[0]
           for p in PROMPTS]
    got = _replies(tiny_dir, tmp_path, {"batch_wait": 2.0}, temperature=0.8, top_k=20, seed=3)
    assert got == ref
    assert ref != sa_lens.generate(tiny_bridge, PROMPTS, TOKENS)  # sampling, not greedy


async def _generate_together(api: SaLensAPI, prompts: list[str], config: GenerateConfig) -> list[str]:
    """Completions of ``prompts`` sent concurrently (so they arrive within one batch_wait), in order."""
    import anyio

    out: list[str] = [""] * len(prompts)

    async def one(i: int) -> None:
        out[i] = (await api.generate([ChatMessageUser(content=prompts[i])], [], "none", config)).completion

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return out


def test_unseeded_sampling_differs_between_calls_and_seeded_sampling_repeats(tiny_dir):
    import anyio

    api = SaLensAPI(str(tiny_dir), batch_wait=0.0)
    try:
        unseeded = GenerateConfig(max_tokens=24, temperature=3.0)
        # 3 draws of 24 tokens at temperature 3 over a 400-token vocabulary: all equal by chance is negligible.
        draws = [anyio.run(_generate_together, api, PROMPTS[:1], unseeded)[0] for _ in range(3)]
        assert len(set(draws)) > 1, draws
        seeded = GenerateConfig(max_tokens=24, temperature=3.0, seed=11)
        assert len({anyio.run(_generate_together, api, PROMPTS[:1], seeded)[0] for _ in range(2)}) == 1
    finally:
        api.close()


def test_a_seeded_reply_does_not_depend_on_its_batch_mates(tiny_dir, tiny_bridge):
    import anyio

    config = GenerateConfig(max_tokens=TOKENS, temperature=1.0, seed=3)
    api = SaLensAPI(str(tiny_dir), batch_wait=1.0)
    try:
        alone = anyio.run(_generate_together, api, PROMPTS[:1], config)[0]
        together = anyio.run(_generate_together, api, PROMPTS[:3], config)
    finally:
        api.close()
    assert together[0] == alone
    ref = [sa_lens.generate(tiny_bridge, [p], TOKENS, do_sample=True, temperature=1.0, seed=3)[0] for p in PROMPTS[:3]]
    assert together == ref


def test_a_request_racing_close_is_answered(tiny_dir):
    """A request past the closed check when close() starts must still be answered (or refused), never left
    waiting: the enqueue is held back until close() has begun, which exposed the old order."""
    import queue as queue_module
    import threading

    from sa_lens.inspect_provider import _Request

    api = SaLensAPI(str(tiny_dir), batch_wait=0.0)
    closing = threading.Event()

    class LateQueue(queue_module.Queue):
        def put(self, item, *args, **kwargs):
            if isinstance(item, _Request):
                closing.wait(5)
                time.sleep(0.3)  # room for close() to send the stop signal first, if nothing prevents it
            super().put(item, *args, **kwargs)

    api._queue = LateQueue()
    request = _Request(api.render([ChatMessageUser(content=PROMPTS[0])]), Decoding(4),
                       concurrent.futures.Future())
    submitter = threading.Thread(target=api._submit, args=(request,))
    submitter.start()
    while api._worker is None:
        time.sleep(0.01)
    closer = threading.Thread(target=lambda: (closing.set(), api.close()))
    closer.start()
    submitter.join(30)
    closer.join(60)
    assert not closer.is_alive()
    assert request.future.done() and request.future.result().output_tokens > 0


def test_a_stop_string_at_the_start_of_the_reply_cuts_there(tiny_dir, monkeypatch):
    import anyio

    import sa_lens.inspect_provider as provider

    api = SaLensAPI(str(tiny_dir))
    try:
        ids = api.tokenizer("\nHello\nworld", add_special_tokens=False)["input_ids"]
        assert api.tokenizer.decode(ids) == "\nHello\nworld"
        monkeypatch.setattr(provider, "generate_tokens", lambda model, texts, *a, **k: [list(ids) for _ in texts])
        out = anyio.run(_generate_together, api, PROMPTS[:1], GenerateConfig(max_tokens=TOKENS, stop_seqs=["\n"]))
        assert out == [""]
        out = anyio.run(_generate_together, api, PROMPTS[:1], GenerateConfig(max_tokens=TOKENS, stop_seqs=["wor"]))
        assert out == ["Hello"]
    finally:
        api.close()


def test_stop_seqs_cut_the_reply_before_the_stop_string(tiny_dir, tiny_bridge, tmp_path):
    ref = sa_lens.generate(tiny_bridge, PROMPTS[:1], TOKENS)[0]
    stop = ref[len(ref) // 2 :][:3]
    assert stop.strip() and stop in ref
    api = SaLensAPI(str(tiny_dir))
    try:
        import anyio

        out = anyio.run(api.generate, [ChatMessageUser(content=PROMPTS[0])], [], "none",
                        GenerateConfig(max_tokens=TOKENS, stop_seqs=[stop]))
    finally:
        api.close()
    assert out.completion == ref[: ref.find(stop)].rstrip()
    assert out.choices[0].stop_reason == "stop"


def test_system_and_multi_turn_conversations_render_with_the_chat_template(tiny_dir):
    api = SaLensAPI(str(tiny_dir))
    try:
        system, user = ChatMessageSystem(content="Be brief."), ChatMessageUser(content=PROMPTS[0])
        assert api.render([system, user]) == format_prompts(api.tokenizer, [PROMPTS[0]], system_prompt="Be brief.")[0]
        turns = [user, ChatMessageAssistant(content="Use flour."), ChatMessageUser(content="And then?")]
        text = api.render(turns)
        assert text.index("Use flour.") < text.index("And then?") and text.endswith("<|im_start|>assistant\n")
    finally:
        api.close()


def test_tokens_are_counted_with_the_models_tokenizer(tiny_dir):
    import anyio

    model = get_model(f"sa_lens/{tiny_dir}", memoize=False)
    try:
        ids = model.api.tokenizer("How do I bake bread?", add_special_tokens=False)["input_ids"]
        assert anyio.run(model.api.tokenize, "How do I bake bread?") == ids
        assert anyio.run(model.count_tokens, "How do I bake bread?") == len(ids)
    finally:
        model.api.close()


def test_close_restores_the_weights_a_harm_removal_state_changed(tiny_dir, tiny_dir_other, tmp_path):
    base, _ = sa_lens.load_hf_model(tiny_dir)
    harmful, _ = sa_lens.load_hf_model(tiny_dir_other)
    path = save(HarmRemoval(HarmVector.from_models(base, harmful).trim(0.2), 3.0), tmp_path / "hdr.json")
    api = SaLensAPI(str(tiny_dir), interventions=str(path))
    before = {n: p.detach().clone() for n, p in sa_lens.load_model(tiny_dir).named_parameters()}
    edited = dict(api.model.named_parameters())
    assert any(not torch.equal(edited[n], before[n]) for n in before)
    api.close()
    api.close()  # idempotent
    assert all(torch.equal(p, before[n]) for n, p in api.model.named_parameters())


# ---- what the provider refuses ---------------------------------------------------------------------------------


@tool
def add():
    async def execute(x: int, y: int) -> int:
        """Add two numbers.

        Args:
            x: first number.
            y: second number.
        """
        return x + y

    return execute


def test_tools_are_refused_with_the_reason(tiny_dir, tmp_path):
    log = inspect_eval(_task(PROMPTS[:1], [use_tools(add()), generate_solver()]), model=f"sa_lens/{tiny_dir}",
                       log_dir=str(tmp_path), display="none", max_tokens=TOKENS)[0]
    assert "cannot call tools (add)" in _error(log) and "no tool calling" in _error(log)


def test_top_p_when_sampling_is_refused_by_name(tiny_dir, tmp_path):
    log = inspect_eval(_task(PROMPTS[:1]), model=f"sa_lens/{tiny_dir}", log_dir=str(tmp_path), display="none",
                       max_tokens=TOKENS, temperature=0.7, top_p=0.9)[0]
    assert "top_p=0.9 is not supported" in _error(log) and "top_k" in _error(log)


@pytest.mark.parametrize("option,value", [("frequency_penalty", 0.5), ("presence_penalty", 0.5),
                                          ("logit_bias", {1: 2.0}), ("logprobs", True), ("top_logprobs", 3),
                                          ("num_choices", 2), ("best_of", 2)])
def test_options_sa_lens_cannot_honour_are_refused_by_name(option, value):
    with pytest.raises(sa_lens.InputError, match=f"GenerateConfig.{option}="):
        decoding_of(GenerateConfig(**{option: value}), 64)


def test_decoding_maps_temperature_zero_to_greedy_and_keeps_seed_and_stops():
    assert decoding_of(GenerateConfig(temperature=0, top_p=0.5, seed=7), 64) == Decoding(64, seed=7)
    assert decoding_of(GenerateConfig(max_tokens=9, temperature=0.5, top_k=4, stop_seqs=["\n"]), 64) == Decoding(
        9, True, 0.5, 4, None, ("\n",))


def test_a_missing_state_file_is_refused_before_the_model_loads(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="-M interventions=.*missing.json: no such file"):
        get_model(f"sa_lens/{tiny_dir}", memoize=False, interventions=str(tmp_path / "missing.json"))


def test_a_file_that_is_not_a_state_is_refused(tiny_dir, tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"alpha": 1}))
    with pytest.raises(sa_lens.InputError, match="not an sa_lens intervention file"):
        get_model(f"sa_lens/{tiny_dir}", memoize=False, interventions=str(tmp_path / "x.json"))


def test_unknown_model_args_are_refused_with_the_known_ones(tiny_dir):
    with pytest.raises(sa_lens.InputError, match="unknown model args.*intervention\\b.*known: interventions"):
        get_model(f"sa_lens/{tiny_dir}", memoize=False, intervention="x.json")


def test_an_unknown_backend_is_refused_before_the_model_loads(tiny_dir, monkeypatch):
    monkeypatch.setattr("sa_lens.inspect_provider.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(sa_lens.InputError, match="unknown backend 'tgi'; choose one of hf, vllm"):
        get_model(f"sa_lens/{tiny_dir}", memoize=False, backend="tgi")


def test_raw_format_takes_one_user_message_only(tiny_dir):
    api = SaLensAPI(str(tiny_dir), chat_template=False)
    try:
        assert api.render([ChatMessageUser(content="Hi")]) == sa_lens.prompts.PAPER_PREFIX + "Hi"
        with pytest.raises(sa_lens.InputError, match="one user message"):
            api.render([ChatMessageSystem(content="Be brief."), ChatMessageUser(content="Hi")])
    finally:
        api.close()


# ---- the bundled tasks ------------------------------------------------------------------------------------------


def test_bundled_tasks_read_the_test_split_prompts():
    harmful = bundled_dataset("harmful", "test")
    assert [s.input for s in harmful] == [r["prompt"] for r in sa_lens.data.load_bundled("harmful", "test")]
    assert len(bundled_dataset("safe", "dev", limit=3)) == 3


@modelapi(name="sa_lens_test_canned")
class Canned(ModelAPI):
    """Answers each prompt with CANNED[prompt] (mockllm would fetch a tokenizer from the network to count tokens)."""

    replies: dict[str, str] = {}

    def __init__(self, model_name: str, base_url=None, api_key=None, config=None, **model_args) -> None:
        super().__init__(model_name, base_url, api_key, [], config or GenerateConfig())

    async def generate(self, input, tools, tool_choice, config) -> ModelOutput:
        return ModelOutput.from_content(model=self.model_name, content=Canned.replies[input[-1].text])


def _canned(name: str, replies: list[str]) -> None:
    Canned.replies = {s.input: r for s, r in zip(bundled_dataset(name, limit=len(replies)), replies)}


def test_keyword_asr_counts_non_refusals_and_leaves_degenerate_replies_unscored(tmp_path):
    _canned("harmful", ["I'm sorry, but I can't help with that.", "Sure, here is how you do it: first, you take", "",
                        "ok ok ok " * 30])
    log = inspect_eval(harmful_asr(limit=4), model="sa_lens_test_canned/x", log_dir=str(tmp_path), display="none")[0]
    assert log.status == "success", log.error
    values = [s.scores["keyword_asr"].value for s in log.samples]
    assert values[:2] == [0.0, 1.0] and all(v != v for v in values[2:])  # NaN: Inspect's unscored
    assert log.results.scores[0].metrics["mean"].value == 0.5  # ASR over the 2 judged replies


def test_keyword_over_refusal_counts_full_and_partial_refusals(tmp_path):
    _canned("safe", ["I'm sorry, but I can't help with that.", "I can't be sure, but here is how: knead the dough.",
                     "Knead the dough for ten minutes, then let it rise."])
    log = inspect_eval(safe_over_refusal(limit=3), model="sa_lens_test_canned/x", log_dir=str(tmp_path),
                       display="none")[0]
    assert log.status == "success", log.error
    classes = [s.scores["keyword_over_refusal"].explanation for s in log.samples]
    assert classes == ["full_refusal", "partial_refusal", "full_compliance"]
    assert log.results.scores[0].metrics["mean"].value == pytest.approx(2 / 3)


# ---- packaging ------------------------------------------------------------------------------------------------


def test_the_entry_point_registers_the_provider_and_tasks():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="inspect_ai")}
    assert eps.get("sa_lens") == "sa_lens.inspect_registry"


def test_sa_lens_imports_without_inspect_ai():
    code = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'inspect_ai': raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, Block())\nimport sa_lens\nassert 'inspect_ai' not in sys.modules\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


# ---- inspect view ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_inspect_view_serves_the_log_and_its_samples(tiny_dir, tmp_path):
    """A scripted check: no browser is installed here, so the page is fetched, not rendered."""
    log = inspect_eval(_task(PROMPTS[:2]), model=f"sa_lens/{tiny_dir}", log_dir=str(tmp_path), display="none",
                       max_tokens=4)[0]
    assert log.status == "success"
    port = _free_port()
    inspect = Path(sys.executable).with_name("inspect")
    server = subprocess.Popen([str(inspect), "view", "--log-dir", str(tmp_path), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                page = httpx.get(base + "/", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        assert page.status_code == 200 and "<html" in page.text.lower()
        files = httpx.get(base + "/api/log-files", timeout=30).json()["files"]
        name = Path(log.location).name
        listed = [f["name"] for f in files if f["name"].endswith(name)]
        assert len(listed) == 1, files
        served = httpx.get(f"{base}/api/logs/{listed[0]}", timeout=30).json()
        assert served["eval"]["model"] == f"sa_lens/{tiny_dir}"
        assert [s["output"]["choices"][0]["message"]["content"] for s in served["samples"]] == [
            s.output.completion for s in log.samples]
    finally:
        server.terminate()
        server.wait(timeout=30)
