"""Head analysis beyond Llama: DLA closes, patching is consistent and τH splits by head on tiny random Gemma-2
(post-attention/post-feedforward RMSNorms, final logit soft-capping (at 3 here, so it bites), √d_model
embedding scale), Qwen2 (q/k/v
biases), GPT-2 (LayerNorm with bias, absolute positions, Conv1D c_attn) and Phi-3 (fused qkv_proj, gate_up_proj).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import transformers as hf
from transformers import PreTrainedTokenizerFast

import sa_lens
from sa_lens.analysis.capture import capture, encode, has_post_attention_norm
from sa_lens.analysis.heads import dla_components, head_writes, trace_heads
from sa_lens.analysis.logit_diff import logit_diff, token_sets
from sa_lens.analysis.patching import attribution_patch, patch_heads
from sa_lens.analysis.weights import head_mass, layer_mass, o_alignment
from sa_lens.errors import InputError
from sa_lens.harm_vector import HarmVector

PROMPTS = ["Explain how to pick a lock", "Tell me a story about bread", "The capital of France is Paris",
           "Write a poem about the sea"]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
FAMILIES = {
    "gemma2": (hf.Gemma2Config, hf.Gemma2ForCausalLM,
               SMALL | dict(head_dim=16, sliding_window=16, final_logit_softcapping=3.0, attn_logit_softcapping=50.0,
                            query_pre_attn_scalar=16)),
    "qwen2": (hf.Qwen2Config, hf.Qwen2ForCausalLM, SMALL),
    "gpt2": (hf.GPT2Config, hf.GPT2LMHeadModel, dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "phi3": (hf.Phi3Config, hf.Phi3ForCausalLM, SMALL),
}


def _build(family: str, tokenizer: PreTrainedTokenizerFast, path: Path, seed: int) -> torch.nn.Module:
    config_cls, model_cls, dims = FAMILIES[family]
    config = config_cls(**dims, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so logit differences are O(1) logits
            p.mul_(4.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(name, bridge, base HF model, a second HF model of the family with other weights, the base's folder)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_dir)  # the shared tiny chat tokenizer
    root = tmp_path_factory.mktemp(request.param)
    base = _build(request.param, tokenizer, root / "base", seed=0)
    other = _build(request.param, tokenizer, root / "other", seed=1)
    return request.param, sa_lens.load_model(root / "base"), base, other, root / "base"


def _sets(model):
    vocab = model.tokenizer
    return token_sets(vocab, [vocab.convert_tokens_to_ids("I")], [vocab.convert_tokens_to_ids("H"), vocab.convert_tokens_to_ids("T")])


def test_dla_components_sum_to_the_logit_difference(family):
    name, bridge, *_ = family
    sets = _sets(bridge)
    cap = capture(bridge, PROMPTS, sets, n_positions=2, grad=False)
    labels, dla = dla_components(bridge, cap, sets)
    assert len(labels) == dla.shape[0]
    assert cap.logit_diff.abs().max() > 0.1  # not trivially zero
    torch.testing.assert_close(dla.sum(0), cap.logit_diff, atol=1e-4, rtol=0)
    assert (cap.attn_post_scale is not None) == (name == "gemma2") == has_post_attention_norm(bridge)


def test_head_writes_add_up_to_what_each_attention_block_adds_to_the_residual(family):
    name, bridge, *_ = family
    cap = capture(bridge, PROMPTS, _sets(bridge), n_positions=1, grad=False)
    added = {}
    hooks = [(f"blocks.{layer}.hook_attn_out", lambda x, hook, layer=layer: added.__setitem__(layer, x[:, -1].float()))
             for layer in range(bridge.cfg.n_layers)]
    enc = encode(bridge, PROMPTS)
    with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
        bridge(enc["input_ids"], attention_mask=enc["attention_mask"])
    writes = head_writes(bridge, cap).sum(2)  # [n, layers, d_model]
    for layer in range(bridge.cfg.n_layers):
        b_O = bridge.blocks[layer].attn.b_O  # GPT-2's c_proj bias; none of these families has one under a post-norm
        want = added[layer] - (0 if b_O is None else b_O.detach().float())
        torch.testing.assert_close(writes[:, layer], want, atol=1e-4, rtol=1e-4)


def test_the_logit_difference_is_the_models_before_soft_capping(family):
    name, bridge, *_ = family
    sets = _sets(bridge)
    cap = capture(bridge, PROMPTS[:1], sets, n_positions=1, grad=False)
    with torch.no_grad():
        logits = bridge(bridge.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                                                               add_generation_prompt=True, return_tensors="pt",
                                                               return_dict=True)["input_ids"])[:, -1].float()
    cap_value = bridge.cfg.output_logits_soft_cap
    if name == "gemma2":
        assert cap_value == 3.0  # small, so capping moves these O(1) logits measurably
        uncapped = cap_value * torch.atanh(logits / cap_value)
        torch.testing.assert_close(cap.logit_diff, logit_diff(uncapped, sets), atol=1e-3, rtol=0)
        assert not torch.allclose(cap.logit_diff, logit_diff(logits, sets), atol=1e-3)
    else:
        torch.testing.assert_close(cap.logit_diff, logit_diff(logits, sets), atol=1e-5, rtol=0)


def test_dla_without_the_post_attention_norm_is_refused_naming_the_architecture(family):
    name, bridge, *_ = family
    if name != "gemma2":
        pytest.skip("only Gemma-2 has a post-attention norm to leave out")
    sets = _sets(bridge)
    cap = capture(bridge, PROMPTS, sets, n_positions=1, grad=False)
    with pytest.raises(InputError, match=r"Gemma2ForCausalLM.*patching"):
        dla_components(bridge, dataclasses.replace(cap, attn_post_scale=None), sets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trace_heads_reports_how_closely_dla_closes_in_the_models_dtype(family, dtype):
    *_, folder = family
    model = sa_lens.load_model(folder, dtype=dtype)
    sets = _sets(model)
    df = trace_heads(model, torch.randn(model.cfg.d_model), PROMPTS[:2], PROMPTS[2:],
                     refusal_tokens=list(sets.refusal), compliance_tokens=list(sets.compliance), patch=None)
    dla = df[df["measure"] == "dla_harmful"]["value"].sum()
    # The mean over prompts of Σ DLA is the mean logit difference, up to the per-prompt gap reported.
    assert abs(dla - df.attrs["logit_diff_harmful"]) <= df.attrs["dla_closure_error"] + 1e-6
    largest = max(abs(df.attrs["logit_diff_harmful"]), abs(df.attrs["logit_diff_harmless"]), 1.0)
    # The docstrings' promise: 1e-4 logits in fp32; 1 % of the logit difference in bf16 (measured ≤ 0.3 %).
    assert df.attrs["dla_closure_error"] <= (1e-4 if dtype == torch.float32 else 1e-2 * largest)


def test_patching_agrees_with_attribution_and_with_itself(family):
    _, bridge, *_ = family
    sets = _sets(bridge)
    cap = capture(bridge, PROMPTS, sets, n_positions=2)
    heads = [(0, 0), (1, 3)]
    same = patch_heads(bridge, PROMPTS, cap.z, heads, sets, cap.logit_diff)
    assert all(abs(v) < 1e-5 for v in same.values())
    torch.manual_seed(0)
    source = cap.z + 1e-3 * torch.randn_like(cap.z)
    estimate = attribution_patch(source, cap.z, cap.z_grad)
    for head, value in patch_heads(bridge, PROMPTS, source, heads, sets, cap.logit_diff).items():
        assert abs(value) > 1e-7
        assert value == pytest.approx(float(estimate[head]), rel=0.1, abs=1e-6)


def test_head_mass_splits_every_layout_and_adds_up_to_the_attention_mass(family):
    name, bridge, base, other, _ = family
    hv = HarmVector.from_models(base, other)
    n_heads, n_kv = bridge.cfg.n_heads, bridge.cfg.n_key_value_heads or bridge.cfg.n_heads
    df = head_mass(hv, n_heads, n_kv)
    assert len(df) == bridge.cfg.n_layers * n_heads * 5
    # Each head's total counts its group's K/V once per group member: totals add up to q + k + v + o weights.
    qkvo = {"gemma2": r"self_attn\.[qkvo]_proj\.weight$", "qwen2": r"self_attn\.[qkvo]_proj\.weight$",
            "gpt2": r"attn\.c_(attn|proj)\.weight$", "phi3": r"self_attn\.(qkv|o)_proj\.weight$"}[name]
    weights = [n for n in hv if re.search(qkvo, n)]
    assert len(weights) == bridge.cfg.n_layers * (4 if name in ("gemma2", "qwen2") else 2)
    want = sum(float(hv.dense(n).double().pow(2).sum()) for n in weights)
    assert df[df["matrix"] == "total"]["l2sq"].sum() == pytest.approx(want, rel=1e-9)
    assert layer_mass(hv)["l2sq"].sum() > want  # the rest of the model is there too


def test_head_mass_slices_a_fused_projection_into_the_right_heads(family):
    name, bridge, base, *_ = family
    if name not in ("gpt2", "phi3"):
        pytest.skip("fused layouts only")
    # τH non-zero only in query head 2's slice of the fused q/k/v matrix: all its mass lands on head 2's q.
    d_head = bridge.cfg.d_head
    deltas = {n: torch.zeros_like(p) for n, p in base.state_dict().items() if n.endswith("weight")}
    fused = next(n for n in deltas if n.endswith(("qkv_proj.weight", "c_attn.weight")) and ".0." in n)
    if name == "phi3":  # [out = (H + 2·kv)·d_head, in]: rows
        deltas[fused][2 * d_head:3 * d_head] = 1.0
    else:  # GPT-2 Conv1D [in, out = 3·d_model]: columns
        deltas[fused][:, 2 * d_head:3 * d_head] = 1.0
    df = head_mass(HarmVector(deltas), bridge.cfg.n_heads, bridge.cfg.n_key_value_heads or bridge.cfg.n_heads)
    nonzero = df[(df["l2sq"] > 0) & (df["matrix"] != "total")]
    assert nonzero[["layer", "head", "matrix"]].values.tolist() == [[0, 2, "q"]]
    assert nonzero["l2sq"].item() == pytest.approx(float(deltas[fused].sum()))



def test_o_alignment_reads_gpt2_conv1d_c_proj_as_the_transposed_o_proj(family):
    name, bridge, base, other, _ = family
    if name != "gpt2":
        pytest.skip("GPT-2's Conv1D layout only")
    hv = HarmVector.from_models(base, other)
    as_linear = HarmVector({n.replace("attn.c_proj", "self_attn.o_proj"): hv.dense(n).T.contiguous()
                            for n in hv if n.endswith("attn.c_proj.weight")})
    direction = torch.randn(bridge.cfg.n_layers, bridge.cfg.d_model)
    got = o_alignment(hv, direction, bridge.cfg.n_heads)
    assert len(got) == bridge.cfg.n_layers * bridge.cfg.n_heads and (got["alignment"] > 0).all()
    pd.testing.assert_frame_equal(got, o_alignment(as_linear, direction, bridge.cfg.n_heads))
