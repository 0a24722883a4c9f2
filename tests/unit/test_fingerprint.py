"""state_fingerprint: a deterministic hash of weights and hooked points, read in bounded float64 chunks."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload, init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import sa_lens
import sa_lens.evaluation.harness as harness
from sa_lens.errors import InputError
from sa_lens.fingerprint import CHUNK_ELEMENTS, _chunks, parameter_digest, state_fingerprint

# An embedding-like table just over two chunks long: the last chunk holds one row of 4096.
WIDTH = 4096
LARGE = 2 * CHUNK_ELEMENTS + WIDTH


class _Large(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(LARGE, generator=g).reshape(-1, WIDTH), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(7, generator=g), requires_grad=False)


@pytest.fixture(scope="module")
def large() -> _Large:
    return _Large()


def _one_ulp_up(model: _Large, flat_index: int) -> None:
    flat = model.table.data.view(-1)
    flat[flat_index] = torch.nextafter(flat[flat_index], torch.tensor(float("inf")))


def test_harness_still_exports_the_same_function():
    assert harness.state_fingerprint is state_fingerprint


def test_same_weights_give_the_same_fingerprint(large):
    twin = _Large()  # another object, same values
    assert state_fingerprint(large) == state_fingerprint(large) == state_fingerprint(twin)
    assert len(state_fingerprint(large)) == 12


@pytest.mark.parametrize("where", ["first chunk", "middle chunk", "last chunk", "last element"])
def test_a_one_ulp_change_anywhere_changes_the_fingerprint(where):
    model = _Large()
    before = state_fingerprint(model)
    index = {"first chunk": 3, "middle chunk": CHUNK_ELEMENTS + 11, "last chunk": 2 * CHUNK_ELEMENTS + 1,
             "last element": LARGE - 1}[where]
    _one_ulp_up(model, index)
    assert state_fingerprint(model) != before


def test_a_one_ulp_change_in_a_small_parameter_changes_the_fingerprint():
    model = _Large()
    before = state_fingerprint(model)
    model.bias.data[6] = torch.nextafter(model.bias.data[6], torch.tensor(float("-inf")))
    assert state_fingerprint(model) != before


def test_hooked_points_change_the_fingerprint(tiny_bridge):
    before = state_fingerprint(tiny_bridge)
    with tiny_bridge.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: x)]):
        assert state_fingerprint(tiny_bridge) != before
    assert state_fingerprint(tiny_bridge) == before


def test_digest_is_the_whole_tensor_sums_up_to_rounding(large):
    total, squares = parameter_digest(large.table)
    x = large.table.detach().double()
    assert total == pytest.approx(x.sum().item(), rel=1e-12, abs=1e-9)
    assert squares == pytest.approx((x * x).sum().item(), rel=1e-12)


@pytest.mark.parametrize("view", ["contiguous", "transposed", "column slice", "row stride", "scalar", "empty"])
@pytest.mark.parametrize("n", [1, 3, 7, 64])
def test_chunks_cover_every_element_once_and_are_views(view, n):
    base = torch.arange(8 * 6 * 4, dtype=torch.float32).reshape(8, 6, 4)
    x = {"contiguous": base, "transposed": base.transpose(0, 2), "column slice": base[:, 1:5, ::2],
         "row stride": base[::3], "scalar": base[0, 0, 0], "empty": base[:0]}[view]
    pieces = list(_chunks(x, n))
    assert all(p.numel() <= n for p in pieces)
    assert all(p.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() for p in pieces)  # no copies
    got = torch.cat([p.reshape(-1) for p in pieces]) if pieces else torch.empty(0)
    assert torch.equal(got.sort().values, x.reshape(-1).sort().values)


def test_float64_copies_never_exceed_one_chunk(large, monkeypatch):
    sizes: list[int] = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.dtype == torch.float64:
            sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy)
    parameter_digest(large.table)
    assert sizes and max(sizes) <= CHUNK_ELEMENTS
    sizes.clear()
    parameter_digest(large.table, chunk_elements=1000)
    assert max(sizes) <= 1000


def test_a_float64_parameter_is_left_untouched():
    p = torch.randn(50, dtype=torch.float64)
    kept = p.clone()
    parameter_digest(p, chunk_elements=7)
    assert torch.equal(p, kept)


def test_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="chunk_elements must be >= 1"):
        parameter_digest(torch.ones(3), chunk_elements=0)


def test_offloaded_weights_are_read_from_their_store(tiny_dir):
    model, _ = sa_lens.load_hf_model(tiny_dir)
    cpu_offload(model, execution_device=torch.device("cpu"))
    weight = model.model.layers[1].mlp.down_proj.weight
    assert weight.device.type == "meta"
    before = state_fingerprint(model)
    assert state_fingerprint(model) == before
    stored = model.model.layers[1].mlp.down_proj._hf_hook.weights_map["weight"]
    stored.view(-1)[-1] = torch.nextafter(stored.view(-1)[-1], torch.tensor(float("inf")))
    assert state_fingerprint(model) != before


def test_disk_offloaded_bridge_hashes_as_the_whole_bridge(tiny_dir, tiny_bridge, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    disk = sa_lens.load_model(tiny_dir, device_map=device_map, offload_folder=tmp_path)
    assert state_fingerprint(disk) == state_fingerprint(tiny_bridge)


def test_meta_placeholders_without_weights_are_refused(tiny_dir):
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_dir))
    with pytest.raises(InputError, match="Parameter 'model.embed_tokens.weight' is on the meta device"):
        state_fingerprint(empty)
