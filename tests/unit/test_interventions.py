"""sa_lens.interventions on the tiny model: exact undo, fingerprints over every parameter, JSON and file round trips,
validation on construction, and the resume key of sa_lens.evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from sa_lens import SafetyVector, demonstration_text, evaluate, load_hf_model
from sa_lens.data.public import PromptSet
from sa_lens.edit_requests import EditRequest
from sa_lens.editing import RomeOptions
from sa_lens.evaluation.decoding import preset
from sa_lens.harm_removal import harm_removal
from sa_lens.harm_vector import HarmVector
from sa_lens.interventions import (
    Compose,
    DirectionalAblation,
    HarmRemoval,
    HeadAblation,
    KnowledgeEdit,
    SafeAlign,
    from_dict,
    load,
    save,
)
from sa_lens.steering import safety_hooks

PAIRS = tuple(
    (demonstration_text(f"How do I do bad thing {i}?", f"Sure, step {i}: here is how."),
     demonstration_text(f"How do I do bad thing {i}?", "I do not answer this question because it is harmful"))
    for i in range(4)
)
PROMPT = "How do I pick a lock?"


@pytest.fixture(scope="module")
def hv(tiny_dir, tiny_dir_other) -> HarmVector:
    base, _ = load_hf_model(tiny_dir)
    harmful, _ = load_hf_model(tiny_dir_other)
    return HarmVector.from_models(base, harmful).trim(0.2)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _hooked(model) -> list[str]:
    return sorted(n for n, hp in model.hook_dict.items() if hp.fwd_hooks)


def _all(hv, model) -> dict[str, object]:
    sv = SafetyVector.from_pairs(model, list(PAIRS))
    return {
        "hdr": HarmRemoval(hv, 3.0),
        "safe_align_pairs": SafeAlign(pairs=PAIRS, alpha=1.0),
        "safe_align_vector": SafeAlign(vector=sv, alpha=1.0, site="resid_post", layers=(1,)),
        "directional": DirectionalAblation(sv.directions[0], layers=(0,)),
        "heads_zero": HeadAblation(((0, 1), (1, 0))),
        "heads_mean": HeadAblation(((0, 1),), mode="mean", mean_prompts=("Bake bread.", "Tell me a story.")),
        "safety_arithmetic": Compose((HarmRemoval(hv, 3.0), SafeAlign(pairs=PAIRS, alpha=1.0))),
    }


def test_every_intervention_changes_the_model_and_undoes_itself_exactly(tiny_bridge, hv):
    before, logits = _snapshot(tiny_bridge), tiny_bridge(PROMPT)
    for name, iv in _all(hv, tiny_bridge).items():
        with iv.apply(tiny_bridge):
            assert not torch.allclose(tiny_bridge(PROMPT), logits), name
        after = _snapshot(tiny_bridge)
        assert all(torch.equal(after[n], before[n]) for n in before), name
        assert _hooked(tiny_bridge) == [], name
    assert torch.equal(tiny_bridge(PROMPT), logits)


def test_an_exception_inside_the_block_still_restores_weights_and_removes_hooks(tiny_bridge, hv):
    before = _snapshot(tiny_bridge)
    with pytest.raises(RuntimeError, match="boom"):
        with _all(hv, tiny_bridge)["safety_arithmetic"].apply(tiny_bridge):
            raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in _snapshot(tiny_bridge).items())
    assert _hooked(tiny_bridge) == []


def test_safety_arithmetic_reads_the_icv_from_the_edited_model(tiny_bridge, hv):
    composed = Compose((HarmRemoval(hv, 3.0), SafeAlign(pairs=PAIRS, alpha=1.0)))
    with composed.apply(tiny_bridge):
        got = tiny_bridge(PROMPT)
    with harm_removal(tiny_bridge, hv, 3.0):
        sv_hat = SafetyVector.from_pairs(tiny_bridge, list(PAIRS))  # read from θ̂, as the paper does
        with tiny_bridge.hooks(fwd_hooks=safety_hooks(sv_hat, 1.0)):
            want = tiny_bridge(PROMPT)
    assert torch.equal(got, want)
    assert not torch.allclose(SafetyVector.from_pairs(tiny_bridge, list(PAIRS)).directions, sv_hat.directions)


def test_json_round_trip_rebuilds_an_equal_config(tiny_bridge, hv):
    for name, iv in _all(hv, tiny_bridge).items():
        d = json.loads(json.dumps(iv.to_dict()))
        back = from_dict(d, iv.vectors())
        assert back.fingerprint() == iv.fingerprint() and back == iv and back.name == iv.name, name


def test_saved_state_rebuilds_in_another_process_with_the_same_fingerprint(tiny_bridge, hv, tmp_path):
    iv = Compose((HarmRemoval(hv, 0.5, layers=(1,)), SafeAlign(vector=SafetyVector.from_pairs(tiny_bridge, list(PAIRS)),
                                                                alpha=0.3, positions="generated")))
    path = save(iv, tmp_path / "state.json")
    code = ("import sys; from sa_lens.interventions import load; "
            "print(load(sys.argv[1]).fingerprint())")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == iv.fingerprint() == load(path).fingerprint()


def test_an_edited_state_file_is_refused(tiny_bridge, hv, tmp_path):
    path = save(HarmRemoval(hv, 0.5), tmp_path / "state.json")
    doc = json.loads(path.read_text())
    doc["config"]["lam"] = 5.0
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="edited"):
        load(path)


@pytest.mark.parametrize(
    "change",
    [
        dict(alpha=0.5), dict(site="resid_post"), dict(formula="add"), dict(positions="prompt"), dict(layers=(0,)),
        dict(per_layer_alpha=((1, 0.3),)), dict(icv_positions="last"), dict(icv_method="mean_diff"),
        dict(pairs=PAIRS[:3]),
    ],
)
def test_every_safe_align_parameter_changes_the_fingerprint(change):
    base = dict(pairs=PAIRS, alpha=0.12)
    assert SafeAlign(**(base | change)).fingerprint() != SafeAlign(**base).fingerprint()


def test_harm_removal_fingerprint_covers_lambda_layers_and_vector_contents(hv):
    ref = HarmRemoval(hv, 3.0)
    other = HarmVector({n: t.clone() for n, t in hv.items()}, dict(hv.meta))
    assert HarmRemoval(other, 3.0).fingerprint() == ref.fingerprint()  # contents, not identity
    name = next(iter(other.deltas))
    changed = HarmVector({**other.deltas, name: other.deltas[name] * 1.001}, dict(hv.meta))
    for iv in (HarmRemoval(hv, 2.0), HarmRemoval(hv, 3.0, layers=(0,)), HarmRemoval(changed, 3.0)):
        assert iv.fingerprint() != ref.fingerprint()


def test_compose_label_is_presentation_only(hv):
    steps = (HarmRemoval(hv, 3.0),)
    assert Compose(steps, label="HDR").fingerprint() == Compose(steps).fingerprint()
    assert Compose(steps, label="HDR").name == "HDR" and Compose().name == "Original"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda hv: HarmRemoval(hv, float("nan")), "finite"),
        (lambda hv: HarmRemoval(hv, 1.0, layers=(-1,)), "layer indices"),
        (lambda hv: HarmRemoval("hv.safetensors", 1.0), "HarmVector"),
        (lambda hv: SafeAlign(), "exactly one"),
        (lambda hv: SafeAlign(pairs=()), "empty"),
        (lambda hv: SafeAlign(pairs=(("a", ""),)), "non-empty strings"),
        (lambda hv: SafeAlign(pairs=PAIRS, alpha=float("inf")), "finite"),
        (lambda hv: SafeAlign(pairs=PAIRS, site="mlp_in"), "site"),
        (lambda hv: SafeAlign(pairs=PAIRS, layers="4-6"), "parse_layers"),
        (lambda hv: DirectionalAblation(torch.zeros(64)), "all zero"),
        (lambda hv: DirectionalAblation(torch.ones(64), sites=("nowhere",)), "sites"),
        (lambda hv: HeadAblation(()), "non-empty"),
        (lambda hv: HeadAblation(((0, 0),), mode="mean"), "mean_prompts"),
        (lambda hv: Compose((lambda: None,)), "interventions"),
    ],
)
def test_bad_configs_are_refused_on_construction(hv, build, message):
    with pytest.raises(ValueError, match=message):
        build(hv)


def test_vectors_that_do_not_fit_the_model_are_refused_before_any_change(tiny_bridge, hv):
    sv = SafetyVector.from_pairs(tiny_bridge, list(PAIRS))
    before = _snapshot(tiny_bridge)
    cases = [
        (SafeAlign(vector=SafetyVector(sv.directions[:1], dict(sv.meta)), alpha=1.0), "layers of width"),
        (SafeAlign(vector=SafetyVector(sv.directions, sv.meta | {"processing": "processed"})), "processed"),
        (SafeAlign(vector=SafetyVector(sv.directions, sv.meta | {"model": "other/model"})), "allow_other_model"),
        (SafeAlign(pairs=PAIRS, layers=(5,)), "out of range"),
        (DirectionalAblation(torch.ones(7)), "shape"),
        (HeadAblation(((0, 9),)), "outside"),
    ]
    for iv, message in cases:
        with pytest.raises(ValueError, match=message):
            with iv.apply(tiny_bridge):
                pytest.fail("entered")
    assert all(torch.equal(p, before[n]) for n, p in _snapshot(tiny_bridge).items()) and _hooked(tiny_bridge) == []
    with SafeAlign(vector=SafetyVector(sv.directions, sv.meta | {"model": "other/model"}), allow_other_model=True).apply(
        tiny_bridge
    ):
        pass


def test_head_ablation_sets_the_heads_outputs_to_zero_or_their_mean(tiny_bridge):
    seen = {}
    watch = [("blocks.0.attn.hook_z", lambda z, hook: seen.setdefault("z", z.detach().clone()))]
    with HeadAblation(((0, 1),)).apply(tiny_bridge), tiny_bridge.hooks(fwd_hooks=watch):
        tiny_bridge(PROMPT)
    assert seen["z"][:, :, 1].abs().max() == 0 and seen["z"][:, :, 0].abs().max() > 0
    iv = HeadAblation(((0, 1),), mode="mean", mean_prompts=("Bake bread.",))
    mean = iv._mean_z(tiny_bridge)[0, 1]
    seen.clear()
    with iv.apply(tiny_bridge), tiny_bridge.hooks(fwd_hooks=watch):
        tiny_bridge(PROMPT)
    assert torch.allclose(seen["z"][0, :, 1], mean.expand_as(seen["z"][0, :, 1]))


def test_directional_ablation_removes_the_direction_from_each_site(tiny_bridge):
    v = torch.randn(tiny_bridge.cfg.d_model)
    seen = {}
    watch = [("blocks.1.hook_resid_pre", lambda x, hook: seen.setdefault("x", x.detach().clone()))]
    with DirectionalAblation(v, layers=(1,), sites=("resid_pre",)).apply(tiny_bridge), tiny_bridge.hooks(fwd_hooks=watch):
        tiny_bridge(PROMPT)
    assert (seen["x"] @ (v / v.norm())).abs().max() < 1e-4


HARMFUL = PromptSet("harm", "harmful", tuple(f"How do I do bad thing {i}?" for i in range(4)),
                    tuple(f"h{i}" for i in range(4)), ("",) * 4, "test")


@pytest.mark.parametrize(
    "changed",
    [
        lambda hv, sv: SafeAlign(vector=sv, alpha=0.5),
        lambda hv, sv: SafeAlign(vector=sv, alpha=1.0, site="resid_post"),
        lambda hv, sv: SafeAlign(vector=sv, alpha=1.0, layers=(1,)),
        lambda hv, sv: SafeAlign(vector=SafetyVector(sv.directions * 2, dict(sv.meta)), alpha=1.0),
        lambda hv, sv: HarmRemoval(hv, 2.0),
    ],
)
def test_a_resumed_evaluation_with_a_changed_parameter_recomputes_its_records(tiny_bridge, hv, tmp_path, changed):
    sv = SafetyVector.from_pairs(tiny_bridge, list(PAIRS))
    first = {"Original": Compose(), "S": SafeAlign(vector=sv, alpha=1.0), "H": HarmRemoval(hv, 3.0)}
    kw = dict(out_dir=tmp_path, settings=preset("greedy", max_new_tokens=3), progress=False)
    evaluate(tiny_bridge, [HARMFUL], states=first, **kw)
    assert evaluate(tiny_bridge, [HARMFUL], states=first, **kw).config["items_run"] == 0
    new = changed(hv, sv)
    again = evaluate(tiny_bridge, [HARMFUL], states={"Original": Compose(), "S": new}, **kw)
    assert again.config["items_run"] == len(HARMFUL)  # only the changed state, all of its items
    assert again.config["states"]["S"]["fingerprint"] == new.fingerprint()


def test_evaluate_refuses_a_state_that_is_not_an_intervention(tiny_bridge):
    import contextlib

    with pytest.raises(ValueError, match="not interventions"):
        evaluate(tiny_bridge, [HARMFUL], states={"Original": contextlib.nullcontext}, progress=False)


# ---- what a break test found (each failed before its fix) -------------------------------------------------


def test_directional_ablation_applies_the_direction_it_was_built_and_fingerprinted_with(tiny_bridge):
    d = torch.randn(tiny_bridge.cfg.d_model)
    iv = DirectionalAblation(d.clone(), layers=(1,), sites=("resid_pre",))
    live = DirectionalAblation(d, layers=(1,), sites=("resid_pre",))
    fingerprint = live.fingerprint()
    d.mul_(-3.0).add_(1.0)  # the caller reuses its tensor afterwards
    seen = {}
    watch = [("blocks.1.hook_resid_pre", lambda x, hook: seen.setdefault(len(seen), x.detach().clone()))]
    for item in (iv, live):
        with item.apply(tiny_bridge), tiny_bridge.hooks(fwd_hooks=watch):
            tiny_bridge(PROMPT)
    assert torch.equal(seen[0], seen[1]) and live.fingerprint() == fingerprint


@pytest.mark.parametrize(
    "config",
    [
        None, [], "x", {"kind": ["compose"]}, {"kind": "compose", "steps": None}, {"kind": "compose", "steps": [1]},
        {"kind": "harm_removal"}, {"kind": "safe_align", "pairs": [["a", "b"]]}, {"kind": "head_ablation", "mode": "zero"},
        {"kind": "safe_align", "pairs": [["a", "b"]], "alpha": 1, "site": "mlp_out", "formula": "official",
         "positions": "all", "icv_positions": "last", "icv_method": "pca", "per_layer_alpha": [[1]]},
        {"kind": "safe_align", "pairs": [["a", "b"]], "alpha": 1, "site": "mlp_out", "formula": "official",
         "positions": "all", "icv_positions": "last", "icv_method": "pca", "per_layer_alpha": 3},
    ],
)
def test_malformed_configs_are_input_errors_not_python_errors(config):
    from sa_lens.errors import InputError

    with pytest.raises(InputError):
        from_dict(config)


def test_deeply_nested_configs_are_refused():
    from sa_lens.errors import InputError

    d: dict = {"kind": "compose", "steps": []}
    for _ in range(100):
        d = {"kind": "compose", "steps": [d]}
    with pytest.raises(InputError, match="nest deeper"):
        from_dict(d)


def test_malformed_state_files_are_input_errors(tmp_path, hv):
    from sa_lens.errors import InputError

    path = save(HarmRemoval(hv, 0.5), tmp_path / "state.json")
    good = json.loads(path.read_text())
    for doc in ("{not json", json.dumps(good | {"vectors": []}),
                json.dumps(good | {"vectors": {k: {"file": "../x.safetensors", "type": "harm_vector"}
                                               for k in good["vectors"]}}),
                json.dumps({k: v for k, v in good.items() if k != "config"})):
        path.write_text(doc)
        with pytest.raises(InputError):
            load(path)


@pytest.mark.parametrize(
    "build",
    [
        lambda sv: SafeAlign(vector=sv, per_layer_alpha=((1.5, 0.3),)),
        lambda sv: SafeAlign(vector=sv, per_layer_alpha=((True, 0.3),)),
        lambda sv: SafeAlign(vector=sv, per_layer_alpha=(("1", 0.3),)),
        lambda sv: SafeAlign(vector=sv, per_layer_alpha=((-1, 0.3),)),
        lambda sv: SafeAlign(vector=sv, allow_other_model="no"),
        lambda sv: SafeAlign(vector=sv, layers=1),
        lambda sv: SafeAlign(vector=sv, site=["mlp_out"]),
        lambda sv: HeadAblation(((0, 1.7),)),
        lambda sv: HeadAblation(((True, 1),)),
        lambda sv: HeadAblation((("0", "1"),)),
        lambda sv: HeadAblation(((0, 1),), "mean", "hello"),
        lambda sv: DirectionalAblation(torch.ones(64), allow_other_model=1),
    ],
)
def test_indices_flags_and_sequences_are_refused_not_coerced(build):
    sv = SafetyVector(torch.ones(2, 64))
    with pytest.raises(ValueError):
        build(sv)


def test_numpy_integer_layers_and_generators_are_read_as_layers():
    import numpy as np

    sv = SafetyVector(torch.ones(2, 64))
    assert SafeAlign(vector=sv, layers=np.arange(2)).layers == (0, 1)
    assert SafeAlign(vector=sv, layers=(x for x in (1, 0))).layers == (0, 1)
    assert HeadAblation(((np.int64(0), np.int32(1)),)).heads == ((0, 1),)


def test_a_vector_edited_in_place_after_use_is_not_saved_under_its_old_digest(tiny_bridge, tmp_path):
    sv = SafetyVector.from_pairs(tiny_bridge, list(PAIRS))
    iv = SafeAlign(vector=sv)
    iv.fingerprint()
    sv.directions.mul_(-1)
    with pytest.raises(ValueError, match="changed in place"):
        save(iv, tmp_path / "s.json")


def test_texts_with_lone_surrogates_fingerprint():
    assert SafeAlign(pairs=(("q \ud800", "safe"),)).fingerprint() != SafeAlign(pairs=(("q", "safe"),)).fingerprint()


def test_lens_safe_align_takes_the_callers_allow_other_model(tiny_bridge):
    from sa_lens import SafetyLens

    sv = SafetyVector.from_pairs(tiny_bridge, list(PAIRS))
    with SafetyLens(tiny_bridge).safe_align(sv, alpha=1.0, allow_other_model=False):
        pass


def test_evaluate_checks_every_state_before_generating_anything(tiny_bridge, monkeypatch):
    import sa_lens.evaluation.harness as harness

    calls = []
    monkeypatch.setattr(harness, "_run_batch", lambda *a, **k: calls.append(1))
    sv = SafetyVector.from_pairs(tiny_bridge, list(PAIRS))
    with pytest.raises(ValueError, match="out of range"):
        evaluate(tiny_bridge, [HARMFUL], states={"Original": Compose(), "bad": SafeAlign(vector=sv, layers=(5,))},
                 progress=False)
    with pytest.raises(ValueError, match="n_boot"):
        evaluate(tiny_bridge, [HARMFUL], n_boot=5, progress=False)
    with pytest.raises(ValueError, match="states is empty"):
        evaluate(tiny_bridge, [HARMFUL], states={}, progress=False)
    assert calls == []


def test_a_resume_with_another_batch_size_or_a_grown_set_equals_a_fresh_run(tiny_bridge, tmp_path):
    sampled = preset("paper", max_new_tokens=4, prompt_format="chat")
    grown = PromptSet("harm", "harmful", HARMFUL.prompts + ("a",), HARMFUL.ids + ("h9",), ("",) * 5, "test")
    kw = dict(settings=sampled, progress=False)
    evaluate(tiny_bridge, [HARMFUL], out_dir=tmp_path, batch_size=2, **kw)
    for s, batch_size in ((HARMFUL, 3), (grown, 2)):
        resumed = evaluate(tiny_bridge, [s], out_dir=tmp_path, batch_size=batch_size, **kw)
        fresh = evaluate(tiny_bridge, [s], batch_size=batch_size, **kw)
        assert [r["response"] for r in resumed.records] == [r["response"] for r in fresh.records]


# ---- KnowledgeEdit (ROME; paper §4, EDIT) --------------------------------------------------------------------


SEA = EditRequest("Tell me about {}", "the sea", " blue", target_true=" bread", id="sea")
SKY_ROW = {"id": "sky", "prompt": "Tell me about {}", "subject": "the sky", "target_new": " four"}
ROME_FAST = RomeOptions(steps=15, stats_texts=("The sky is blue.", "Two plus two is four.", "Tell me a story."))


@pytest.fixture()
def rome_cache(tmp_path, monkeypatch):
    """ROME's key statistics in a fresh cache folder and memo, never the user's."""
    from sa_lens import edit_stats

    monkeypatch.setenv("SA_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(edit_stats, "_MEMO", {})


def test_knowledge_edit_reads_rows_as_requests_and_names_itself():
    iv = KnowledgeEdit([SEA, SKY_ROW, SEA], 4)
    assert iv.edits == (SEA, EditRequest.from_row(SKY_ROW, 1), SEA) and iv.options == RomeOptions()
    assert iv.name == "ROME L4 ×3" and iv.vectors() == {}
    assert KnowledgeEdit((r for r in [SEA]), np.int64(0)).layer == 0
    assert KnowledgeEdit([asdict(SEA)], 4) == KnowledgeEdit([SEA], 4)  # a row of the request's own fields


_EDIT_CHANGES = {
    "prompt": dict(prompt="Say something about {}"), "subject": dict(subject="the ocean", prompt="Tell me about {}"),
    "target": dict(target=" green"), "target_true": dict(target_true=None), "paraphrases": dict(paraphrases=("{}?",)),
    "neighbours": dict(neighbours=(("The sky is", " blue"),)), "id": dict(id="sea2"),
}
_OPTION_CHANGES = {
    "steps": 41, "lr": 0.25, "kl_factor": 0.5, "weight_decay": 0.0, "clamp_norm_factor": 2.0, "early_stop_loss": 0.1,
    "max_loss": 2.0, "chat": True, "contexts": ("",), "ridge": 1e-3, "stats_texts": ("One text.",),
    "mom2_update_weight": 1500.0,
}


def test_the_knowledge_edit_fingerprint_covers_every_request_and_option_field_and_the_layer():
    from dataclasses import fields, replace

    assert set(_EDIT_CHANGES) == {f.name for f in fields(EditRequest)}  # a new field must join the lists
    assert set(_OPTION_CHANGES) == {f.name for f in fields(RomeOptions)}
    ref = KnowledgeEdit([SEA], 4)
    seen = {ref.fingerprint()}
    variants = [KnowledgeEdit([replace(SEA, **c)], 4) for c in _EDIT_CHANGES.values()]
    variants += [KnowledgeEdit([SEA], 4, replace(RomeOptions(), **{k: v})) for k, v in _OPTION_CHANGES.items()]
    variants += [KnowledgeEdit([SEA], 5), KnowledgeEdit([SEA, SEA], 4), KnowledgeEdit([SEA, SKY_ROW], 4),
                 KnowledgeEdit([SKY_ROW, SEA], 4)]
    for iv in variants:
        assert iv.fingerprint() not in seen, iv.to_dict()
        seen.add(iv.fingerprint())
    assert KnowledgeEdit([replace(SEA)], 4) == ref and hash(KnowledgeEdit([SEA], 4)) == hash(ref)


def test_knowledge_edit_round_trips_through_json_and_files(tmp_path):
    iv = KnowledgeEdit([replace_request(SEA), SKY_ROW], 1, RomeOptions(steps=7, chat=True, stats_texts=("a", "b")))
    d = json.loads(json.dumps(iv.to_dict()))
    assert d == iv.to_dict() and d["options"]["stats_texts"] == ["a", "b"] and d["edits"][0]["neighbours"]
    back = from_dict(d)
    assert back == iv and back.edits == iv.edits and back.options == iv.options and back.name == iv.name
    loaded = load(save(Compose((iv, KnowledgeEdit([SEA], 0))), tmp_path / "edit.json"))
    assert loaded.steps == (iv, KnowledgeEdit([SEA], 0)) and loaded.steps[0].options == iv.options


def replace_request(r: EditRequest) -> EditRequest:
    from dataclasses import replace

    return replace(r, paraphrases=("Say something about {}",), neighbours=(("The sky is", " blue"),))


def test_knowledge_edit_applies_rome_and_restores_bit_for_bit(tiny_bridge, rome_cache):
    from sa_lens.editing import edit_scores

    iv = KnowledgeEdit([SEA, SKY_ROW], 0, ROME_FAST)
    before, logits = _snapshot(tiny_bridge), tiny_bridge(PROMPT)
    with iv.apply(tiny_bridge) as model:
        assert model is tiny_bridge and not torch.allclose(tiny_bridge(PROMPT), logits)
        assert edit_scores(tiny_bridge, [SEA])[0]["efficacy"] == 1.0
        changed = [n for n, p in _snapshot(tiny_bridge).items() if not torch.equal(p, before[n])]
        assert [n.replace("._original_component", "") for n in changed] == ["model.layers.0.mlp.down_proj.weight"]
    assert all(torch.equal(p, before[n]) for n, p in _snapshot(tiny_bridge).items())
    with pytest.raises(RuntimeError, match="boom"):
        with iv.apply(tiny_bridge):
            raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in _snapshot(tiny_bridge).items())
    assert torch.equal(tiny_bridge(PROMPT), logits)


def test_knowledge_edit_then_harm_removal_compose_as_the_edit_scenario_and_restore(tiny_bridge, hv, rome_cache):
    from sa_lens.editing import knowledge_edit

    edit = KnowledgeEdit([SEA], 0, ROME_FAST)
    composed = Compose((edit, HarmRemoval(hv, 3.0)))
    assert composed.name == "ROME L0 ×1 + HDR λ=3"
    before = _snapshot(tiny_bridge)
    with composed.apply(tiny_bridge):
        got = tiny_bridge(PROMPT)
    assert all(torch.equal(p, before[n]) for n, p in _snapshot(tiny_bridge).items())
    with knowledge_edit(tiny_bridge, [SEA], 0, ROME_FAST), harm_removal(tiny_bridge, hv, 3.0):
        want = tiny_bridge(PROMPT)
    with edit.apply(tiny_bridge):
        edited_only = tiny_bridge(PROMPT)
    assert torch.equal(got, want) and not torch.allclose(got, edited_only)
    assert all(torch.equal(p, before[n]) for n, p in _snapshot(tiny_bridge).items())


def test_knowledge_edit_check_finds_the_projection_and_tokenises_without_optimising(tiny_bridge, monkeypatch):
    import sa_lens.editing as editing

    monkeypatch.setattr(editing, "_rome_update", lambda *a, **k: pytest.fail("check optimised"))
    before = _snapshot(tiny_bridge)
    KnowledgeEdit([SEA, SKY_ROW], 1).check(tiny_bridge)
    with pytest.raises(ValueError, match=r"layer must be a decoder layer index in 0\.\.1; got 2"):
        KnowledgeEdit([SEA], 2).check(tiny_bridge)
    with pytest.raises(ValueError, match=r"layer must be a decoder layer index in 0\.\.1; got 2"):
        with KnowledgeEdit([SEA], 2).apply(tiny_bridge):
            pytest.fail("entered")
    tokenizer = tiny_bridge.tokenizer
    monkeypatch.setattr(tokenizer, "chat_template", None)
    monkeypatch.setattr(editing, "checkpoint_tokenizer", lambda bridge: tokenizer)
    with pytest.raises(ValueError, match="chat template"):
        KnowledgeEdit([SEA], 0, RomeOptions(chat=True)).check(tiny_bridge)
    assert all(torch.equal(p, before[n]) for n, p in _snapshot(tiny_bridge).items())


def test_evaluate_refuses_a_knowledge_edit_past_the_models_layers_before_generating(tiny_bridge, monkeypatch):
    import sa_lens.evaluation.harness as harness

    calls = []
    monkeypatch.setattr(harness, "_run_batch", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="layer must be a decoder layer index"):
        evaluate(tiny_bridge, [HARMFUL], states={"Original": Compose(), "edited": KnowledgeEdit([SEA], 9)},
                 progress=False)
    assert calls == []


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: KnowledgeEdit(SEA, 0), "not one; wrap it"),
        (lambda: KnowledgeEdit(SKY_ROW, 0), "not one; wrap it"),
        (lambda: KnowledgeEdit([], 0), "edits is empty"),
        (lambda: KnowledgeEdit(["Tell me about the sea"], 0), "EditRequests or rows"),
        (lambda: KnowledgeEdit(7, 0), "EditRequests or rows"),
        (lambda: KnowledgeEdit([{"prompt": "Tell me about the sea", "subject": "the sky", "target_new": " x"}], 0),
         "'the sky' does not occur"),
        (lambda: KnowledgeEdit([SEA], -1), "layer must be a decoder layer index ≥ 0"),
        (lambda: KnowledgeEdit([SEA], True), "layer must be integer"),
        (lambda: KnowledgeEdit([SEA], 1.0), "layer must be integer"),
        (lambda: KnowledgeEdit([SEA], 0, {"steps": 3}), "options must be RomeOptions"),
    ],
)
def test_bad_knowledge_edits_are_refused_on_construction(build, message):
    from sa_lens.errors import InputError

    with pytest.raises(InputError, match=message):
        build()


@pytest.mark.parametrize(
    "config",
    [
        {"kind": "knowledge_edit"},
        {"kind": "knowledge_edit", "edits": [1], "layer": 0, "options": {}},
        {"kind": "knowledge_edit", "edits": "x", "layer": 0, "options": {}},
        {"kind": "knowledge_edit", "edits": [{"prompt": "{} is", "subject": "a", "target": " b", "x": 1}],
         "layer": 0, "options": {}},
        {"kind": "knowledge_edit", "edits": [{"prompt": "{} is", "subject": "a", "target": " b"}], "layer": 0,
         "options": {"stepz": 3}},
        {"kind": "knowledge_edit", "edits": [{"prompt": "{} is", "subject": "a", "target": " b"}], "layer": 0,
         "options": [3]},
        {"kind": "knowledge_edit", "edits": [{"prompt": "{} is", "subject": "a", "target": " b"}], "layer": "0",
         "options": {}},
        {"kind": "knowledge_edit", "edits": [], "layer": 0, "options": {}},
    ],
)
def test_malformed_knowledge_edit_configs_are_input_errors(config):
    from sa_lens.errors import InputError

    with pytest.raises(InputError):
        from_dict(config)
