"""ROME knowledge edits on tiny random models (sa_lens.editing, sa_lens.mlp_projection, sa_lens.edit_stats) and the
EDIT scenario's harm vector (sa_lens.edit_area.edit_area_vector).

What is pinned here: a bridge and its plain HF model get the same update; knowledge_edit undoes itself bit for bit,
also after an exception, and a list of edits is all or nothing; every refusal names its problem and leaves the
model untouched; the MLP output projection is found in every family (GPT-2's Conv1D transposed) and an edit
changes only that tensor; key statistics are cached by the weights that shape the keys; save_edited reloads.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn

import sa_lens
from sa_lens import edit_stats
from sa_lens.edit_area import edit_area_vector
from sa_lens.edit_requests import EditRequest
from sa_lens.editing import RomeOptions, apply_edits, edit_scores, knowledge_edit, save_edited, summarise_scores
from sa_lens.errors import ConvergenceError, InputError
from sa_lens.harm_vector import HarmVector, checkpoint_parameters
from sa_lens.mlp_projection import decoder_layer_count, mlp_output
from sa_lens.prompts import token_ids

STATS = ("The sky is blue.", "Two plus two is four.", "How do I bake bread at home?", "Tell me a story about the sea.")
FAST = RomeOptions(steps=15, stats_texts=STATS)
# The subject ends the prompt, so a two-layer model can carry δ to the answer. The tiny model prefers " bread"
# (log-prob −5.7) to " blue" (−12.4) there before the edit.
SEA = EditRequest("Tell me about {}", "the sea", " blue", target_true=" bread", id="sea")
SKY = EditRequest("Tell me about {}", "the sky", " four", target_true=" bread", id="sky")
# The subject is far from the answer: 15 steps leave the target NLL near 9 nats/token on the tiny model.
FAR = EditRequest("{} is located in the city of", "The capital of France", " London", id="far")


@pytest.fixture(autouse=True)
def _own_stats_cache(tmp_path, monkeypatch):
    """Key statistics go to a fresh cache folder and memo: nothing touches the user's cache or leaks between tests."""
    monkeypatch.setenv("SA_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(edit_stats, "_MEMO", {})


@pytest.fixture()
def tiny_hf(tiny_dir):
    return sa_lens.load_hf_model(tiny_dir)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: _bits(p) for n, p in checkpoint_parameters(model).items()}


def _changed(model, before: dict[str, torch.Tensor]) -> list[str]:
    now = _snapshot(model)
    assert now.keys() == before.keys()
    return sorted(n for n in before if not torch.equal(now[n], before[n]))


# ---- the edit itself -----------------------------------------------------------------------------------------


def test_rome_on_a_bridge_and_on_its_hf_model_gives_the_same_update_and_the_target_wins(tiny_bridge, tiny_hf):
    hf, tok = tiny_hf
    assert edit_scores(tiny_bridge, [SEA])[0]["efficacy"] == 0.0  # the model prefers the true answer before
    before = edit_scores(hf, [SEA], tokenizer=tok)[0]["target_logprob"]
    with knowledge_edit(tiny_bridge, [SEA], 0, FAST) as on_bridge:
        w_bridge = mlp_output(tiny_bridge, 0).weight.detach().clone()
        scores = edit_scores(tiny_bridge, [SEA])
    with knowledge_edit(hf, [SEA], 0, FAST, tokenizer=tok) as on_hf:
        w_hf = mlp_output(hf, 0).weight.detach().clone()
        after = edit_scores(hf, [SEA], tokenizer=tok)[0]["target_logprob"]
    assert on_bridge[0].loss == on_hf[0].loss and on_bridge[0].steps == on_hf[0].steps
    assert on_bridge[0].loss < FAST.max_loss < on_bridge[0].loss_start
    assert torch.equal(w_bridge, w_hf)
    assert scores[0]["efficacy"] == 1.0 and after > before + 5  # nats/token
    assert summarise_scores(scores)["efficacy"] == 1.0


def test_knowledge_edit_restores_every_parameter_bit_for_bit(tiny_bridge):
    before = _snapshot(tiny_bridge)
    with knowledge_edit(tiny_bridge, [SEA, SKY], 0, FAST) as results:
        assert _changed(tiny_bridge, before) == ["model.layers.0.mlp.down_proj.weight"]
        assert [r.id for r in results] == ["sea", "sky"]
    assert _changed(tiny_bridge, before) == []


def test_knowledge_edit_restores_every_parameter_after_an_exception_in_the_block(tiny_bridge):
    before = _snapshot(tiny_bridge)
    with pytest.raises(RuntimeError, match="boom"):
        with knowledge_edit(tiny_bridge, [SEA], 0, FAST):
            assert _changed(tiny_bridge, before)
            raise RuntimeError("boom")
    assert _changed(tiny_bridge, before) == []


def test_nested_knowledge_edits_undo_in_turn(tiny_bridge):
    before = _snapshot(tiny_bridge)
    with knowledge_edit(tiny_bridge, [SEA], 0, FAST):
        outer = _snapshot(tiny_bridge)
        with knowledge_edit(tiny_bridge, [SKY], 0, FAST):
            assert _changed(tiny_bridge, outer) == ["model.layers.0.mlp.down_proj.weight"]
        assert _changed(tiny_bridge, outer) == []
    assert _changed(tiny_bridge, before) == []


def test_apply_edits_keeps_the_change_in_that_one_weight(tiny_bridge):
    before = _snapshot(tiny_bridge)
    results = apply_edits(tiny_bridge, [SEA], 1, FAST)
    assert _changed(tiny_bridge, before) == ["model.layers.1.mlp.down_proj.weight"]
    assert results[0].layer == 1 and results[0].update_norm > 0
    assert edit_scores(tiny_bridge, [SEA])[0]["efficacy"] == 1.0


@pytest.mark.parametrize("keep", [False, True], ids=["knowledge_edit", "apply_edits"])
def test_a_second_edit_that_does_not_converge_raises_with_its_loss_and_applies_nothing(tiny_bridge, keep):
    before = _snapshot(tiny_bridge)
    with pytest.raises(ConvergenceError, match=r"edit 'far' did not converge at layer 0: target NLL \d+\.\d{3} "
                                               r"nats/token after 15 steps.*Nothing was applied"):
        if keep:
            apply_edits(tiny_bridge, [SEA, FAR], 0, FAST)
        else:
            with knowledge_edit(tiny_bridge, [SEA, FAR], 0, FAST):
                pytest.fail("entered the block")
    assert _changed(tiny_bridge, before) == []


def test_every_edit_fails_when_no_loss_is_small_enough(tiny_bridge):
    before = _snapshot(tiny_bridge)
    strict = RomeOptions(steps=1, max_loss=0.0, early_stop_loss=0.0, stats_texts=STATS)
    with pytest.raises(ConvergenceError, match=r"edit 'sea' .* target NLL \d+\.\d{3} nats/token after 1 steps"):
        apply_edits(tiny_bridge, [SEA], 0, strict)
    assert _changed(tiny_bridge, before) == []


# ---- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edits", "layer", "options", "message"),
    [
        ([{"prompt": "Tell me about the sea", "subject": "the ocean", "target_new": " blue"}], 0, FAST,
         "subject 'the ocean' does not occur in the prompt 'Tell me about the sea'"),
        ([SEA, {"question": "What?", "answer": "x"}], 0, FAST, "Cannot derive a subject"),
        ([SEA], -1, FAST, r"layer must be a decoder layer index in 0\.\.1; got -1"),
        ([SEA], 2, FAST, r"layer must be a decoder layer index in 0\.\.1; got 2"),
        ([SEA], True, FAST, r"layer must be a decoder layer index in 0\.\.1; got True"),
        ([SEA], "0", FAST, r"layer must be a decoder layer index in 0\.\.1; got '0'"),
        (SEA, 0, FAST, "not one; wrap it"),
        ([], 0, FAST, "edits is empty"),
    ],
)
def test_bad_requests_and_layers_are_refused_by_name_and_nothing_changes(tiny_bridge, edits, layer, options, message):
    before = _snapshot(tiny_bridge)
    with pytest.raises(InputError, match=message):
        with knowledge_edit(tiny_bridge, edits, layer, options):
            pytest.fail("entered the block")
    with pytest.raises(InputError, match=message):
        apply_edits(tiny_bridge, edits, layer, options)
    assert _changed(tiny_bridge, before) == []


def test_a_plain_hf_model_needs_its_tokenizer_and_chat_needs_a_template(tiny_hf):
    hf, tok = tiny_hf
    before = _snapshot(hf)
    with pytest.raises(InputError, match="tokenizer=tok"):
        apply_edits(hf, [SEA], 0, FAST)
    tok.chat_template = None
    with pytest.raises(InputError, match="chat template"):
        apply_edits(hf, [SEA], 0, RomeOptions(chat=True, stats_texts=STATS), tokenizer=tok)
    assert _changed(hf, before) == []


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1))


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=2, num_experts_per_tok=1))


class _Block(nn.Module):
    def __init__(self, out: nn.Module, name: str) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.add_module(name, out)


class _Toy(nn.Module):
    """A decoder-shaped module whose MLP output is named or built in a way ROME cannot read."""

    def __init__(self, out: nn.Module, name: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(out, name)])


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (_mixtral, "MLP output projection of layer 0 in MixtralForCausalLM.*mixtures of experts"),
        (_qwen2_moe, "MLP output projection of layer 0 in Qwen2MoeForCausalLM.*mixtures of experts"),
        (lambda: _Toy(nn.Linear(8, 8), "wo"), "MLP output projection of layer 0 in _Toy: none of its weights"),
        (lambda: _Toy(_Scale(), "down_proj"), "layers.0.mlp.down_proj.weight belongs to a _Scale, not an nn.Linear"),
    ],
    ids=["mixtral", "qwen2_moe", "unknown_name", "not_linear"],
)
def test_an_mlp_output_that_cannot_be_located_is_refused_by_name(tiny_hf, build, message):
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(InputError, match=message):
        apply_edits(model, [SEA], 0, FAST, tokenizer=tiny_hf[1])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_bridge_processed_by_compatibility_mode_is_refused(tiny_bridge):
    # Its forward pass runs on folded copies: the checkpoint's projection is never called (was a bare KeyError).
    tiny_bridge.enable_compatibility_mode()
    before = _snapshot(tiny_bridge.original_model)
    with pytest.raises(InputError, match="enable_compatibility_mode"):
        apply_edits(tiny_bridge, [SEA], 0, FAST)
    assert _changed(tiny_bridge.original_model, before) == []


def test_rome_options_are_checked_on_construction():
    for bad, message in [
        (dict(steps=0), "steps"), (dict(steps=True), "steps"), (dict(lr=0.0), "lr"),
        (dict(kl_factor=float("nan")), "kl_factor"), (dict(max_loss=-1.0), "max_loss"), (dict(contexts=()), "contexts"),
        (dict(contexts="Here is a note. "), "contexts"), (dict(stats_texts="one text"), "stats_texts"),
        (dict(stats_texts=()), "stats_texts"),
    ]:
        with pytest.raises(InputError, match=message):
            RomeOptions(**bad)
    assert RomeOptions(contexts=["", "A note. "], stats_texts=iter(STATS)).stats_texts == STATS


# ---- model families ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    from model_families import build_family_dir

    return cache(lambda name: build_family_dir(name, tmp_path_factory.mktemp(name) / "model"))


@pytest.mark.parametrize("name", ["llama2", "mistral", "llama3", "qwen2", "gemma2", "gpt2", "phi3"])
def test_mlp_output_finds_each_familys_projection(family_dir, name):
    hf, _ = sa_lens.load_hf_model(family_dir(name))
    gpt2 = name == "gpt2"
    for layer in range(decoder_layer_count(hf)):
        site = mlp_output(hf, layer)
        assert site.name == (f"transformer.h.{layer}.mlp.c_proj.weight" if gpt2 else
                             f"model.layers.{layer}.mlp.down_proj.weight")
        assert site.transposed is gpt2 and type(site.module).__name__ == ("Conv1D" if gpt2 else "Linear")
        assert site.weight is checkpoint_parameters(hf)[site.name]
        assert site.d_key == site.update(torch.zeros(hf.config.hidden_size, site.d_key)).shape[0 if gpt2 else 1]


@pytest.mark.parametrize(("name", "bridge"), [("gpt2", True), ("gpt2", False), ("llama3", False)])
def test_a_rome_edit_on_a_family_changes_exactly_that_weight(family_dir, name, bridge):
    # Llama-3 as a plain HF model only: its 128k-token vocabulary makes each step slow, and the bridge path is the
    # same code (covered on GPT-2's Conv1D here and on the tiny Llama above).
    model, tok = (sa_lens.load_model(family_dir(name)), None) if bridge else sa_lens.load_hf_model(family_dir(name))
    site = mlp_output(model, 1)
    assert site.transposed is (name == "gpt2")
    before = _snapshot(model)
    quick = RomeOptions(steps=3, max_loss=100.0, contexts=("", "Here is a short note. "), stats_texts=STATS)
    results = apply_edits(model, [EditRequest("Tell me about {}", "the sea", " blue", id=name)], 1, quick,
                          tokenizer=tok)
    assert _changed(model, before) == [site.name]
    assert results[0].loss < results[0].loss_start


# ---- key statistics ------------------------------------------------------------------------------------------


@pytest.fixture()
def passes(monkeypatch) -> list[int]:
    """One entry per batch the key statistics are computed over (reading a cached estimate adds none)."""
    calls: list[int] = []
    real = edit_stats.tokenize_padded

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(edit_stats, "tokenize_padded", counting)
    return calls


def test_key_statistics_are_computed_once_per_layer_and_shared_by_sequential_edits(tiny_bridge, passes):
    apply_edits(tiny_bridge, [SEA], 0, FAST)
    assert len(passes) == 1
    assert len(list((Path(sa_lens.models.cache_dir()) / "rome_stats").glob("*.safetensors"))) == 1
    apply_edits(tiny_bridge, [SKY], 0, FAST)  # layer 0's projection changed: not part of the key
    assert len(passes) == 1
    edit_stats._MEMO.clear()
    with knowledge_edit(tiny_bridge, [SEA], 0, FAST):  # read from the file cache
        pass
    assert len(passes) == 1


def test_key_statistics_are_recomputed_for_another_layer_corpus_or_changed_earlier_weights(tiny_bridge, passes):
    with knowledge_edit(tiny_bridge, [SEA], 1, FAST):
        pass
    assert len(passes) == 1
    with knowledge_edit(tiny_bridge, [SEA], 0, FAST):
        pass
    assert len(passes) == 2
    with knowledge_edit(tiny_bridge, [SEA], 1, RomeOptions(steps=15, stats_texts=STATS[:3])):
        pass
    assert len(passes) == 3
    params = checkpoint_parameters(tiny_bridge)
    with torch.no_grad():
        params["model.layers.1.mlp.up_proj.weight"].mul_(1.5)  # after layer 0's keys: same estimate
    with knowledge_edit(tiny_bridge, [SEA], 0, FAST):
        pass
    assert len(passes) == 3
    with torch.no_grad():
        params["model.layers.0.self_attn.q_proj.weight"].mul_(1.5)  # shapes layer 1's keys
    with knowledge_edit(tiny_bridge, [SEA], 1, FAST):
        pass
    assert len(passes) == 4


def test_key_statistics_stop_at_the_edited_layer_and_equal_a_full_pass(tiny_hf):
    hf, tok = tiny_hf
    site = mlp_output(hf, 0)
    later: list[int] = []
    handle = hf.model.layers[1].register_forward_hook(lambda *args: later.append(1))
    try:
        mom2, count = edit_stats.key_second_moment(hf, tok, site, STATS, progress=False)
    finally:
        handle.remove()
    assert later == []  # layer 1 and the LM head never ran
    keys: list[torch.Tensor] = []
    handle = site.module.register_forward_pre_hook(lambda _m, args: keys.append(args[0][0].double()))
    try:
        with torch.no_grad():
            for text in STATS:  # one text per pass: no padding
                hf(input_ids=torch.tensor(token_ids(tok, [text])))
    finally:
        handle.remove()
    k = torch.cat(keys)
    assert count == k.shape[0] and mom2.shape == (site.d_key, site.d_key) and mom2.dtype == torch.float32
    ref = (k.T @ k / count).float()  # batched vs one-by-one: float32 rounding differs slightly
    torch.testing.assert_close(mom2, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_the_cache_key_leaves_out_only_the_edited_projection(tiny_hf):
    hf, _ = tiny_hf
    site = mlp_output(hf, 0)
    params = checkpoint_parameters(hf)
    key = edit_stats._weights_digest(hf, site)
    with torch.no_grad():
        params["model.layers.0.mlp.down_proj.weight"].add_(1.0)
        assert edit_stats._weights_digest(hf, site) == key
        params["model.layers.0.mlp.up_proj.weight"].add_(1.0)
        assert edit_stats._weights_digest(hf, site) != key


# ---- saving --------------------------------------------------------------------------------------------------


def test_save_edited_reloads_with_the_edited_weights_and_its_tokenizer(tiny_bridge, tmp_path):
    apply_edits(tiny_bridge, [SEA], 0, FAST)
    edited = {n: p.detach().clone() for n, p in checkpoint_parameters(tiny_bridge).items()}
    out = save_edited(tiny_bridge, tmp_path / "edited")
    assert (out / "tokenizer_config.json").is_file() and (out / "tokenizer.json").is_file()
    bridge, (hf, tok) = sa_lens.load_model(out), sa_lens.load_hf_model(out)
    for model in (bridge, hf):
        got = checkpoint_parameters(model)
        assert got.keys() == edited.keys()
        assert all(torch.equal(got[n], edited[n]) for n in edited)
    assert edit_scores(bridge, [SEA])[0]["efficacy"] == edit_scores(hf, [SEA], tokenizer=tok)[0]["efficacy"] == 1.0


def test_save_edited_of_a_plain_hf_model_needs_its_tokenizer(tiny_hf, tmp_path):
    hf, tok = tiny_hf
    with pytest.raises(InputError, match="tokenizer"):
        save_edited(hf, tmp_path / "x")
    assert (save_edited(hf, tmp_path / "y", tokenizer=tok) / "tokenizer.json").is_file()


# ---- the edit area's harm vector -----------------------------------------------------------------------------


def _harm_vector(n_layers: int = 4) -> HarmVector:
    g = torch.Generator().manual_seed(0)
    deltas = {"model.embed_tokens.weight": torch.randn(10, 8, generator=g)}
    for i in range(n_layers):
        deltas[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(8, 16, generator=g)
        deltas[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
    deltas["model.norm.weight"] = torch.randn(8, generator=g)
    return HarmVector(deltas, {})


def _inside(name: str, area: tuple[int, ...]) -> bool:
    return any(f".layers.{i}." in name for i in area)


def test_edit_area_vector_paper_keeps_only_the_area_trimmed_within_it():
    hv, area = _harm_vector(), (1, 2)
    got = edit_area_vector(hv, area, top_k=0.1, variant="paper")
    assert sorted(got.deltas) == sorted(n for n in hv.deltas if _inside(n, area))
    want = hv.restrict(layers=area).trim(0.1, scope="global")
    assert all(torch.equal(got.dense(n), want.dense(n)) for n in got.deltas)
    kept, total = got.nnz, sum(hv.deltas[n].numel() for n in got.deltas)
    assert 0.1 * total <= kept <= 0.1 * total + 2  # the official rule keeps ⌊k·d⌋ + 1 (and ties)
    assert got.meta["edit_area"] == [1, 2] and got.meta["edit_area_variant"] == "paper"


def test_edit_area_vector_official_adds_the_untrimmed_vector_outside_the_area():
    hv, area = _harm_vector(), (2, 1, 1)
    paper = edit_area_vector(hv, area, top_k=0.1, variant="paper")
    got = edit_area_vector(hv, area, top_k=0.1, variant="official")
    assert got.deltas.keys() == hv.deltas.keys()
    for n in hv.deltas:
        want = paper.dense(n) if _inside(n, (1, 2)) else hv.dense(n)
        assert torch.equal(got.dense(n), want), n
    assert got.meta["edit_area"] == [1, 2] and got.meta["edit_area_variant"] == "official"
    assert paper.meta["layers"] == [1, 2] and "layers" not in got.meta  # it holds every layer, as hv does


def test_edit_area_vector_without_trim_is_the_task_vector_restricted_to_the_area():
    hv = _harm_vector()
    got = edit_area_vector(hv, [3], top_k=None)
    assert sorted(got.deltas) == sorted(n for n in hv.deltas if ".layers.3." in n)
    assert all(torch.equal(got.dense(n), hv.dense(n)) for n in got.deltas)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layers=(1,), variant="ties"), "variant must be one of \\('paper', 'official'\\); got 'ties'"),
        (dict(layers=()), "The edit area is empty"),
        (dict(layers=(7,)), "no parameter in the edit area \\[7\\]"),
        (dict(layers=(1,), top_k=0.0), "top_k"),
    ],
)
def test_edit_area_vector_refuses_a_bad_variant_an_empty_area_and_an_area_without_parameters(kwargs, message):
    with pytest.raises(InputError, match=message):
        edit_area_vector(_harm_vector(), **kwargs)


# ---- MEMIT: one batch over several layers ----------------------------------------------------------------------


@pytest.mark.parametrize("on", ["bridge", "hf"])
def test_memit_spreads_a_batch_over_its_layers_and_each_target_wins(on, tiny_bridge, tiny_hf):
    model, tok = (tiny_bridge, None) if on == "bridge" else tiny_hf
    before = _snapshot(model)
    assert [s["efficacy"] for s in edit_scores(model, [SEA, SKY], tokenizer=tok)] == [0.0, 0.0]
    with knowledge_edit(model, [SEA, SKY], (0, 1), FAST, method="memit", tokenizer=tok) as results:
        assert _changed(model, before) == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
        scores = edit_scores(model, [SEA, SKY], tokenizer=tok)
    assert [r.id for r in results] == ["sea", "sky"] and all(r.loss < r.loss_start for r in results)
    assert [s["efficacy"] for s in scores] == [1.0, 1.0]
    assert _changed(model, before) == []


def test_memit_on_a_bridge_equals_memit_on_its_hf_model(tiny_bridge, tiny_hf):
    hf, tok = tiny_hf
    with knowledge_edit(tiny_bridge, [SEA, SKY], (0, 1), FAST, method="memit"):
        on_bridge = [mlp_output(tiny_bridge, i).weight.detach().clone() for i in (0, 1)]
    with knowledge_edit(hf, [SEA, SKY], (0, 1), FAST, method="memit", tokenizer=tok):
        on_hf = [mlp_output(hf, i).weight.detach().clone() for i in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(on_bridge, on_hf))


@pytest.mark.parametrize(("layer", "method", "message"), [
    ((0, 1), "rome", "ROME edits one layer"),
    ((0, 0), "memit", "distinct"),
    ((), "memit", "at least one"),
    (0, "mend", "method must be one of"),
    ((0, 2), "memit", "layer must be a decoder layer index in 0..1"),
])
def test_bad_layers_or_method_are_refused_before_anything_changes(tiny_bridge, layer, method, message):
    before = _snapshot(tiny_bridge)
    with pytest.raises(InputError, match=message):
        apply_edits(tiny_bridge, [SEA], layer, FAST, method=method)
    assert _changed(tiny_bridge, before) == []


def test_a_memit_batch_that_does_not_converge_applies_nothing(tiny_bridge):
    before = _snapshot(tiny_bridge)
    with pytest.raises(ConvergenceError, match=r"edit 'far' did not converge at the residual stream after layer 1"):
        apply_edits(tiny_bridge, [SEA, FAR], (0, 1), FAST, method="memit")
    assert _changed(tiny_bridge, before) == []


# ---- found by review: the subject's token under templates that trim, and the row forms ---------------------------


@pytest.mark.parametrize("name", ["gemma2", "qwen2", "mistral"])
def test_the_key_sits_on_the_subject_when_the_template_trims_the_users_text(family_dir, name):
    # Gemma-2's and Mistral's templates trim the user's message, Qwen2's does not: a question read from a CSV with a
    # trailing space put the key in the template header before, without any error.
    from sa_lens.editing import _batch

    _, tok = sa_lens.load_hf_model(family_dir(name))
    request = EditRequest.from_row({"question": "  What is bullying? ", "answer": "Repeated aggression.",
                                    "subject": "bullying"})
    b = _batch(tok, request, RomeOptions(chat=True), "cpu")
    for row in range(b.n_rewrite):
        upto = tok.decode(b.ids[row, : b.lookup[row] + 1])
        assert upto.endswith("bullying"), (name, row, upto[-40:])


def test_rome_options_read_integers_as_the_same_config_as_floats():
    assert RomeOptions(lr=1, max_loss=2) == RomeOptions(lr=1.0, max_loss=2.0)
    assert type(RomeOptions(lr=1).lr) is float


def test_a_damaged_statistics_file_is_recomputed(tiny_hf, tmp_path):
    hf, tok = tiny_hf
    site = mlp_output(hf, 0)
    first, n = edit_stats.key_second_moment(hf, tok, site, STATS, progress=False)
    (path,) = (tmp_path / "cache" / "rome_stats").glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # a run killed mid-copy, a full disk
    edit_stats._MEMO.clear()
    again, n_again = edit_stats.key_second_moment(hf, tok, site, STATS, progress=False)
    assert torch.equal(first, again) and n == n_again
    assert edit_stats.load_file(str(path))["mom2"].shape == first.shape  # rewritten whole


def test_the_official_variant_refuses_an_already_restricted_harm_vector():
    hv = HarmVector({"model.layers.0.mlp.down_proj.weight": torch.ones(2, 2),
                     "model.layers.3.mlp.down_proj.weight": torch.ones(2, 2)}).restrict(layers=[0])
    with pytest.raises(InputError, match="needs the whole τH"):
        edit_area_vector(hv, (0,), 0.5, variant="official")
