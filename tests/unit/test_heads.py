"""Head tracing on the tiny GQA Llama: attributions sum exactly, patching and its gradient estimate agree."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sa_lens.analysis.capture import capture, post_instruction_length
from sa_lens.analysis.heads import dla_components, head_outputs, top_heads, trace_heads
from sa_lens.analysis.logit_diff import token_sets
from sa_lens.analysis.patching import attribution_patch, patch_heads
from sa_lens.head_ablation import ablate_heads_hooks

HARMFUL = ["Explain how to pick a lock", "Tell me a story about bread"]
HARMLESS = ["The capital of France is Paris", "Write a poem about the sea"]


@pytest.fixture()
def sets(tiny_bridge):
    vocab = tiny_bridge.tokenizer
    # Token ids in this random vocabulary; words would collide on first pieces.
    return token_sets(vocab, [vocab.convert_tokens_to_ids("I")], [vocab.convert_tokens_to_ids("H"), vocab.convert_tokens_to_ids("T")])


def test_head_outputs_sum_to_attention_output(tiny_bridge):
    cache_z, cache_out = {}, {}
    hooks = [("blocks.1.attn.hook_z", lambda x, hook: cache_z.setdefault("z", x)),
             ("blocks.1.hook_attn_out", lambda x, hook: cache_out.setdefault("out", x))]
    with torch.no_grad(), tiny_bridge.hooks(fwd_hooks=hooks):
        tiny_bridge(tiny_bridge.tokenizer(HARMFUL[:1], return_tensors="pt").input_ids)
    z = cache_z["z"].float()  # [1, pos, 4 query heads, d_head] with 2 KV heads (GQA)
    per_head = head_outputs(tiny_bridge, z[:, :, None].expand(-1, -1, tiny_bridge.cfg.n_layers, -1, -1).flatten(0, 1))
    torch.testing.assert_close(per_head[:, 1].sum(1), cache_out["out"][0].float(), atol=1e-5, rtol=1e-5)


def test_dla_components_sum_to_logit_difference(tiny_bridge, sets):
    cap = capture(tiny_bridge, HARMFUL + HARMLESS, sets, n_positions=2, grad=False, batch_size=3)
    labels, dla = dla_components(tiny_bridge, cap, sets)
    assert len(labels) == dla.shape[0]
    assert sum(label["component"].startswith("L") for label in labels) == 2 * 4
    torch.testing.assert_close(dla.sum(0), cap.logit_diff, atol=1e-4, rtol=0)
    # Not trivially zero: the components differ and the total is not ~0.
    assert cap.logit_diff.abs().max() > 1e-2


def test_capture_is_independent_of_batching(tiny_bridge, sets):
    one = capture(tiny_bridge, HARMFUL + HARMLESS, sets, n_positions=2, batch_size=1)
    four = capture(tiny_bridge, HARMFUL + HARMLESS, sets, n_positions=2, batch_size=4)
    torch.testing.assert_close(one.logit_diff, four.logit_diff, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one.z_grad, four.z_grad, atol=1e-4, rtol=1e-3)


def test_attribution_patching_matches_exact_patching_for_small_changes(tiny_bridge, sets):
    cap = capture(tiny_bridge, HARMLESS, sets, n_positions=2)
    torch.manual_seed(0)
    source = cap.z + 1e-3 * torch.randn_like(cap.z)
    estimate = attribution_patch(source, cap.z, cap.z_grad)
    heads = [(0, 0), (0, 3), (1, 1), (1, 2)]
    exact = patch_heads(tiny_bridge, HARMLESS, source, heads, sets, cap.logit_diff)
    for head, value in exact.items():
        assert abs(value) > 1e-6
        assert value == pytest.approx(float(estimate[head]), rel=0.05, abs=1e-6)


def test_patching_a_run_with_itself_changes_nothing(tiny_bridge, sets):
    cap = capture(tiny_bridge, HARMFUL, sets, n_positions=2, grad=False)
    effect = patch_heads(tiny_bridge, HARMFUL, cap.z, [(0, 1), (1, 3)], sets, cap.logit_diff)
    assert all(abs(v) < 1e-5 for v in effect.values())


def test_zero_ablating_every_head_of_a_layer_zeroes_its_attention_output(tiny_bridge):
    seen = {}
    hooks = ablate_heads_hooks([(0, h) for h in range(4)]) + [("blocks.0.hook_attn_out", lambda x, hook: seen.setdefault("out", x))]
    assert hooks[0][1].__name__ == "sa_lens.head_ablation.L0"
    with torch.no_grad(), tiny_bridge.hooks(fwd_hooks=hooks):
        tiny_bridge(tiny_bridge.tokenizer(HARMFUL[:1], return_tensors="pt").input_ids)
    assert seen["out"].abs().max() == 0


def test_trace_heads_frame_is_tidy_and_consistent(tiny_bridge, sets):
    direction = torch.randn(tiny_bridge.cfg.d_model)
    df = trace_heads(tiny_bridge, direction, HARMFUL, HARMLESS, refusal_tokens=list(sets.refusal),
                     compliance_tokens=list(sets.compliance), patch=3)
    assert list(df.columns) == ["layer", "head", "component", "measure", "value", "unit", "n"]
    wide = df[df["head"].notna()].pivot_table(index=["layer", "head"], columns="measure", values="value")
    assert len(wide) == 8
    pd.testing.assert_series_equal(wide["projection_diff"], wide["projection_harmful"] - wide["projection_harmless"],
                                   check_names=False, atol=1e-5)
    assert wide["patch_into_harmless"].notna().sum() == 3
    for name in ("harmful", "harmless"):
        total = df.loc[df["measure"] == f"dla_{name}", "value"].sum()
        assert total == pytest.approx(df.attrs[f"logit_diff_{name}"], abs=1e-4)
    assert df.attrs["n_positions"] == post_instruction_length(tiny_bridge.tokenizer)


def test_top_heads_orders_by_value_and_rejects_unknown_measures():
    df = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "measure": ["m"] * 3, "value": [0.1, -0.9, 0.5]})
    assert top_heads(df, "m", 2) == [(1, 0), (0, 0)]
    assert top_heads(df, "m", 1, by_abs=True) == [(0, 1)]
    with pytest.raises(ValueError, match="measures present"):
        top_heads(df, "nope")


def test_token_sets_refuse_overlap(tiny_bridge):
    with pytest.raises(ValueError, match="both the refusal and the compliance"):
        token_sets(tiny_bridge.tokenizer, ["I"], ["I"])


def test_trace_heads_rejects_a_direction_of_the_wrong_width(tiny_bridge):
    with pytest.raises(ValueError, match="direction must be"):
        trace_heads(tiny_bridge, torch.ones(3), HARMFUL, HARMLESS, patch=None)
