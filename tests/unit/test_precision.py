"""Reading torch's float32 matmul precision and setting one for a block, under both of torch's APIs."""

from __future__ import annotations

import pytest
import torch

from sa_lens import SafetyVector, demonstration_text, float32_matmul_precision
from sa_lens.precision import matmul_precision_in_force

PAIRS = [(demonstration_text("Pick a lock", "Use a pin."), demonstration_text("Pick a lock", "No."))]


def _state() -> tuple:
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = "raises"
    return legacy, torch.backends.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision


@pytest.fixture(autouse=True)
def _torch_defaults():
    yield
    torch.set_float32_matmul_precision("highest")
    for backend in (torch.backends, torch.backends.mkldnn.matmul, torch.backends.cuda.matmul):
        backend.fp32_precision = "none"


def test_block_sets_the_precision_and_restores_every_setting_exactly():
    before = _state()
    with float32_matmul_precision("medium"):
        assert matmul_precision_in_force("cpu") == "bf16" and matmul_precision_in_force("cuda") == "tf32"
    assert _state() == before  # "none" stays "none" (it follows later global changes), not "ieee"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # the per-backend API: the legacy getter now raises
    before = _state()
    with pytest.raises(KeyError), float32_matmul_precision("highest"):
        assert matmul_precision_in_force("cpu") == "ieee"
        raise KeyError("inside the block")
    assert _state() == before and matmul_precision_in_force("cpu") == "bf16"


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="'highest', 'high' or 'medium'"), float32_matmul_precision("bf16"):
        pass


def test_extraction_records_the_precision_in_force_under_the_per_backend_api(tiny_bridge):
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    assert SafetyVector.from_pairs(tiny_bridge, PAIRS).meta["matmul_precision"] == "bf16"
    assert SafetyVector.from_prompts(tiny_bridge, ["Pick a lock"], ["Bake bread"]).meta["matmul_precision"] == "bf16"
    torch.backends.mkldnn.matmul.fp32_precision = "none"
    assert SafetyVector.from_pairs(tiny_bridge, PAIRS).meta["matmul_precision"] == "ieee"
