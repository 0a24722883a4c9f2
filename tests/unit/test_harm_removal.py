"""harm_removal: θ̂ = θt − λ·τH′ inside the block, bit-exact restore on every exit path."""

from __future__ import annotations

import contextlib

import pytest
import torch

import sa_lens
from sa_lens import HarmVector, checkpoint_parameters, harm_removal
from sa_lens.harm_removal import apply_harm_removal


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in checkpoint_parameters(model).items()}


def _assert_bit_exact(model, snapshot) -> None:
    for name, p in checkpoint_parameters(model).items():
        # Compare bit patterns: torch.equal would call -0.0 == 0.0 and miss NaN payload changes.
        assert torch.equal(p.detach().view(torch.int8), snapshot[name].view(torch.int8)), name


@pytest.fixture()
def hv(tiny_dir, tiny_dir_other):
    base, _ = sa_lens.load_hf_model(tiny_dir)
    harmful, _ = sa_lens.load_hf_model(tiny_dir_other)
    return HarmVector.from_models(base, harmful).trim(0.1)


def test_edit_subtracts_lambda_times_vector_only_where_trimmed_vector_is_nonzero(tiny_bridge, hv):
    before = _snapshot(tiny_bridge)
    with harm_removal(tiny_bridge, hv, lam=3.0):
        for name, p in checkpoint_parameters(tiny_bridge).items():
            delta = hv.deltas[name]
            expected = torch.where(delta != 0, before[name] - 3.0 * delta, before[name])
            assert torch.equal(p.detach(), expected), name
    _assert_bit_exact(tiny_bridge, before)


def test_restore_is_bit_exact_after_exception(tiny_bridge, hv):
    before = _snapshot(tiny_bridge)
    with pytest.raises(RuntimeError, match="boom"):
        with harm_removal(tiny_bridge, hv, lam=3.0):
            raise RuntimeError("boom")
    _assert_bit_exact(tiny_bridge, before)


def test_restore_is_bit_exact_after_keyboard_interrupt(tiny_bridge, hv):
    before = _snapshot(tiny_bridge)
    with pytest.raises(KeyboardInterrupt):
        with harm_removal(tiny_bridge, hv, lam=2.0):
            raise KeyboardInterrupt
    _assert_bit_exact(tiny_bridge, before)


def test_nested_blocks_each_restore_what_they_saw(tiny_bridge, hv):
    before = _snapshot(tiny_bridge)
    with harm_removal(tiny_bridge, hv, lam=1.0):
        edited_once = _snapshot(tiny_bridge)
        with harm_removal(tiny_bridge, hv, lam=1.0):
            pass
        _assert_bit_exact(tiny_bridge, edited_once)
    _assert_bit_exact(tiny_bridge, before)


def test_dense_task_vector_restores_exactly(tiny_bridge, tiny_dir, tiny_dir_other):
    base, _ = sa_lens.load_hf_model(tiny_dir)
    harmful, _ = sa_lens.load_hf_model(tiny_dir_other)
    dense = HarmVector.from_models(base, harmful)  # untrimmed: takes the full-copy save path
    before = _snapshot(tiny_bridge)
    key = "model.layers.0.mlp.down_proj.weight"
    with harm_removal(tiny_bridge, dense, lam=0.5):
        assert not torch.equal(checkpoint_parameters(tiny_bridge)[key], before[key])
    _assert_bit_exact(tiny_bridge, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_restore_is_bit_exact_in_low_precision_state_dicts(dtype):
    g = torch.Generator().manual_seed(0)
    state = {f"model.layers.{i}.w": torch.randn(64, 64, generator=g).to(dtype) for i in range(3)}
    before = {k: v.clone() for k, v in state.items()}
    hv = HarmVector({k: torch.randn(64, 64, generator=g) * 1e-3 for k in state}).trim(0.25)
    with pytest.raises(ValueError, match="inside"):
        with harm_removal(state, hv, lam=3.0):
            assert any(not torch.equal(state[k], before[k]) for k in state)
            raise ValueError("inside")
    for k in state:
        assert torch.equal(state[k].view(torch.int8 if dtype == torch.float32 else torch.int16).flatten(),
                           before[k].view(torch.int8 if dtype == torch.float32 else torch.int16).flatten())


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), None])
def test_non_finite_lambda_is_refused_before_any_edit(tiny_bridge, hv, lam):
    before = _snapshot(tiny_bridge)
    with pytest.raises(ValueError, match="lam"):
        with harm_removal(tiny_bridge, hv, lam=lam):
            pass
    _assert_bit_exact(tiny_bridge, before)


def test_vector_from_another_architecture_is_refused(tiny_bridge):
    with pytest.raises(ValueError, match="parameter\\(s\\) the target lacks"):
        with harm_removal(tiny_bridge, HarmVector({"transformer.h.0.attn.c_attn.weight": torch.zeros(3)}), 1.0):
            pass
    shape_mismatch = HarmVector({"model.norm.weight": torch.zeros(7)})
    with pytest.raises(ValueError, match="shape"):
        with harm_removal(tiny_bridge, shape_mismatch, 1.0):
            pass


def test_parameters_replaced_inside_the_block_are_reported_not_silently_left_edited(tiny_dir, hv):
    model, _ = sa_lens.load_hf_model(tiny_dir)
    with pytest.raises(RuntimeError, match="replaced inside the harm_removal block"):
        with harm_removal(model, hv, lam=3.0):
            model.to(torch.float64)


def test_an_error_while_applying_the_edit_restores_what_was_already_edited(tiny_bridge, hv, monkeypatch):
    before = _snapshot(tiny_bridge)
    real_nonzero, calls = torch.nonzero, []

    def failing_nonzero(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("out of memory on the fifth tensor")
        return real_nonzero(*args, **kwargs)

    monkeypatch.setattr(torch, "nonzero", failing_nonzero)
    with pytest.raises(MemoryError):
        with harm_removal(tiny_bridge, hv, lam=3.0):
            pass
    monkeypatch.undo()
    _assert_bit_exact(tiny_bridge, before)


def test_tied_weights_in_a_state_dict_are_edited_once(tiny_dir):
    model, _ = sa_lens.load_hf_model(tiny_dir)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    keys = checkpoint_parameters(state)
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    before = state["model.embed_tokens.weight"].clone()
    delta = torch.zeros_like(before)
    delta[0, 0] = 1.0
    with harm_removal(state, HarmVector({"model.embed_tokens.weight": delta}), lam=1.0):
        assert state["model.embed_tokens.weight"][0, 0] == before[0, 0] - 1.0  # once, not twice


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("exit_by", ["normal", "exception", "keyboard_interrupt"])
def test_hf_model_restores_bit_exactly_in_every_dtype_and_exit_path(tiny_dir, tiny_dir_other, dtype, exit_by):
    model, _ = sa_lens.load_hf_model(tiny_dir, dtype=dtype)
    hv = HarmVector.from_checkpoints(tiny_dir, tiny_dir_other, top_k=0.1, progress=False)
    before = _snapshot(model)
    raised = {"normal": None, "exception": ValueError, "keyboard_interrupt": KeyboardInterrupt}[exit_by]
    with pytest.raises(raised) if raised else contextlib.nullcontext():
        with harm_removal(model, hv, lam=3.0):
            assert any(not torch.equal(p, before[n]) for n, p in checkpoint_parameters(model).items())
            if raised:
                raise raised()
    _assert_bit_exact(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_restore_memory_is_the_edited_values_plus_int64_indices(tiny_dir, tiny_dir_other, dtype):
    model, _ = sa_lens.load_hf_model(tiny_dir, dtype=dtype)
    base, _ = sa_lens.load_hf_model(tiny_dir)
    harmful, _ = sa_lens.load_hf_model(tiny_dir_other)
    hv = HarmVector.from_models(base, harmful).trim(0.1, scope="per_tensor")  # ≤ a third of every tensor
    hr = harm_removal(model, hv, lam=3.0)
    assert hr.restore_nbytes == 0
    with hr:
        assert hr.edited == hv.nnz
        entry_bytes = torch.finfo(dtype).bits // 8 + 8
        assert hr.restore_nbytes == hv.nnz * entry_bytes
        assert hr.restore_nbytes <= 0.11 * hv.numel * entry_bytes  # ≈ top_k × (value + index) bytes
    assert hr.restore_nbytes == 0


def test_the_same_block_entered_twice_stacks_and_unwinds(tiny_bridge, hv):
    before = _snapshot(tiny_bridge)
    hr = harm_removal(tiny_bridge, hv, lam=1.0)
    with hr:
        once = _snapshot(tiny_bridge)
        with hr:
            assert any(not torch.equal(p, once[n]) for n, p in checkpoint_parameters(tiny_bridge).items())
        _assert_bit_exact(tiny_bridge, once)
    _assert_bit_exact(tiny_bridge, before)


def test_compatibility_mode_bridge_is_refused_before_any_edit(tiny_bridge, hv):
    tiny_bridge.enable_compatibility_mode()
    with pytest.raises(ValueError, match="enable_compatibility_mode"):
        harm_removal(tiny_bridge, hv, lam=3.0)


def test_a_model_cast_between_creation_and_entry_is_edited_and_restored(tiny_dir, hv):
    model, _ = sa_lens.load_hf_model(tiny_dir)
    hr = harm_removal(model, hv, lam=3.0)
    model.to(torch.bfloat16)
    before = _snapshot(model)
    with hr:
        assert any(not torch.equal(p, before[n]) for n, p in checkpoint_parameters(model).items())
    _assert_bit_exact(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_exited_out_of_order_still_restore_bit_exactly(dtype):
    g = torch.Generator().manual_seed(1)
    state = {f"model.layers.{i}.w": torch.randn(30, 20, generator=g).to(dtype) for i in range(3)}
    before = _snapshot(state)
    hv_a = HarmVector({k: torch.randn(30, 20, generator=g) for k in state}).trim(0.3)
    hv_b = HarmVector({k: torch.randn(30, 20, generator=g) for k in state}).trim(0.5)
    hv_c = HarmVector({"model.layers.2.w": torch.randn(30, 20, generator=g)}).trim(0.5)
    a, b, c = harm_removal(state, hv_a, 3.0), harm_removal(state, hv_b, -2.0), harm_removal(state, hv_c, 1.0)
    a.__enter__()
    b.__enter__()
    c.__enter__()
    with pytest.warns(RuntimeWarning, match="out of order"):
        a.__exit__(None, None, None)  # b (and c) still edit the same tensors
    with pytest.warns(RuntimeWarning, match="out of order"):
        b.__exit__(None, None, None)  # c still edits layer 2, which a and b edited too
    c.__exit__(None, None, None)
    _assert_bit_exact(state, before)


def test_a_keyboard_interrupt_during_the_restore_does_not_leave_the_weights_edited(monkeypatch):
    g = torch.Generator().manual_seed(2)
    state = {f"model.layers.{i}.w": torch.randn(30, 20, generator=g) for i in range(4)}
    before = _snapshot(state)
    hv = HarmVector({k: torch.randn(30, 20, generator=g) for k in state}).trim(0.2)
    block = harm_removal(state, hv, 3.0)
    block.__enter__()
    setitem, calls = torch.Tensor.__setitem__, {"n": 0}

    def second_ctrl_c(self, key, value):  # the user presses Ctrl-C again while the weights are restored
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise KeyboardInterrupt
        return setitem(self, key, value)

    monkeypatch.setattr(torch.Tensor, "__setitem__", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        block.__exit__(None, None, None)
    monkeypatch.undo()
    _assert_bit_exact(state, before)


def test_a_keyboard_interrupt_during_the_heap_trim_after_the_edit_restores_the_weights(monkeypatch):
    # The trim after the last edit is the slowest step once the weights are edited; a `with` whose
    # __enter__ raises never runs __exit__, so __enter__ itself must restore.
    import sys

    module = sys.modules["sa_lens.harm_removal"]
    g = torch.Generator().manual_seed(5)
    state = {f"model.layers.{i}.w": torch.randn(30, 20, generator=g) for i in range(2)}
    before = _snapshot(state)
    hv = HarmVector({k: torch.randn(30, 20, generator=g) for k in state}).trim(0.2)
    calls = []

    def ctrl_c_once():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "release_freed_memory", ctrl_c_once)
    with pytest.raises(KeyboardInterrupt):
        with harm_removal(state, hv, 3.0):
            pass
    _assert_bit_exact(state, before)
    assert not [ref for ref in module._ACTIVE if ref() is not None]


def test_a_permanent_edit_inside_a_block_on_the_same_weights_is_refused_before_any_edit():
    # The block's exit would undo the permanent edit where the two overlap and keep it elsewhere.
    g = torch.Generator().manual_seed(6)
    state = {f"model.layers.{i}.w": torch.randn(30, 20, generator=g) for i in range(2)}
    other = {"model.layers.0.w": torch.randn(30, 20, generator=g)}
    before = _snapshot(state)
    hv = HarmVector({k: torch.randn(30, 20, generator=g) for k in state}).trim(0.2)
    hv2 = HarmVector({k: torch.randn(30, 20, generator=g) for k in state}).trim(0.2)
    with harm_removal(state, hv, 1.0):
        inside = _snapshot(state)
        with pytest.raises(ValueError, match="inside a harm_removal block that edits the same parameters"):
            apply_harm_removal(state, hv2, 1.0)
        _assert_bit_exact(state, inside)
        apply_harm_removal(other, hv2.restrict(layers=[0]), 1.0)  # other weights: allowed
    _assert_bit_exact(state, before)
    apply_harm_removal(state, hv2, 1.0)  # after the block: allowed
    assert not torch.equal(state["model.layers.1.w"], before["model.layers.1.w"])


def test_an_abandoned_block_does_not_keep_its_saved_originals_alive():
    import gc
    import weakref

    state = {"model.layers.0.w": torch.randn(30, 20)}
    hv = HarmVector({"model.layers.0.w": torch.randn(30, 20)}).trim(0.2)
    block = harm_removal(state, hv, 3.0)
    block.__enter__()  # never exited, as a notebook cell that was abandoned
    saved = weakref.ref(block._levels[-1].saved[0][1])
    del block
    gc.collect()
    assert saved() is None


def test_an_edit_that_overflows_fp16_is_refused_and_restored():
    g = torch.Generator().manual_seed(3)
    state = {f"model.layers.{i}.w": torch.randn(30, 20, generator=g).half() for i in range(3)}
    before = _snapshot(state)
    hv = HarmVector({k: torch.randn(30, 20, generator=g) for k in state}).trim(0.2)
    with pytest.raises(ValueError, match="overflows torch.float16"):
        with harm_removal(state, hv, lam=1e6):  # finite λ, but θ − λ·τ exceeds fp16's 65504
            pass
    _assert_bit_exact(state, before)


def test_a_permanent_edit_that_fails_half_way_leaves_every_weight_as_it_was():
    # Only the last tensor overflows fp16: the first two were already edited when the error came.
    g = torch.Generator().manual_seed(4)
    state = {f"model.layers.{i}.w": torch.randn(30, 20, generator=g).half() for i in range(3)}
    state["model.layers.2.w"][0, 0] = 60000.0
    before = _snapshot(state)
    tau = {k: torch.full((30, 20), 1e-3) for k in state}
    tau["model.layers.2.w"][0, 0] = -1.0  # θ − 10⁴·τ = 70000 > 65504 there only
    with pytest.raises(ValueError, match="overflows torch.float16.*layers.2"):
        apply_harm_removal(state, HarmVector(tau), lam=1e4)
    _assert_bit_exact(state, before)
    apply_harm_removal(state, HarmVector(tau), lam=1.0)  # and a good edit still lands, for good
    assert torch.equal(state["model.layers.0.w"], (before["model.layers.0.w"].float() - 1e-3).half())
