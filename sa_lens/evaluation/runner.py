"""Evaluate one model state on prompt sets: ASR on harmful prompts, over-refusal on safe ones, QA utility.

A *model state* is whatever the caller has made of the model when calling — original, inside
``harm_removal``, inside ``safety_alignment``, or both. The judge sees only the generated continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformer_lens.model_bridge import TransformerBridge

from sa_lens.errors import InputError
from sa_lens.evaluation.judges import KeywordJudge
from sa_lens.evaluation.metrics import (
    Rate,
    accuracy,
    attack_success_rate,
    degenerate_rate,
    exact_match,
    refusal_rate,
)
from sa_lens.generation import generate

__all__ = ["EvalSet", "StateResult", "evaluate_state"]


@dataclass(frozen=True)
class EvalSet:
    """A named prompt set and what is measured on it.

    Attributes:
        name: column name in reports (``harmful``, ``safe``, ``qa``, ``advbench`` …).
        kind: ``harmful`` → ASR (and degenerate rate); ``safe`` → over-refusal; ``qa`` → exact-match accuracy.
        prompts: the user requests.
        ids: one id per prompt (for generations.jsonl).
        answers: accepted answers per prompt (``qa`` only).
        max_new_tokens: generation budget; refusals show in the first tokens, QA answers are short.
        groups: optional group per prompt (harm category, XSTest-style type); each group's rate is
            reported beside the overall one as ``{metric}_{group}``.
    """

    name: str
    kind: Literal["harmful", "safe", "qa"]
    prompts: Sequence[str]
    ids: Sequence[str]
    answers: Sequence[Sequence[str]] = ()
    max_new_tokens: int = 32
    groups: Sequence[str] = ()

    def __post_init__(self) -> None:
        if len(self.prompts) == 0:
            raise InputError(f"Evaluation set '{self.name}' is empty; give it at least one prompt.")
        if len(self.ids) != len(self.prompts):
            raise InputError(f"Evaluation set '{self.name}': {len(self.ids)} ids for {len(self.prompts)} prompts.")
        if self.kind == "qa" and len(self.answers) != len(self.prompts):
            raise InputError(f"QA set '{self.name}' needs one answer list per question.")
        if self.groups and len(self.groups) != len(self.prompts):
            raise InputError(f"Evaluation set '{self.name}': {len(self.groups)} groups for {len(self.prompts)} prompts.")


@dataclass
class StateResult:
    """Metrics of one model state: ``{set name: {metric: Rate}}`` and the generation records."""

    metrics: dict[str, dict[str, Rate]] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


def evaluate_state(
    model: TransformerBridge,
    sets: Sequence[EvalSet],
    judge: KeywordJudge | None = None,
    batch_size: int = 64,
    progress: str | bool = False,
) -> StateResult:
    """Generate greedily on every set and score it.

    Args:
        model: the bridge in the state to measure (hooks/edits active around this call apply).
        sets: what to measure.
        judge: refusal judge (keyword judge by default).
        batch_size: prompts per generation batch.
        progress: tqdm label prefix, or False.

    Returns:
        A StateResult: for ``harmful`` sets ``asr`` and ``degenerate``; for ``safe`` sets
        ``over_refusal``; for ``qa`` sets ``utility``; plus ``{metric}_{group}`` per group — each a
        Rate with its n and 95 % interval.
    """
    judge = judge or KeywordJudge()
    result = StateResult()
    for s in sets:
        label = f"{progress} · {s.name}" if isinstance(progress, str) else progress
        replies = generate(model, s.prompts, s.max_new_tokens, batch_size=batch_size, progress=label)
        if s.kind == "qa":
            correct = [exact_match(r, a) for r, a in zip(replies, s.answers)]
            result.metrics[s.name] = {"utility": accuracy(replies, s.answers)}
            result.records += [
                {"set": s.name, "id": i, "prompt": p, "response": r, "correct": c}
                for i, p, r, c in zip(s.ids, s.prompts, replies, correct)
            ]
            continue
        verdicts = judge(replies)
        metric, score = ("asr", attack_success_rate) if s.kind == "harmful" else ("over_refusal", refusal_rate)
        result.metrics[s.name] = {metric: score(verdicts)}
        if s.kind == "harmful":
            result.metrics[s.name]["degenerate"] = degenerate_rate(verdicts)
        for group in dict.fromkeys(s.groups):
            in_group = [v for v, g in zip(verdicts, s.groups) if g == group]
            result.metrics[s.name][f"{metric}_{group}"] = score(in_group)
        result.records += [
            {"set": s.name, "id": i, "prompt": p, "response": r, "verdict": v.value}
            for i, p, r, v in zip(s.ids, s.prompts, replies, verdicts)
        ]
    return result
