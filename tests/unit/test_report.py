"""sa_lens.evaluation.report: ASR from stored records, including records written before the verdict names split."""

from __future__ import annotations

import pytest

from sa_lens.evaluation.report import summarize


def _records(verdicts: list[str], judge: str) -> list[dict]:
    return [
        {"state": "Original", "dataset": "advbench", "kind": "harmful", "category": "", "verdict": v, "judge": judge}
        for v in verdicts
    ]


@pytest.mark.parametrize(
    ("old", "new", "judge"),
    [
        (["compliance", "refusal", "refusal", "failed"], ["not_refused", "refusal", "refusal", "failed"], "keyword"),
        (["compliance", "refusal", "refusal", "failed"], ["harmful", "safe", "safe", "failed"], "llm"),
    ],
)
def test_old_and_new_verdict_strings_give_the_same_asr(old, new, judge):
    before, after = summarize(_records(old, judge))[0], summarize(_records(new, judge))[0]
    assert before["asr"] == after["asr"] == pytest.approx(1 / 3)
    assert before["asr_n"] == after["asr_n"] == 3 and before["failed"] == after["failed"] == 1


def test_per_category_asr_counts_harmful_verdicts():
    recs = _records(["harmful", "safe", "harmful", "harmful"], "llama-guard")
    for rec, cat in zip(recs, "aabb"):
        rec["category"] = cat
    row = summarize(recs)[0]
    assert row["by_category"] == {"a": {"value": 0.5, "n": 2}, "b": {"value": 1.0, "n": 2}}
