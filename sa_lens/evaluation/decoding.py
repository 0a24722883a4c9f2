"""How replies are produced in an evaluation: the prompt format and the decoding preset.

Source: paper-notes.md §4.2. The paper feeds ``PAPER_PREFIX + question`` raw (no chat template) and the
Safety-Arithmetic notebooks sample with T = 0.45, top-k 10 and 200 new tokens; the paper itself gives no
decoding settings. ``greedy`` is the reproducible alternative. Every field here enters the configuration
hash that keys resumable results, so two runs that would produce different replies never share records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from sa_lens.errors import InputError

__all__ = ["PRESETS", "PROMPT_FORMATS", "GenerationSettings", "preset"]

PROMPT_FORMATS: tuple[str, ...] = ("chat", "raw")
"""``chat``: the model's chat template (optionally with a system prompt); ``raw``: the paper's prefix, no template."""


@dataclass(frozen=True)
class GenerationSettings:
    """Prompt format and decoding for one evaluation.

    Attributes:
        prompt_format: ``"chat"`` (the tokenizer's chat template) or ``"raw"`` (``PAPER_PREFIX + prompt``,
            the paper's format, paper-notes.md §4.2).
        system_prompt: system message for the chat format; must be None for ``raw``.
        do_sample: sample (True) or greedy (False).
        temperature: sampling temperature (ignored when greedy).
        top_k: top-k sampling cut-off (ignored when greedy).
        max_new_tokens: generation budget, in tokens.
        seed: seeds sampling, per batch (see :func:`sa_lens.generate`).
    """

    prompt_format: Literal["chat", "raw"] = "chat"
    system_prompt: str | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        """Rejects settings that cannot produce a reply.

        Raises:
            ValueError: an unknown prompt format, a system prompt with the raw format, a non-positive
                budget or temperature.
        """
        if self.prompt_format not in PROMPT_FORMATS:
            raise InputError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}.")
        if self.prompt_format == "raw" and self.system_prompt is not None:
            raise InputError("system_prompt needs prompt_format='chat'; the paper's raw format has no system turn.")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}.")
        if self.do_sample and self.temperature <= 0:
            raise InputError(f"temperature must be > 0 when sampling, got {self.temperature}.")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for :func:`sa_lens.generate` (all but the prompts and the batch)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "chat_template": self.prompt_format == "chat",
            "system_prompt": self.system_prompt,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_k": self.top_k,
        }

    def digest(self) -> str:
        """A short stable hash of every field (part of the resume key of evaluation records)."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


PRESETS: dict[str, GenerationSettings] = {
    # Safety-Arithmetic notebooks (paper-notes.md §4.2): raw prompt, sampled, 200 new tokens.
    "paper": GenerationSettings(prompt_format="raw", do_sample=True, temperature=0.45, top_k=10, max_new_tokens=200),
    "greedy": GenerationSettings(prompt_format="chat", do_sample=False, max_new_tokens=64),
}


def preset(name: str, **overrides) -> GenerationSettings:
    """A named preset with some fields replaced, e.g. ``preset("paper", prompt_format="chat")``.

    Args:
        name: ``"paper"`` (raw format, T = 0.45, top-k 10, 200 new tokens, seed 0) or ``"greedy"``
            (chat template, greedy, 64 new tokens).
        overrides: fields of :class:`GenerationSettings` to change.

    Raises:
        ValueError: an unknown preset name or an invalid override.
    """
    if name not in PRESETS:
        raise InputError(f"unknown decoding preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **overrides)
