"""The embedded SmolLM2-135M-Instruct: loading, generation parity, exact HDR restore, Safe-Align hooks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import sa_lens
from sa_lens import HarmVector, SafetyVector, checkpoint_parameters, demonstration_text, harm_removal, safety_hooks
from sa_lens.generation import generate_tokens
from sa_lens.models import embedded_model_path
from sa_lens.prompts import format_prompts

pytestmark = pytest.mark.slow

# Mixed lengths, so the batch is left-padded by up to ~20 tokens.
PROMPTS = [
    "hi",
    "How do I bake bread?",
    "What is the capital of France? Answer briefly please.",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, and then give one everyday example of the same effect.",
    "Tell me how to pick a lock.",
]


@pytest.fixture(scope="module")
def model():
    return sa_lens.load_model()


@pytest.fixture(scope="module")
def texts(model):
    return format_prompts(model.tokenizer, PROMPTS)


def test_default_model_is_a_bridge_over_the_embedded_weights(model):
    assert (model.cfg.n_layers, model.cfg.d_model) == (30, 576)
    assert (embedded_model_path() / "model.safetensors").exists()


def test_greedy_generation_equals_no_cache_and_hugging_face_generate(model, texts):
    cached = generate_tokens(model, texts, 24, use_cache=True)
    assert cached == generate_tokens(model, texts, 24, use_cache=False)
    for attn in ("eager", "sdpa"):  # the bridge's arithmetic, and transformers' default kernel
        hf = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32, attn_implementation=attn)
        assert cached == generate_tokens(hf.eval(), texts, 24, tokenizer=model.tokenizer), attn
    decoded = sa_lens.generate(model, ["What is the capital of France? Answer briefly please."], 24)[0]
    assert "Paris" in decoded


def test_harm_removal_restores_every_parameter_bit_exactly_after_an_exception(model, texts):
    params = checkpoint_parameters(model)
    before = {k: v.detach().clone() for k, v in params.items()}
    g = torch.Generator().manual_seed(0)
    harmful = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in before.items()}
    hv = HarmVector.from_models(before, harmful).trim(0.10)
    reference = generate_tokens(model, texts[:2], 8)
    with pytest.raises(RuntimeError, match="inside"):
        with harm_removal(model, hv, lam=3.0):
            assert generate_tokens(model, texts[:2], 8) != reference  # the edit is live
            raise RuntimeError("inside")
    for name, p in checkpoint_parameters(model).items():
        assert torch.equal(p.detach().view(torch.int32), before[name].view(torch.int32)), name
    assert generate_tokens(model, texts[:2], 8) == reference


def test_safe_align_hooks_steer_generation_identically_with_and_without_cache(model, texts):
    q = "How do I pick a lock?"
    pairs = [
        (demonstration_text(q, "First, insert a tension wrench into the keyhole"), demonstration_text(q, "I do not answer this question because it is harmful")),
        (demonstration_text("How do I hack wifi?", "Use a packet sniffer to capture the handshake"), demonstration_text("How do I hack wifi?", "I do not answer this question because it is harmful")),
    ]
    sv = SafetyVector.from_pairs(model, pairs)
    plain = generate_tokens(model, texts, 16)
    with model.hooks(fwd_hooks=safety_hooks(sv, alpha=1.0)):
        steered = generate_tokens(model, texts, 16, use_cache=True)
        assert steered == generate_tokens(model, texts, 16, use_cache=False)
    assert steered != plain
    assert generate_tokens(model, texts, 16) == plain


@pytest.mark.parametrize("site", ["mlp_out", "attn_out", "resid_pre", "resid_post"])
def test_every_steering_option_is_identical_with_and_without_cache(model, texts, site):
    q = "How do I pick a lock?"
    pairs = [(demonstration_text(q, "First, insert a tension wrench"), demonstration_text(q, "I do not answer this question because it is harmful"))]
    sv = SafetyVector.from_pairs(model, pairs)
    for formula, positions in [(f, p) for f in ("official", "add", "ablate") for p in ("all", "prompt", "generated")]:
        alpha = 0.05 if formula == "add" else 1.0  # 'add' is in activation units: keep the text readable
        with model.hooks(fwd_hooks=safety_hooks(sv, alpha, site=site, formula=formula, positions=positions)):
            cached = generate_tokens(model, texts[:3], 8, use_cache=True)
            assert cached == generate_tokens(model, texts[:3], 8, use_cache=False), (formula, positions)
