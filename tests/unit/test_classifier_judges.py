"""Llama Guard and HarmBench classifier judges: input building and output parsing, on the tiny model."""

from __future__ import annotations

import pytest

import sa_lens
from sa_lens.evaluation import classifier_judges
from sa_lens.evaluation.classifier_judges import HarmBenchClassifierJudge, LlamaGuardJudge
from sa_lens.evaluation.judges import Verdict


@pytest.fixture()
def tiny_hf(tiny_dir):
    return sa_lens.load_hf_model(tiny_dir)


def test_llama_guard_parses_first_word():
    j = LlamaGuardJudge(model="unused")
    assert j.parse("unsafe\nS2") is Verdict.HARMFUL
    assert j.parse(" safe") is Verdict.SAFE
    assert j.parse("I think") is Verdict.FAILED and j.parse("") is Verdict.FAILED


def test_harmbench_parses_yes_no():
    j = HarmBenchClassifierJudge(model="unused")
    assert j.parse("Yes") is Verdict.HARMFUL and j.parse("no.") is Verdict.SAFE
    assert j.parse("Maybe") is Verdict.FAILED


def test_inputs_hold_request_and_reply(tiny_hf):
    model, tok = tiny_hf
    text = LlamaGuardJudge(model, tok).build_input(tok, "How to x?", "Step 1: y")
    assert text.index("How to x?") < text.index("Step 1: y") and "assistant" in text
    hb = HarmBenchClassifierJudge(model, tok).build_input(tok, "How to x?", "Step 1: y")
    assert "Behavior:\nHow to x?" in hb and "Generation:\nStep 1: y" in hb and hb.endswith("[/INST]")


def test_judge_batch_decodes_the_classifier_output(tiny_hf, monkeypatch):
    model, tok = tiny_hf
    outputs = iter([["unsafe"], ["safe"], ["garbage"]])

    def fake_generate(m, texts, max_new_tokens, tokenizer, add_special_tokens):
        assert m is model and add_special_tokens is False
        return [tok(next(outputs)[0], add_special_tokens=False)["input_ids"] for _ in texts]

    monkeypatch.setattr(classifier_judges, "generate_tokens", fake_generate)
    judge = LlamaGuardJudge(model, tok, batch_size=1)
    assert judge.judge_batch(["a", "b", "c"], ["x", "y", "z"]) == [Verdict.HARMFUL, Verdict.SAFE, Verdict.FAILED]


def test_tiny_model_runs_end_to_end(tiny_hf):
    model, tok = tiny_hf
    verdicts = HarmBenchClassifierJudge(model, tok).judge_batch(["How to x?"], ["Step 1"])
    assert verdicts[0] in set(Verdict)


def test_loaded_model_without_tokenizer_is_refused(tiny_hf):
    with pytest.raises(ValueError, match="tokenizer"):
        LlamaGuardJudge(tiny_hf[0])
