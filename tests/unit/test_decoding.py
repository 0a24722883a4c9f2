"""Decoding presets and prompt formats."""

from __future__ import annotations

import pytest

from sa_lens.evaluation.decoding import PRESETS, GenerationSettings, preset


def test_paper_preset_is_the_notebooks_settings():
    p = PRESETS["paper"]
    assert (p.prompt_format, p.do_sample, p.temperature, p.top_k, p.max_new_tokens) == ("raw", True, 0.45, 10, 200)
    assert p.generate_kwargs()["chat_template"] is False


def test_greedy_preset_does_not_sample():
    assert preset("greedy").generate_kwargs()["do_sample"] is False


def test_overrides_change_the_digest():
    assert preset("paper").digest() != preset("paper", seed=1).digest()
    assert preset("greedy", system_prompt="Be safe.").digest() != preset("greedy").digest()


def test_system_prompt_with_raw_format_is_refused():
    with pytest.raises(ValueError, match="system_prompt needs prompt_format='chat'"):
        GenerationSettings(prompt_format="raw", system_prompt="x")


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown decoding preset"):
        preset("beam")
