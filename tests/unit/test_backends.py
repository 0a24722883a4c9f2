"""Generation backends without vLLM: choosing one, what vLLM can serve, the hook-call proof, CLI options."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import sa_lens
from sa_lens.commands.evaluate import engine_options
from sa_lens.errors import InputError
from sa_lens.evaluation.backends import HFBackend, get_backend
from sa_lens.interventions import Compose, DirectionalAblation, HarmRemoval, HeadAblation, SafeAlign
from sa_lens.safety_vector import SafetyVector
from sa_lens.vllm_backend import VLLMBackend, unsupported

SV = SafetyVector(torch.ones(2, 8), {"model": "tiny"})


def test_get_backend_names_and_objects():
    assert isinstance(get_backend("hf"), HFBackend)
    own = HFBackend()
    assert get_backend(own) is own
    with pytest.raises(InputError, match="unknown backend 'tgi'; choose one of hf, vllm"):
        get_backend("tgi")
    with pytest.raises(InputError, match="for backend='vllm'"):
        get_backend("hf", tensor_parallel_size=2)


@pytest.mark.skipif(getattr(importlib.util.find_spec("vllm"), "origin", None) is not None, reason="vLLM is installed here")
def test_vllm_without_vllm_says_how_to_install_it():
    with pytest.raises(InputError, match=r"pip install 'sa_lens\[vllm\]'.*make vllm-env"):
        get_backend("vllm")


def test_what_vllm_can_serve_and_why_not():
    hv = sa_lens.HarmVector({"model.layers.0.mlp.down_proj.weight": torch.ones(8, 8)}, {})
    assert unsupported(Compose()) is None
    assert unsupported(Compose((HarmRemoval(hv, 1.0), SafeAlign(vector=SV, site="attn_out", formula="add")))) is None
    assert "resid_post" in unsupported(Compose((HarmRemoval(hv, 1.0), SafeAlign(vector=SV, site="resid_post"))))
    assert "positions='generated'" in unsupported(SafeAlign(vector=SV, positions="generated"))
    assert "DirectionalAblation" in unsupported(DirectionalAblation(SV))
    assert "HeadAblation" in unsupported(HeadAblation(((0, 1),)))


class _FakeLLM:
    def __init__(self, calls):
        self.calls = calls

    def collective_rpc(self, method, args=()):
        assert method == "sa_lens_hook_calls"
        return self.calls


def test_hooks_that_missed_decode_steps_are_caught():
    rows = [[5, 6, 7, 2], [5, 6]]
    VLLMBackend._check_hook_calls(_FakeLLM([{0: 4, 1: 4}]), rows)  # prefill + 3 decode steps: every step seen
    VLLMBackend._check_hook_calls(_FakeLLM([{0: 4}, {1: 5}]), rows)  # pipeline stages hold different layers
    with pytest.raises(RuntimeError, match="CUDA graphs.*enforce_eager=True"):
        VLLMBackend._check_hook_calls(_FakeLLM([{0: 1, 1: 1}]), rows)  # only the prefill ran the hooks
    with pytest.raises(RuntimeError, match="enforce_eager"):
        VLLMBackend._check_hook_calls(_FakeLLM([{}]), rows)


def test_engine_options_from_the_command_line():
    assert engine_options(["tensor_parallel_size=2", "gpu_memory_utilization=0.85", "dtype=bfloat16",
                           "fallback=true"]) == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.85,
                                                 "dtype": "bfloat16", "fallback": True}
    assert engine_options(["fallback=False", "enforce_eager=FALSE", "max_model_len=None"]) == \
        {"fallback": False, "enforce_eager": False, "max_model_len": None}  # never the truthy string 'False'
    with pytest.raises(InputError, match="KEY=VALUE"):
        engine_options(["tensor_parallel_size"])


def test_exports_are_named_by_the_weights_bytes_not_the_resume_keys_sums(tiny_bridge):
    from sa_lens.fingerprint import content_digest, loaded_fingerprint, state_fingerprint

    hf = tiny_bridge.original_model
    assert loaded_fingerprint(hf) == state_fingerprint(hf)  # load_model recorded the weights as read from the folder
    before = content_digest(hf)
    w = hf.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w[[0, 1]] = w[[1, 0]].clone()  # two rows trade places: the sums (and so the resume-key fingerprint) stay
    assert state_fingerprint(hf) == loaded_fingerprint(hf)
    assert content_digest(hf) != before


@pytest.mark.skipif(getattr(importlib.util.find_spec("vllm"), "origin", None) is not None, reason="vLLM is installed here")
def test_multiple_choice_alone_starts_no_engine(tiny_bridge):
    from sa_lens.data.public import MCItem, MCSet

    mc = MCSet("mmlu", "letter", tuple(MCItem(f"m{i}", f"What is {i}+1?", ("1", "2", "3", "4"), (0, 1, 0, 0))
                                       for i in range(3)), "test")
    # Without vLLM installed, asking for it would fail: nothing is generated, so it is never asked for.
    report = sa_lens.evaluate(tiny_bridge, [mc], backend="vllm", progress=False, n_boot=200)
    assert report.config["states"]["Original"]["backend"] == "hf"
