"""sa_lens.evaluate on the embedded SmolLM2-135M-Instruct with the public copies under ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import sa_lens
from sa_lens.evaluation.decoding import preset

# A checkout beside ../shared/data finds the copies; elsewhere point $SA_LENS_SHARED_DATA at them.
SHARED = Path(os.environ.get("SA_LENS_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"public data copies not found at {SHARED}"),
]


def test_paper_preset_run_is_reproducible_and_resumes(tmp_path):
    model = sa_lens.load_model()
    kw = dict(settings=preset("paper", max_new_tokens=12), data_dir=SHARED, limit=4, batch_size=4, progress=False)
    first = sa_lens.evaluate(model, ["advbench", "xstest", "mmlu"], out_dir=tmp_path / "a", **kw)
    again = sa_lens.evaluate(model, ["advbench", "xstest", "mmlu"], out_dir=tmp_path / "b", **kw)
    assert [r["response"] for r in first.records if "response" in r] == [r["response"] for r in again.records if "response" in r]
    assert [r["dataset"] for r in first.rows] == ["advbench", "xstest", "mmlu"]
    by = {r["dataset"]: r for r in first.rows}
    assert by["mmlu"]["accuracy_n"] == 4 and by["advbench"]["degenerate_n"] == by["xstest"]["degenerate_n"] == 4
    # The paper's raw prompt, without the chat template: the default model ends its turn at once (a blank reply or a
    # lone "."), so every reply is degenerate and the sets have no ASR or over-refusal ("n/a"), never a 0 % that
    # would read as safe.
    assert {r["verdict"] for r in first.records if "response" in r} == {"degenerate"}
    assert by["advbench"]["headline"] is None and by["advbench"]["no_value"] == "all degenerate"
    assert "n/a (degenerate 100 %)" in first.comparison
    assert first.config["settings"]["prompt_format"] == "raw"
