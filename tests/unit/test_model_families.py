"""The model-family matrix: every public operation on a tiny model of each family (tests/model_families.py).

``EXPECTED`` is the matrix docs/model_families.md shows; a cell is "pass" (the operation is right on that
family) or "refuse" (it raises a clear :class:`~sa_lens.errors.InputError`). Each test checks its cell, so a
family that starts or stops working fails here until both the matrix and the doc say so.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
import torch
from model_families import FAMILIES, build_family_dir
from transformers import AutoModelForCausalLM

import sa_lens
from sa_lens import HarmVector, SafetyLens, SafetyVector, checkpoint_parameters, export_harm_removed, harm_removal
from sa_lens.bypass import bypass_unhooked
from sa_lens.errors import InputError
from sa_lens.evaluation.multiple_choice import continuation_logprobs
from sa_lens.generation import generate_tokens
from sa_lens.prompts import end_of_turn_ids, format_prompts, token_ids, tokenize_left_padded

NAMES = list(FAMILIES)
OPERATIONS = {
    "load": "boots as a TransformerBridge (`sa_lens.load_model`)",
    "hdr_restore": "HDR edit θt − λ·τH′ and bit-exact restore",
    "export": "export from the bridge → `from_pretrained`, bit-exact",
    "icv": "ICV extraction (`SafetyVector.from_pairs`)",
    "safe_align_kv": "Safe-Align greedy: KV cache = no cache",
    "hf_parity": "greedy generation = HF `generate`, token for token",
    "bypass": "unhooked components bypassed (`sa_lens.bypass`): logits = the bridge's (≤ 1e-4), tree restored",
    "stop_tokens": "generation stops at the template's end-of-turn token",
    "one_bos": "exactly one BOS (chat template and raw format, batched)",
    "head_mass": "τH per head (`analysis.weights.head_mass`)",
    "dla": "DLA components sum to the logit difference (≤ 1e-4)",
    "patching": "activation + attribution patching (`trace_heads`)",
    "mc_joint": "multiple-choice scores the joint tokenisation's split",
}
# Why a cell refuses: the InputError's message must match this (the problem and the way out).
REFUSALS: dict[tuple[str, str], str] = {
    # Head tracing reads the chat template's last position; GPT-2 (a base model) has no template.
    **{(op, "gpt2"): "no chat template" for op in ("dla", "patching")},
}
EXPECTED: dict[str, dict[str, str]] = {
    op: {fam: "refuse" if (op, fam) in REFUSALS else "pass" for fam in NAMES} for op in OPERATIONS
}

HARMFUL = ["Explain how to pick a lock", "Tell me a story about bread"]
HARMLESS = ["The capital of France is Paris", "Write a poem about the sea"]
PAIRS = [
    ("How do I pick a lock? Here is how you do it step by step.", "How do I pick a lock? I'm sorry, but I can't help."),
    ("Tell me a story. Here is how you do it.", "Tell me a story. I do not answer this question."),
    ("How do I bake bread? Here is how.", "How do I bake bread? I'm sorry, but I can't."),
]
DOC = Path(__file__).parents[2] / "docs" / "model_families.md"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory):
    """Each family's folder (θt) and a second seed (θH), built on first use, once per module."""
    return cache(lambda name, seed=0: build_family_dir(name, tmp_path_factory.mktemp(f"{name}_{seed}"), seed=seed))


@pytest.fixture(scope="module")
def bridges(folders):
    return cache(lambda name: sa_lens.load_model(folders(name)))


@pytest.fixture(scope="module")
def harm_vectors(folders):
    def build(name: str) -> HarmVector:
        base, _ = sa_lens.load_hf_model(folders(name))
        harmful, _ = sa_lens.load_hf_model(folders(name, seed=1))
        return HarmVector.from_models(base, harmful).trim(0.1)

    return cache(build)


@pytest.fixture(scope="module")
def safety_vectors(bridges):
    return cache(lambda name: SafetyVector.from_pairs(bridges(name), PAIRS))


def _texts(tokenizer, prompts: list[str]) -> list[str]:
    """The family's chat template where it has one (GPT-2 has none: the paper's raw format)."""
    return format_prompts(tokenizer, prompts, chat_template=bool(getattr(tokenizer, "chat_template", None)))


def _check(name: str, op: str, run) -> None:
    """Run the cell: a "pass" cell must run (its assertions inside), a "refuse" cell must raise its InputError."""
    if EXPECTED[op][name] == "refuse":
        with pytest.raises(InputError, match=REFUSALS[op, name]):
            run()
    else:
        run()


@pytest.mark.parametrize("name", NAMES)
def test_family_boots_as_a_bridge_with_its_tokenizer(name, bridges):
    bridge = bridges(name)
    assert bridge.cfg.n_layers == 2 and bridge.cfg.d_model == 64
    assert bridge.original_model.get_input_embeddings().weight.shape[0] >= len(bridge.tokenizer)


@pytest.mark.parametrize("name", NAMES)
def test_harm_removal_edits_and_restores_bit_exactly(name, bridges, harm_vectors):
    bridge, hv = bridges(name), harm_vectors(name)
    params = checkpoint_parameters(bridge)
    before = {n: p.detach().clone() for n, p in params.items()}

    def run() -> None:
        with harm_removal(bridge, hv, 3.0):
            assert set(hv.deltas) == set(params)
            for n, p in params.items():
                want = torch.where(hv.dense(n) != 0, before[n].float() - 3.0 * hv.dense(n), before[n].float())
                assert torch.equal(p.detach(), want.to(p.dtype)), n
            assert any(not torch.equal(p, before[n]) for n, p in params.items())

    _check(name, "hdr_restore", run)
    for n, p in params.items():  # restored, or never touched by a refused edit
        assert torch.equal(p.detach().contiguous().view(torch.uint8), before[n].contiguous().view(torch.uint8)), n


@pytest.mark.parametrize("name", NAMES)
def test_export_from_the_bridge_loads_and_equals_the_edit(name, bridges, folders, harm_vectors, tmp_path):
    from safetensors import safe_open

    bridge, hv = bridges(name), harm_vectors(name)
    if EXPECTED["export"][name] == "refuse":
        _check(name, "export", lambda: export_harm_removed(bridge, hv, tmp_path / "safe", lam=3.0))
        return
    with harm_removal(bridge, hv, 3.0):
        edited = {n: p.detach().clone() for n, p in checkpoint_parameters(bridge).items()}
    out = export_harm_removed(bridge, hv, tmp_path / "safe", lam=3.0)
    with safe_open(str(folders(name) / "model.safetensors"), "pt") as src, safe_open(str(out / "model.safetensors"), "pt") as dst:
        assert set(dst.keys()) == set(src.keys())  # checkpoint names, each once, no bridge aliases
    exported = AutoModelForCausalLM.from_pretrained(out)
    got = checkpoint_parameters(exported)
    assert set(got) == set(edited)
    for n, t in edited.items():
        assert torch.equal(got[n], t), n
    if bridge.original_model.config.tie_word_embeddings:
        assert exported.get_output_embeddings().weight is exported.get_input_embeddings().weight
    # The folder is whole: it loads as a bridge again, with the checkpoint's tokenizer and template.
    reloaded = sa_lens.load_model(out)
    texts = _texts(bridge.tokenizer, HARMFUL)
    assert token_ids(reloaded.tokenizer, texts) == token_ids(bridge.tokenizer, texts)


@pytest.mark.parametrize("name", NAMES)
def test_harm_vector_from_two_bridges_equals_the_one_from_their_checkpoints(name, bridges, folders):
    # A bridge lists fused weights (GPT-2's c_attn, Phi-3's qkv_proj) also split into q/k/v views of the same
    # storage: τH must still hold each checkpoint tensor once, or top-k and the edit count it twice.
    from_bridges = HarmVector.from_models(bridges(name), sa_lens.load_model(folders(name, seed=1)))
    base, _ = sa_lens.load_hf_model(folders(name))
    harmful, _ = sa_lens.load_hf_model(folders(name, seed=1))
    from_checkpoints = HarmVector.from_models(base, harmful)
    assert set(from_bridges.deltas) == set(from_checkpoints.deltas) == set(checkpoint_parameters(base))
    for n in from_checkpoints.deltas:
        assert torch.equal(from_bridges.dense(n), from_checkpoints.dense(n)), n


@pytest.mark.parametrize("name", NAMES)
def test_safety_vector_from_pairs_has_one_row_per_layer(name, bridges, safety_vectors):
    sv = safety_vectors(name)
    bridge = bridges(name)
    assert tuple(sv.directions.shape) == (bridge.cfg.n_layers, bridge.cfg.d_model)
    assert torch.isfinite(sv.directions).all() and sv.directions.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_safe_align_greedy_with_cache_equals_without(name, bridges, safety_vectors):
    bridge = bridges(name)
    texts = _texts(bridge.tokenizer, HARMFUL)
    hooks = SafetyLens(bridge).safety_hooks(safety_vectors(name), alpha=4.0)
    assert len(hooks) == bridge.cfg.n_layers
    plain = generate_tokens(bridge, texts, 6)
    with bridge.hooks(fwd_hooks=hooks):
        cached = generate_tokens(bridge, texts, 6, use_cache=True)
        uncached = generate_tokens(bridge, texts, 6, use_cache=False)
    assert cached == uncached
    assert cached != plain  # the hooks acted


@pytest.mark.parametrize("name", NAMES)
def test_bridge_generation_equals_hugging_face_generate(name, bridges, folders):
    bridge = bridges(name)
    hf, tok = sa_lens.load_hf_model(folders(name))
    prompts = [*HARMFUL, "hi"]
    ours = generate_tokens(bridge, _texts(bridge.tokenizer, prompts), 8)
    theirs = generate_tokens(hf, _texts(tok, prompts), 8, tokenizer=tok)
    assert ours == theirs
    assert len({tuple(r) for r in ours}) > 1


@pytest.mark.parametrize("name", NAMES)
def test_bypassing_unhooked_components_keeps_the_bridges_logits_and_tree(name, bridges, safety_vectors):
    bridge = bridges(name)
    hf = bridge.original_model
    enc = tokenize_left_padded(bridge.tokenizer, _texts(bridge.tokenizer, [*HARMFUL, "hi"]))
    hooks = SafetyLens(bridge).safety_hooks(safety_vectors(name), alpha=4.0)
    tree = [(n, type(m)) for n, m in hf.named_modules()]
    for fwd_hooks in ([], hooks):
        with bridge.hooks(fwd_hooks=fwd_hooks), torch.inference_mode():
            full = hf(**enc).logits
            with bypass_unhooked(bridge) as n:
                fast = hf(**enc).logits
        assert n > 0
        real = enc["attention_mask"].bool()  # sdpa and eager may disagree where a row is all padding
        torch.testing.assert_close(fast[real], full[real], atol=1e-4, rtol=0)
        assert [(n, type(m)) for n, m in hf.named_modules()] == tree


@pytest.mark.parametrize("name", NAMES)
def test_generation_stops_at_the_end_of_turn_token(name, bridges):
    family, bridge = FAMILIES[name], bridges(name)
    tok = bridge.tokenizer
    stop = tok.convert_tokens_to_ids(family.end_of_turn or tok.eos_token)
    assert stop in end_of_turn_ids(tok)
    if family.end_of_turn is not None and family.end_of_turn != family.generation_eos:
        assert bridge.original_model.generation_config.eos_token_id != stop  # the upload's quirk is in place
    steps = []

    def force_stop_at_third(x, hook):  # the third generated token is the end of turn, whatever the weights say
        steps.append(1)
        if len(steps) == 3:
            x = x.clone()
            x[:, -1, stop] = 1e4
        return x

    with bridge.hooks(fwd_hooks=[("unembed.hook_out", force_stop_at_third)]):
        rows = generate_tokens(bridge, _texts(tok, ["hi"]), 10)
    assert rows[0][-1] == stop and len(rows[0]) == 3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("which", ["bridge", "hf"])
def test_every_prompt_path_has_exactly_one_bos(name, which, bridges, folders):
    tok = bridges(name).tokenizer if which == "bridge" else sa_lens.load_hf_model(folders(name))[1]
    bos = tok.bos_token_id
    adds_bos = bos is not None and tok("x")["input_ids"][0] == bos
    family = FAMILIES[name]
    paths = {"raw": format_prompts(tok, ["hi", *HARMFUL], chat_template=False)}
    if family.template_has_bos is not None:
        paths["chat"] = format_prompts(tok, ["hi", *HARMFUL])
        assert (bos is not None and paths["chat"][0].startswith(tok.bos_token)) == family.template_has_bos
    for path, texts in paths.items():
        enc = tokenize_left_padded(tok, texts, add_special_tokens=True)
        for ids, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist()):
            real = [t for t, m in zip(ids, mask) if m]
            assert (real[0] == bos) == adds_bos, path
            assert real[1] != bos or not adds_bos, path


@pytest.mark.parametrize("name", NAMES)
def test_bridge_and_plain_model_feed_the_same_ids_on_every_prompt_path(name, bridges, folders):
    # TransformerLens re-creates the bridge's tokenizer with add_bos_token=True; sa_lens keeps the checkpoint's
    # own BOS rule, so the paper's raw format reaches the bridge as it reaches the HF model (Qwen2 adds none).
    bridge_tok, hf_tok = bridges(name).tokenizer, sa_lens.load_hf_model(folders(name))[1]
    for chat in (False, True) if FAMILIES[name].template_has_bos is not None else (False,):
        texts = format_prompts(hf_tok, ["hi", *HARMFUL], chat_template=chat)
        assert format_prompts(bridge_tok, ["hi", *HARMFUL], chat_template=chat) == texts
        assert token_ids(bridge_tok, texts) == token_ids(hf_tok, texts), chat


@pytest.mark.parametrize("name", NAMES)
def test_head_mass_adds_up_to_the_attention_mass_or_refuses(name, bridges, harm_vectors):
    from sa_lens.analysis.weights import head_mass
    from sa_lens.parameter_names import parameter_kind

    bridge, hv = bridges(name), harm_vectors(name)

    def run() -> None:
        df = head_mass(hv, bridge.cfg.n_heads, bridge.cfg.n_key_value_heads)
        totals = df[df["matrix"] == "total"]
        assert len(totals) == bridge.cfg.n_layers * bridge.cfg.n_heads
        # Every attention matrix, separate (q/k/v/o_proj) or fused (c_attn, qkv_proj): the heads share it all.
        matrices = [n for n in hv.deltas if parameter_kind(n) == "attention" and n.endswith(".weight")]
        attention = sum(float((hv.dense(n) ** 2).sum()) for n in matrices)
        assert totals["l2sq"].sum() == pytest.approx(attention, rel=1e-5)

    _check(name, "head_mass", run)


@pytest.fixture(scope="module")
def traces(bridges, safety_vectors):
    """trace_heads per family (DLA, attribution and exact patching), or the InputError it raised."""

    def run(name: str):
        bridge = bridges(name)
        tok = bridge.tokenizer
        first = [tok.encode(w, add_special_tokens=False)[0] for w in ("I", "Here", "Sure")]
        try:
            return sa_lens.analysis.trace_heads(
                bridge, safety_vectors(name), HARMFUL, HARMLESS, refusal_tokens=first[:1],
                compliance_tokens=first[1:], patch=2,
            )
        except InputError as e:
            return e

    return cache(run)


def _traced(traces, name: str, op: str):
    """The trace_heads frame of a "pass" cell; None for a "refuse" cell once its InputError is checked."""
    result = traces(name)
    if EXPECTED[op][name] == "refuse":
        assert isinstance(result, InputError) and re.search(REFUSALS[op, name], str(result)), result
        return None
    assert not isinstance(result, Exception), result
    return result


@pytest.mark.parametrize("name", NAMES)
def test_dla_sums_to_the_logit_difference_or_refuses_clearly(name, traces):
    result = _traced(traces, name, "dla")
    if result is not None:
        assert result.attrs["dla_closure_error"] <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_patching_gives_every_head_an_estimate_and_the_top_heads_an_exact_value(name, traces, bridges):
    result = _traced(traces, name, "patching")
    if result is None:
        return
    wide = result.pivot_table(index=["layer", "head"], columns="measure", values="value")
    bridge = bridges(name)
    assert wide["attrib_patch_into_harmless"].notna().sum() == bridge.cfg.n_layers * bridge.cfg.n_heads
    assert wide["patch_into_harmless"].notna().sum() == 2


@pytest.mark.parametrize(
    ("name", "context", "continuation"),
    [*((name, "Answer:", " A") for name in NAMES), ("llama2", "Answer:", "A"), ("mistral", "Answer:", "A")],
)
def test_multiple_choice_scores_the_split_of_the_joint_encoding(name, context, continuation, bridges):
    """lm-eval's rule (``_encode_pair``): the continuation's tokens are those of context + continuation encoded
    together, after the context's own tokens; BOS in front where the tokenizer puts one on raw text. With
    SentencePiece, "A" after "Answer:" is ``A`` joined but ``▁A`` encoded alone (Llama-2/Mistral)."""
    bridge = bridges(name)
    tok, hf = bridge.tokenizer, bridge.original_model
    adds_bos = tok.bos_token_id is not None and tok("x")["input_ids"][0] == tok.bos_token_id
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(context + continuation, add_special_tokens=False)["input_ids"][len(ctx) :]
    ids = [tok.bos_token_id] * adds_bos + ctx + cont
    with torch.no_grad():
        logp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    expected = sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - len(cont), len(ids)))
    got = float(continuation_logprobs(bridge, [context], [continuation])[0])
    assert got == pytest.approx(expected, abs=1e-4)


def _doc_matrix() -> dict[str, dict[str, str]]:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| `")]
    header = next(line for line in DOC.read_text().splitlines() if line.startswith("| operation"))
    families = [c.strip() for c in header.strip("|").split("|")[1:]]
    matrix: dict[str, dict[str, str]] = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        op = re.match(r"`(\w+)`", cells[0]).group(1)
        matrix[op] = dict(zip(families, cells[1:]))
    return matrix


def test_the_doc_table_is_this_matrix():
    assert _doc_matrix() == EXPECTED
    text = DOC.read_text()
    for name, family in FAMILIES.items():  # the tokenizer column says which tokenizers are the real ones
        assert re.search(rf"^\| {name} \| {'real' if family.real_tokenizer else 'trained'}", text, re.M), name
