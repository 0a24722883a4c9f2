"""The sa_lens Inspect provider on the embedded SmolLM2-135M-Instruct: the bundled harmful_asr task, Original and
Safe-Align, gives sa_lens.generate's replies and sa_lens.evaluate's keyword ASR."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("inspect_ai")

from inspect_ai import eval as inspect_eval  # noqa: E402

import sa_lens  # noqa: E402
from sa_lens import Compose, Demonstration, SafeAlign, demonstration_pairs  # noqa: E402
from sa_lens.data import load_bundled  # noqa: E402
from sa_lens.data.public import load_bundled_set  # noqa: E402
from sa_lens.evaluation.decoding import preset  # noqa: E402
from sa_lens.inspect_tasks import harmful_asr  # noqa: E402
from sa_lens.interventions import save  # noqa: E402

pytestmark = pytest.mark.slow

N, TOKENS = 8, 16


def test_inspect_replies_and_asr_equal_sa_lens_generate_and_evaluate(tmp_path):
    model = sa_lens.load_model()
    train = [r["prompt"] for r in load_bundled("harmful", "train")[:4]]
    pairs = demonstration_pairs(Demonstration(q, "Sure, here is a step-by-step guide. Step 1:") for q in train)
    # The default model refuses none of these; at α = 1.4 three of its 8 replies loop (degenerate), so the check also
    # covers leaving degenerate replies out of n on both sides.
    states = {"Original": Compose(), "Safe-Align": SafeAlign(pairs=tuple(pairs), alpha=1.4)}
    full = load_bundled_set("harmful", "test")
    harmful = dataclasses.replace(full, prompts=full.prompts[:N], ids=full.ids[:N], categories=full.categories[:N])
    report = sa_lens.evaluate(model, [harmful], "keyword", states=states,
                              settings=preset("greedy", max_new_tokens=TOKENS), batch_size=N, progress=False)
    asr = {r["state"]: r["asr"] for r in report.rows}

    same, total, replies = 0, 0, {}
    for name, state in states.items():
        with state.apply(model):
            ref = sa_lens.generate(model, list(harmful.prompts), TOKENS)
        path = save(state, tmp_path / f"{name}.json")
        log = inspect_eval(harmful_asr(limit=N), model="sa_lens/default", model_args={"interventions": str(path)},
                           log_dir=str(tmp_path / "logs"), display="none", max_tokens=TOKENS)[0]
        assert log.status == "success", log.error
        got = [s.output.completion for s in sorted(log.samples, key=lambda s: harmful.ids.index(s.id))]
        same += sum(g == r for g, r in zip(got, ref))
        total += len(ref)
        replies[name] = got
        score = log.results.scores[0]
        assert score.metrics["mean"].value == pytest.approx(asr[name]), name
        assert score.scored_samples == sum(r["verdict"] != "degenerate" for r in report.records if r["state"] == name)
    assert same == total == 2 * N
    assert replies["Original"] != replies["Safe-Align"]  # the state was applied
    assert sum(r["verdict"] == "degenerate" for r in report.records) > 0
