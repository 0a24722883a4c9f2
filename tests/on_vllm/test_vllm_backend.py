"""vLLM backend = HF backend, token for token, on the embedded default model (issue "Past one machine").

Runs in vLLM's own environment (`make test-vllm`, part of `make test`): greedy, fp32, 16 prompts × 32 tokens,
for Original, HDR, Safe-Align (official formula, all layers) and Safety Arithmetic; the same through
``sa_lens.evaluate(backend=...)``, records included; hooks gone after their state; what vLLM cannot serve refused.
"""

from __future__ import annotations

import pytest
import torch

import sa_lens
from sa_lens import HarmVector, checkpoint_parameters, demonstration_text
from sa_lens.data.public import load_bundled_set
from sa_lens.errors import InputError
from sa_lens.evaluation.decoding import preset
from sa_lens.generation import generate_tokens, hf_and_tokenizer
from sa_lens.interventions import Compose, HarmRemoval, SafeAlign
from sa_lens.prompts import format_prompts
from sa_lens.vllm_backend import VLLMBackend

pytestmark = pytest.mark.slow
TOKENS = 32


@pytest.fixture(scope="module")
def model():
    return sa_lens.load_model()


@pytest.fixture(scope="module")
def states(model):
    params = {k: v.detach() for k, v in checkpoint_parameters(model).items()}
    g = torch.Generator().manual_seed(0)
    # A synthetic τH at fine-tuning scale: enough to change replies, so parity is tested on edited weights.
    hv = HarmVector.from_models(params, {k: v + 2e-3 * torch.randn(v.shape, generator=g) for k, v in params.items()})
    hv = hv.trim(0.10)
    harm = load_bundled_set("harmful").prompts
    pairs = [(demonstration_text(q, "Sure, here is how to do it. First,"), demonstration_text(q, "I can't help with that."))
             for q in harm[:12]]
    return {
        "Original": Compose(),
        "Safe-Align": SafeAlign(pairs=pairs, alpha=0.12),
        "HDR": HarmRemoval(hv, 3.0),
        "Safety Arithmetic": Compose((HarmRemoval(hv, 3.0), SafeAlign(pairs=pairs, alpha=0.12))),
    }


@pytest.fixture(scope="module")
def prompts():
    return load_bundled_set("harmful").prompts[:8] + load_bundled_set("safe").prompts[:8]


@pytest.fixture(scope="module")
def backend():
    be = VLLMBackend()
    yield be
    be.close()


def _hf_tokens(model, intervention, prompts):
    _, tok = hf_and_tokenizer(model, None)
    with intervention.apply(model):
        return generate_tokens(model, format_prompts(tok, prompts, chat_template=True), TOKENS)


def test_greedy_tokens_equal_the_hf_backend_in_every_state_and_hooks_leave_with_their_state(model, states, prompts, backend):
    settings = preset("greedy", max_new_tokens=TOKENS)
    got, labels = {}, {}
    # Original, Safe-Align and Original again share one engine; HDR and Safety Arithmetic another.
    for name in ["Original", "Safe-Align", "Original again", "HDR", "Safety Arithmetic"]:
        with backend.serve(model, states[name.removesuffix(" again")], None) as served:
            got[name], labels[name] = served.tokens(prompts, settings, 0), served.backend
    assert backend.engine_starts == 2
    for name in states:
        want = _hf_tokens(model, states[name], prompts)
        same = sum(a == b for a, b in zip(got[name], want))
        assert same == len(prompts), f"{name}: {same}/{len(prompts)} replies identical to the HF backend"
        assert labels[name].startswith(f"vllm {backend.version} (float32")
    assert got["Original again"] == got["Original"]  # the Safe-Align hooks left with their state
    assert got["Safe-Align"] != got["Original"] and got["HDR"] != got["Original"]  # the states do differ


def test_evaluate_on_vllm_gives_the_hf_records_and_keys_them_apart(model, states, backend, tmp_path):
    sets = [load_bundled_set("harmful"), load_bundled_set("safe")]
    kw = dict(states=states, settings=preset("greedy", max_new_tokens=16), limit=8, progress=False, n_boot=200)
    hf = sa_lens.evaluate(model, sets, **kw)
    starts = backend.engine_starts
    on_vllm = sa_lens.evaluate(model, sets, backend=backend, out_dir=tmp_path, **kw)
    assert backend.engine_starts - starts <= 1  # the engine left running is served first
    strip = ("key", "config")
    assert [{k: v for k, v in r.items() if k not in strip} for r in on_vllm.records] == \
           [{k: v for k, v in r.items() if k not in strip} for r in hf.records]
    assert on_vllm.rows == hf.rows
    assert all(f"vllm-{backend.version}-float32-tp1-pp1" in r["config"] for r in on_vllm.records)
    assert {s["backend"] for s in on_vllm.config["states"].values()} == {f"vllm {backend.version} (float32, TP 1, PP 1)"}
    again = sa_lens.evaluate(model, sets, backend=backend, out_dir=tmp_path, **kw)
    assert again.config["items_run"] == 0 and again.records == on_vllm.records  # resumed, nothing regenerated


def test_a_state_vllm_cannot_serve_is_refused_before_any_generation_or_served_by_hf_when_asked(model, states, tmp_path):
    resid = {"resid": SafeAlign(vector=sa_lens.SafetyVector.from_pairs(model, list(states["Safe-Align"].pairs)),
                                site="resid_post")}
    be = VLLMBackend()
    with pytest.raises(InputError, match="resid_post.*backend='hf'"):
        sa_lens.evaluate(model, [load_bundled_set("harmful")], states=resid, backend=be, limit=2, progress=False)
    assert be.engine_starts == 0
    fallback = VLLMBackend(fallback=True)
    report = sa_lens.evaluate(model, [load_bundled_set("harmful")], states=resid, backend=fallback, limit=2,
                              settings=preset("greedy", max_new_tokens=8), progress=False, n_boot=200)
    assert report.config["states"]["resid"]["backend"].startswith("hf (fallback: Safe-Align at site 'resid_post'")
    assert fallback.engine_starts == 0


def test_weights_edited_by_hand_are_exported_not_served_from_the_folder_and_bad_options_refused(
        model, monkeypatch, tmp_path):
    be = VLLMBackend(export_dir=tmp_path)
    folder = be._source(model, None)
    assert folder == model.original_model.config._name_or_path  # untouched: the model's own folder
    w = model.original_model.model.layers[0].mlp.down_proj.weight
    keep = w.detach().clone()
    try:
        with torch.no_grad():
            w[0, 0] += 1.0  # an edit outside any state
        edited = be._source(model, None)
        assert edited != folder and edited.startswith(str(tmp_path))  # the weights it holds, exported
    finally:
        with torch.no_grad():
            w.copy_(keep)
    assert be._source(model, None) == folder
    with pytest.raises(InputError, match="fallback must be True or False"):
        VLLMBackend(fallback="False")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="under torchrun.*not supported"):
        VLLMBackend()
