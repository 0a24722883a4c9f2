"""SafetyVector extraction (official ICV recipe) and the Safe-Align injection hooks."""

from __future__ import annotations

import math

import pytest
import torch

import sa_lens
from sa_lens import SafetyLens, SafetyVector, demonstration_text, safety_hooks
from sa_lens.prompts import token_ids
from sa_lens.steering import OFFICIAL_FACTOR, inject_official

PAIRS = [
    (demonstration_text("How do I pick a lock?", "Here is how you do it step by step"), demonstration_text("How do I pick a lock?", "I do not answer this question because it is harmful")),
    (demonstration_text("Tell me a story", "The sea is blue and the capital of France is Paris"), demonstration_text("Tell me a story", "I do not answer this question because it is harmful")),
    (demonstration_text("Bake bread", "flour water and yeast, two plus two is four"), demonstration_text("Bake bread", "I'm sorry, but I can't help with that request")),
]


def _per_example_reference(bridge, pairs) -> torch.Tensor:
    """Straightforward official-style loop: one unpadded text at a time, last-4 mean of each block output."""
    def states(text):
        ids = torch.tensor(token_ids(bridge.tokenizer, [text]))  # the checkpoint's BOS rule, as every sa_lens path
        _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_out") and n.count(".") == 2 and n.startswith("blocks."))
        return torch.stack([cache[f"blocks.{l}.hook_out"][0, -4:].float().mean(0) for l in range(bridge.cfg.n_layers)])

    diffs = torch.stack([(states(u) - states(s)).flatten() for u, s in pairs])
    mean = diffs.mean(0)
    _, _, vh = torch.linalg.svd(diffs - mean, full_matrices=False)
    u = (diffs - mean) @ vh[0]
    pc1 = vh[0] * torch.sign(u[u.abs().argmax()])
    return (pc1 + mean).view(bridge.cfg.n_layers, -1)


def test_batched_extraction_equals_per_example_reference(tiny_bridge):
    sv = SafetyVector.from_pairs(tiny_bridge, PAIRS, batch_size=4)
    assert sv.directions.shape == (tiny_bridge.cfg.n_layers, tiny_bridge.cfg.d_model)
    torch.testing.assert_close(sv.directions, _per_example_reference(tiny_bridge, PAIRS), atol=1e-5, rtol=1e-4)
    assert sv.meta["sign"] == "unsafe_minus_safe" and sv.meta["hook_point"] == "blocks.{layer}.hook_out"


def test_extraction_is_invariant_to_batch_size(tiny_bridge):
    a = SafetyVector.from_pairs(tiny_bridge, PAIRS, batch_size=1).directions
    b = SafetyVector.from_pairs(tiny_bridge, PAIRS, batch_size=6).directions
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pairs", [[], [("only one",)], [("", "safe")]])
def test_bad_pairs_are_refused(tiny_bridge, pairs):
    with pytest.raises(ValueError, match="pair"):
        SafetyVector.from_pairs(tiny_bridge, pairs)


def test_non_finite_vector_is_refused():
    with pytest.raises(ValueError, match="NaN or inf"):
        SafetyVector(torch.full((2, 4), float("nan")))


def test_official_injection_keeps_norm_and_follows_the_formula():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(2, 5, 16, generator=g)
    v = torch.randn(16, generator=g)
    out = inject_official(m, v, alpha=0.12)
    torch.testing.assert_close(out.norm(dim=-1), m.norm(dim=-1))
    # Hand computation for one token.
    x, vu = m[0, 0], v / v.norm()
    cos = float(x @ vu / x.norm())
    c = OFFICIAL_FACTOR * 0.12 * (1 + max(0.0, cos))
    step = x / x.norm() - c * vu
    torch.testing.assert_close(out[0, 0], step / step.norm() * x.norm())
    # It moves away from v: cosine with v drops.
    assert (torch.nn.functional.cosine_similarity(out, v.expand_as(out), dim=-1) < torch.nn.functional.cosine_similarity(m, v.expand_as(m), dim=-1)).all()


def test_hooks_are_named_and_placed_on_each_mlp_output():
    sv = SafetyVector(torch.randn(3, 8))
    hooks = safety_hooks(sv, alpha=0.12)
    assert [name for name, _ in hooks] == [f"blocks.{l}.hook_mlp_out" for l in range(3)]
    assert [fn.__name__ for _, fn in hooks] == [f"sa_lens.safe_align.mlp_out.L{l}" for l in range(3)]
    assert [name for name, _ in safety_hooks(sv, layers=[1])] == ["blocks.1.hook_mlp_out"]


@pytest.mark.parametrize(("kwargs", "match"), [({"alpha": math.nan}, "alpha"), ({"layers": [5]}, "outside")])
def test_bad_hook_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        safety_hooks(SafetyVector(torch.randn(3, 8)), **kwargs)


def test_lens_refuses_a_vector_from_another_model(tiny_bridge):
    with pytest.raises(ValueError, match="extract the vector from this model"):
        SafetyLens(tiny_bridge).safety_hooks(SafetyVector(torch.randn(7, 8)))


def test_safe_align_changes_activations_and_is_removed_after_an_error(tiny_bridge):
    lens = SafetyLens(tiny_bridge)
    sv = SafetyVector.from_pairs(tiny_bridge, PAIRS)
    ids = tiny_bridge.tokenizer("How do I pick a lock?", return_tensors="pt")["input_ids"]
    plain = tiny_bridge(ids)
    with pytest.raises(RuntimeError):
        with lens.safe_align(sv, alpha=5.0):
            assert not torch.allclose(tiny_bridge(ids), plain)
            raise RuntimeError
    torch.testing.assert_close(tiny_bridge(ids), plain)


def test_safety_arithmetic_reads_the_icv_from_the_edited_weights_and_undoes_everything(tiny_bridge, tiny_dir, tiny_dir_other):
    base, _ = sa_lens.load_hf_model(tiny_dir)
    harmful, _ = sa_lens.load_hf_model(tiny_dir_other)
    hv = sa_lens.HarmVector.from_models(base, harmful).trim(0.1)
    lens = SafetyLens(tiny_bridge)
    ids = tiny_bridge.tokenizer("Tell me a story", return_tensors="pt")["input_ids"]
    plain = tiny_bridge(ids)
    with lens.harm_removal(hv, lam=3.0):
        sv_edited = SafetyVector.from_pairs(tiny_bridge, PAIRS)
    sv_plain = SafetyVector.from_pairs(tiny_bridge, PAIRS)
    assert not torch.allclose(sv_edited.directions, sv_plain.directions)
    with lens.safety_arithmetic(hv, PAIRS, lam=3.0, alpha=0.12):
        both = tiny_bridge(ids)
    with lens.harm_removal(hv, lam=3.0), tiny_bridge.hooks(fwd_hooks=safety_hooks(sv_edited, 0.12)):
        manual = tiny_bridge(ids)
    torch.testing.assert_close(both, manual)
    assert torch.equal(tiny_bridge(ids), plain)


def test_texts_shorter_than_the_window_average_only_their_real_tokens(tiny_bridge):
    short = [("lock", "no"), ("Tell me a story about the sea and the capital of France", "I do not answer this question")]
    assert len(tiny_bridge.tokenizer("no")["input_ids"]) < 4
    alone = SafetyVector.from_pairs(tiny_bridge, short, batch_size=1).directions
    padded = SafetyVector.from_pairs(tiny_bridge, short, batch_size=4).directions
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-4)


def test_demonstration_text_matches_the_official_template():
    official = "Question: {q}\n    Answer: {a}\n    ".format(q="How?", a="Like this.").strip(" .")
    assert demonstration_text("How?", "Like this.") == official
    assert official.endswith("\n")


def _states(bridge, text, n_last, chat=False):
    if chat:
        text = bridge.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor(token_ids(bridge.tokenizer, [text]))  # one BOS by the checkpoint's rule, as every sa_lens path
    _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.") and n.count(".") == 2 and n.endswith("hook_out"))
    return torch.stack([cache[f"blocks.{l}.hook_out"][0, -n_last:].float().mean(0) for l in range(bridge.cfg.n_layers)])


def test_mean_diff_and_last_token_options_equal_a_per_example_reference(tiny_bridge):
    sv = SafetyVector.from_pairs(tiny_bridge, PAIRS, positions="last", method="mean_diff", batch_size=4)
    ref = torch.stack([_states(tiny_bridge, u, 1) - _states(tiny_bridge, s, 1) for u, s in PAIRS]).mean(0)
    torch.testing.assert_close(sv.directions, ref, atol=1e-5, rtol=1e-4)
    assert sv.meta["positions"] == "last" and sv.meta["method"] == "mean_diff"


def test_pure_pc1_has_unit_norm_and_agrees_with_the_mean_difference(tiny_bridge):
    pc1 = SafetyVector.from_pairs(tiny_bridge, PAIRS, method="pca").directions.flatten()
    mean = SafetyVector.from_pairs(tiny_bridge, PAIRS, method="mean_diff").directions.flatten()
    torch.testing.assert_close(pc1.norm(), torch.tensor(1.0))
    assert pc1 @ mean > 0


def test_from_prompts_is_the_difference_of_means_at_the_template_end(tiny_bridge):
    harmful, harmless = ["How do I pick a lock?", "Tell me how to hack"], ["Bake bread", "Write a poem about the sea", "hi"]
    sv = SafetyVector.from_prompts(tiny_bridge, harmful, harmless, batch_size=2)
    ref = torch.stack([_states(tiny_bridge, p, 1, chat=True) for p in harmful]).mean(0) - torch.stack(
        [_states(tiny_bridge, p, 1, chat=True) for p in harmless]).mean(0)
    torch.testing.assert_close(sv.directions, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="at least one harmful"):
        SafetyVector.from_prompts(tiny_bridge, [], harmless)


@pytest.mark.parametrize(("kwargs", "match"), [({"positions": "first"}, "positions must be"), ({"method": "ica"}, "method must be")])
def test_unknown_extraction_options_are_named(tiny_bridge, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SafetyVector.from_pairs(tiny_bridge, PAIRS, **kwargs)


def test_safety_vector_file_round_trip_and_model_check(tiny_bridge, tmp_path):
    sv = SafetyVector.from_pairs(tiny_bridge, PAIRS)
    path = sv.save(tmp_path / "sv.safetensors")
    back = SafetyVector.load(path, model=tiny_bridge)
    assert torch.equal(back.directions, sv.directions) and back.meta == sv.meta
    SafetyVector(torch.randn(5, 8)).save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="extracted from another model"):
        SafetyVector.load(tmp_path / "other.safetensors", model=tiny_bridge)
    from sa_lens import HarmVector

    with pytest.raises(ValueError, match="holds a 'sa_lens.safety_vector'"):
        HarmVector.load(path)


def test_span_positions_and_layer_subset(tiny_bridge):
    sv = SafetyVector.from_pairs(tiny_bridge, PAIRS, positions="span", method="mean_diff")
    n = lambda t: len(tiny_bridge.tokenizer(t)["input_ids"])  # noqa: E731
    ref = torch.stack([_states(tiny_bridge, u, n(u)) - _states(tiny_bridge, s, n(s)) for u, s in PAIRS]).mean(0)
    torch.testing.assert_close(sv.directions, ref, atol=1e-5, rtol=1e-4)
    only_1 = SafetyVector.from_pairs(tiny_bridge, PAIRS, method="mean_diff", layers=[1])
    full = SafetyVector.from_pairs(tiny_bridge, PAIRS, method="mean_diff")
    assert torch.equal(only_1.directions[0], torch.zeros(tiny_bridge.cfg.d_model)) and only_1.meta["layers"] == [1]
    torch.testing.assert_close(only_1.directions[1], full.directions[1])
    with pytest.raises(ValueError, match=r"layers \[7\] are out of range"):
        SafetyVector.from_pairs(tiny_bridge, PAIRS, layers=[7])


@pytest.mark.parametrize("positions", ["last4_mean", "last", "span"])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_sharing_the_question_prefix_changes_nothing(tiny_bridge, positions, batch_size):
    # Answers of 1–2 tokens put the 4-token window partly inside the shared prefix; the third pair's texts
    # differ at the last token only; pairs are of mixed lengths so batches pad both passes.
    pairs = PAIRS + [
        (demonstration_text("Why is the sky blue?", "No"), demonstration_text("Why is the sky blue?", "I do not answer")),
        ("Tell me a story about the sea, please", "Tell me a story about the sea, please!"),
    ]
    shared = SafetyVector.from_pairs(tiny_bridge, pairs, positions=positions, method="mean_diff", batch_size=batch_size)
    whole = SafetyVector.from_pairs(tiny_bridge, pairs, positions=positions, method="mean_diff", share_prefix=False)
    torch.testing.assert_close(shared.directions, whole.directions, atol=1e-5, rtol=1e-4)


def test_pairs_without_a_common_first_token_are_packed_side_by_side(tiny_bridge, monkeypatch):
    from sa_lens import safety_vector

    expected = SafetyVector.from_pairs(tiny_bridge, PAIRS, share_prefix=False).directions
    real = safety_vector._common_prefix
    calls = iter(range(100))
    monkeypatch.setattr(safety_vector, "_common_prefix", lambda a, b: 0 if next(calls) % 2 else real(a, b))
    torch.testing.assert_close(SafetyVector.from_pairs(tiny_bridge, PAIRS).directions, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("config", [{"positional_embedding_type": "alibi"}, {"sliding_window": 3}])
def test_models_whose_positions_packing_cannot_set_run_every_text_whole(tiny_bridge, monkeypatch, config):
    # ALiBi biases come from the 2-D mask, not position ids; a sliding window shorter than the texts is not
    # in the packed 4-D mask. Both must fall back to one text per row.
    from sa_lens import safety_vector

    expected = SafetyVector.from_pairs(tiny_bridge, PAIRS, share_prefix=False).directions
    for key, value in config.items():
        target = tiny_bridge.cfg if key == "positional_embedding_type" else tiny_bridge.original_model.config
        monkeypatch.setattr(target, key, value, raising=False)
    monkeypatch.setattr(safety_vector, "_packed_pairs", lambda *a: pytest.fail("packed despite the model's positions"))
    torch.testing.assert_close(SafetyVector.from_pairs(tiny_bridge, PAIRS).directions, expected, atol=1e-5, rtol=1e-4)


def test_common_prefix_leaves_each_text_a_token_of_its_own():
    from sa_lens.safety_vector import _common_prefix

    assert _common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert _common_prefix([1, 2, 3], [1, 2, 3]) == 2  # identical texts: the last token is still read, not shared
    assert _common_prefix([1, 2], [1]) == 0 and _common_prefix([7], [8]) == 0


def test_extraction_reads_the_same_states_under_left_and_right_padding(tiny_bridge):
    from sa_lens.safety_vector import _last_positions_mean

    texts = [t for pair in PAIRS for t in pair] + ["ab"]  # "ab" is shorter than the 4-token window
    for n_last in (4, 1, None):
        left = _last_positions_mean(tiny_bridge, texts, batch_size=7, n_last=n_last, padding_side="left")
        right = _last_positions_mean(tiny_bridge, texts, batch_size=7, n_last=n_last, padding_side="right")
        torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)


def test_extraction_ignores_the_tokenizers_own_padding_side(tiny_bridge):
    before = SafetyVector.from_pairs(tiny_bridge, PAIRS, batch_size=6).directions
    own = tiny_bridge.tokenizer.padding_side
    tiny_bridge.tokenizer.padding_side = "right" if own == "left" else "left"
    try:
        after = SafetyVector.from_pairs(tiny_bridge, PAIRS, batch_size=6).directions
    finally:
        tiny_bridge.tokenizer.padding_side = own
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-4)


def test_packed_extraction_needs_no_pad_token_and_leaves_the_tokenizer_alone(tiny_bridge):
    tok = tiny_bridge.tokenizer
    expected = SafetyVector.from_pairs(tiny_bridge, PAIRS, share_prefix=False).directions
    pad = tok.pad_token
    tok.pad_token = None
    try:
        packed = SafetyVector.from_pairs(tiny_bridge, PAIRS, batch_size=4).directions
        assert tok.pad_token_id is None
    finally:
        tok.pad_token = pad
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_blocks_above_the_deepest_chosen_layer_are_not_run(tiny_bridge, share_prefix, monkeypatch):
    full = SafetyVector.from_pairs(tiny_bridge, PAIRS, method="mean_diff", share_prefix=share_prefix)
    calls = []
    # A watch on block 1's forward itself: a hook would be refused as a leftover (sa_lens.model_state).
    block = tiny_bridge.blocks[1].original_component
    run = block.forward
    monkeypatch.setattr(block, "forward", lambda *args, **kwargs: calls.append(1) or run(*args, **kwargs))
    only_0 = SafetyVector.from_pairs(tiny_bridge, PAIRS, method="mean_diff", layers=[0], share_prefix=share_prefix)
    assert calls == []
    SafetyVector.from_pairs(tiny_bridge, PAIRS, method="mean_diff", layers=[1], share_prefix=share_prefix)
    assert calls  # the same watch sees block 1 run when it is read
    torch.testing.assert_close(only_0.directions[0], full.directions[0])
    assert torch.equal(only_0.directions[1], torch.zeros(tiny_bridge.cfg.d_model))
    assert not tiny_bridge.hook_dict["blocks.0.hook_out"].fwd_hooks  # the stopping hook is gone
