"""Judges by name: ``keyword`` (default), ``llm``, ``llama-guard``, ``harmbench-classifier``.

Every judge has ``name`` and ``judge_batch(prompts, responses) -> list[Verdict]``; the heavy ones are
imported only when asked for, so the keyword path needs neither the openai client nor a classifier download.
"""

from __future__ import annotations

from typing import Any, Protocol

from sa_lens.errors import InputError, SaLensError
from sa_lens.evaluation.judges import KeywordJudge, Verdict

__all__ = ["JUDGES", "Judge", "JudgeUnavailableError", "get_judge"]

JUDGES: tuple[str, ...] = ("keyword", "llm", "llama-guard", "harmbench-classifier")


class JudgeUnavailableError(SaLensError, RuntimeError):
    """A judge cannot be used at all (endpoint unreachable after retries, or it rejects the request)."""


class Judge(Protocol):
    """What the evaluation runner needs of a harm judge."""

    name: str

    def judge_batch(self, prompts: list[str], responses: list[str]) -> list[Verdict]: ...


def get_judge(judge: str | Judge, **options: Any) -> Judge:
    """A judge from its name (options go to its constructor), or the judge object itself.

    Raises:
        ValueError: an unknown name.
    """
    if not isinstance(judge, str):
        return judge
    if judge == "keyword":
        return KeywordJudge(**options)
    if judge == "llm":
        from sa_lens.evaluation.llm_judge import LLMJudge

        return LLMJudge(**options)
    if judge == "llama-guard":
        from sa_lens.evaluation.classifier_judges import LlamaGuardJudge

        return LlamaGuardJudge(**options)
    if judge == "harmbench-classifier":
        from sa_lens.evaluation.classifier_judges import HarmBenchClassifierJudge

        return HarmBenchClassifierJudge(**options)
    raise InputError(f"unknown judge {judge!r}; choose one of {', '.join(JUDGES)} or pass a judge object.")
