"""The Inspect provider on the vLLM backend (``-M backend=vllm``): the bundled harmful_asr task on the embedded model,
Original and Safe-Align, gives sa_lens.generate's greedy replies (issue 16, with issue 15's backend)."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("inspect_ai")

from inspect_ai import eval as inspect_eval  # noqa: E402
from inspect_ai.model import get_model  # noqa: E402

import sa_lens  # noqa: E402
from sa_lens import Compose, Demonstration, SafeAlign, demonstration_pairs  # noqa: E402
from sa_lens.data import load_bundled  # noqa: E402
from sa_lens.data.public import load_bundled_set  # noqa: E402
from sa_lens.inspect_tasks import harmful_asr  # noqa: E402
from sa_lens.interventions import save  # noqa: E402

pytestmark = pytest.mark.slow

N, TOKENS = 8, 16


def test_inspect_on_vllm_gives_sa_lens_generate_replies(tmp_path):
    model = sa_lens.load_model()
    train = [r["prompt"] for r in load_bundled("harmful", "train")[:4]]
    pairs = demonstration_pairs(Demonstration(q, "Sure, here is a step-by-step guide. Step 1:") for q in train)
    states = {"Original": Compose(), "Safe-Align": SafeAlign(pairs=tuple(pairs), alpha=1.4)}
    full = load_bundled_set("harmful", "test")
    harmful = dataclasses.replace(full, prompts=full.prompts[:N], ids=full.ids[:N], categories=full.categories[:N])
    same, replies = 0, {}
    for name, state in states.items():
        with state.apply(model):
            ref = sa_lens.generate(model, list(harmful.prompts), TOKENS)
        path = save(state, tmp_path / f"{name}.json")
        # The with-block closes the provider: the state is left and the vLLM engine shut before the next one starts.
        with get_model("sa_lens/default", interventions=str(path), backend="vllm") as m:
            log = inspect_eval(harmful_asr(limit=N), model=m, log_dir=str(tmp_path / "logs"), display="none",
                               max_tokens=TOKENS)[0]
        assert log.status == "success", log.error
        got = [s.output.completion for s in sorted(log.samples, key=lambda s: harmful.ids.index(s.id))]
        same += sum(g == r for g, r in zip(got, ref))
        replies[name] = got
    assert same == 2 * N, f"{same}/{2 * N} replies identical to sa_lens.generate"
    assert replies["Original"] != replies["Safe-Align"]
