"""Multi-device bridges: placement arguments, hooks that keep each layer's tensors on its device, and harm_removal
refusing weights that are not in memory (issue 15). CPU only: other devices are the meta device, accelerate's
CPU/disk offload, or a monkeypatched CUDA."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import cpu_offload, init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

import sa_lens
import sa_lens.models as models
from sa_lens import HarmVector, SafetyVector, checkpoint_parameters, harm_removal
from sa_lens.errors import InputError
from sa_lens.harm_removal import apply_harm_removal
from sa_lens.head_ablation import ablate_heads_hooks
from sa_lens.interventions import DirectionalAblation
from sa_lens.models import DeviceCopies, hook_point_device, offloaded_weights
from sa_lens.steering import safety_hooks

GIB = 2**30


class _Booted(Exception):
    """Raised by the stand-in loaders: carries the keyword arguments they were called with."""

    def __init__(self, kwargs):
        super().__init__("booted")
        self.kwargs = kwargs


@pytest.fixture()
def fake_gpus(monkeypatch):
    """Pretend this machine has ``n`` CUDA devices with 40 GiB free each; returns a setter."""

    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (40 * GIB, 80 * GIB))

    return set_count


@pytest.fixture()
def captured_boot(monkeypatch):
    """Stand-in for TransformerBridge.boot_transformers that records its arguments instead of loading."""
    from transformer_lens.model_bridge import TransformerBridge

    def boot(path, **kwargs):
        raise _Booted(kwargs)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(boot))


def _offload_map(tiny_dir: Path, layer1: str) -> dict[str, str]:
    return {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": layer1, "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _logits(model, ids=None):
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]]) if ids is None else ids
    with torch.no_grad():
        return model(ids)


# --- load_model / load_hf_model placement arguments ---------------------------------------------------------


def test_n_devices_without_cuda_is_refused_before_loading(tiny_dir, fake_gpus, captured_boot):
    fake_gpus(0)
    with pytest.raises(InputError, match=r"n_devices=2 needs that many CUDA devices, but 0 are visible"):
        sa_lens.load_model(tiny_dir, n_devices=2)


def test_n_devices_beyond_the_visible_gpus_is_refused(tiny_dir, fake_gpus, captured_boot):
    fake_gpus(2)
    with pytest.raises(InputError, match=r"n_devices=4 .* but 2 are visible .*CUDA_VISIBLE_DEVICES"):
        sa_lens.load_model(tiny_dir, n_devices=4)
    with pytest.raises(InputError, match="n_devices=4 .* but 2 are visible"):
        sa_lens.load_hf_model(tiny_dir, n_devices=4)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_n_devices_must_be_a_positive_integer(tiny_dir, fake_gpus, captured_boot, value):
    fake_gpus(2)
    with pytest.raises(InputError, match="n_devices must be an integer ≥ 1"):
        sa_lens.load_model(tiny_dir, n_devices=value)


def test_n_devices_with_device_or_device_map_is_refused(tiny_dir, fake_gpus, captured_boot):
    fake_gpus(2)
    with pytest.raises(InputError, match="pass one of them"):
        sa_lens.load_model(tiny_dir, device="cuda:0", n_devices=2)
    with pytest.raises(InputError, match="not both"):
        sa_lens.load_model(tiny_dir, device_map="auto", n_devices=2)


def test_n_devices_is_a_balanced_map_limited_to_those_gpus(tiny_dir, fake_gpus, captured_boot):
    fake_gpus(4)
    with pytest.raises(_Booted) as booted:
        sa_lens.load_model(tiny_dir, n_devices=2, max_memory={1: "10GiB"})
    kwargs = booted.value.kwargs
    assert kwargs["device_map"] == "balanced"
    assert kwargs["max_memory"] == {0: 40 * GIB, 1: "10GiB"}  # GPUs 2 and 3 are left out; the caller's budget kept
    assert "device" not in kwargs


def test_n_devices_one_is_the_first_gpu(tiny_dir, fake_gpus, captured_boot):
    fake_gpus(1)
    with pytest.raises(_Booted) as booted:
        sa_lens.load_model(tiny_dir, n_devices=1)
    assert booted.value.kwargs["device"] == "cuda:0" and "device_map" not in booted.value.kwargs


def test_device_map_and_max_memory_reach_transformers(tiny_dir, captured_boot, monkeypatch, tmp_path):
    budget = {0: "20GiB", "cpu": "60GiB"}
    with pytest.raises(_Booted) as booted:
        sa_lens.load_model(tiny_dir, device_map="auto", max_memory=budget, offload_folder=tmp_path)
    assert booted.value.kwargs["device_map"] == "auto"
    assert booted.value.kwargs["max_memory"] == budget
    assert booted.value.kwargs["offload_folder"] == str(tmp_path)

    def from_pretrained(path, **kwargs):
        raise _Booted(kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(_Booted) as booted:
        sa_lens.load_hf_model(tiny_dir, device_map="balanced", max_memory=budget)
    assert booted.value.kwargs["device_map"] == "balanced" and booted.value.kwargs["max_memory"] == budget


def test_device_defaults_to_the_cpu(tiny_dir, captured_boot):
    with pytest.raises(_Booted) as booted:
        sa_lens.load_model(tiny_dir)
    assert booted.value.kwargs["device"] == "cpu"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_memory": {0: "20GiB"}}, "pass it with device_map="),
    ({"device_map": "auto", "max_memory": {"gpu0": "20GiB"}}, "max_memory keys must be GPU indices"),
    ({"device_map": "auto", "max_memory": {0: 2.5}}, "max_memory keys must be GPU indices"),
    ({"device_map": "auto", "max_memory": {}}, "non-empty dict"),
    ({"n_devices": 2, "max_memory": {0: "20GiB", "cpu": "60GiB"}}, "only bound GPUs 0..1"),
    ({"n_devices": 2, "max_memory": {2: "20GiB"}}, "only bound GPUs 0..1"),
    ({"n_devices": 1, "max_memory": {0: "20GiB"}}, "nothing to split"),
    ({"device_map": {"model.embed_tokens": 0, "model.layers": "meta"}}, r"\['model.layers'\] on the meta device"),
    ({"device_map": "meta"}, "device_map='meta' puts the whole model on the meta device"),
    ({"device_map": 3}, "device_map must be a string"),
])
def test_placement_mistakes_are_refused_with_the_fix(tiny_dir, fake_gpus, captured_boot, kwargs, match):
    fake_gpus(4)
    with pytest.raises(InputError, match=match):
        sa_lens.load_model(tiny_dir, **kwargs)


def test_a_model_that_spills_past_n_devices_is_refused():
    models._refuse_spill({"model.layers.0": 0, "model.layers.1": 1}, 2)  # fits: nothing raised
    with pytest.raises(InputError, match=r"does not fit the memory of 2 GPUs.*'model.layers.9'.*'disk'"):
        models._refuse_spill({"model.layers.0": 0, "model.layers.9": "disk"}, 2)


def test_an_all_cpu_device_map_loads_the_same_model(tiny_dir, tiny_bridge):
    mapped = sa_lens.load_model(tiny_dir, device_map={"": "cpu"})
    assert torch.equal(_logits(mapped), _logits(tiny_bridge))
    hf, _ = sa_lens.load_hf_model(tiny_dir, device_map={"": "cpu"})
    assert {p.device.type for p in hf.parameters()} == {"cpu"} and not hf.training


@pytest.fixture()
def disk_bridge(tiny_dir, tmp_path):
    """The tiny bridge with layer 1 offloaded to disk (its parameters are meta placeholders between calls)."""
    return sa_lens.load_model(tiny_dir, device_map=_offload_map(tiny_dir, "disk"), offload_folder=tmp_path / "off")


def test_disk_offloaded_bridge_runs_like_the_whole_model(disk_bridge, tiny_bridge):
    layer1 = [n for n, p in disk_bridge.named_parameters() if "layers.1." in n]
    assert layer1 and all(dict(disk_bridge.named_parameters())[n].device.type == "meta" for n in layer1)
    assert len(offloaded_weights(disk_bridge)) == len(layer1)
    assert torch.equal(_logits(disk_bridge), _logits(tiny_bridge))


# --- where hook points live -----------------------------------------------------------------------------------


def test_hook_point_device_follows_each_layer(tiny_bridge):
    tiny_bridge.original_model.model.layers[1].to("meta")  # layer 1 "lives elsewhere"
    for site in ("hook_mlp_out", "hook_attn_out", "hook_resid_post", "attn.hook_z"):
        assert hook_point_device(tiny_bridge, f"blocks.0.{site}") == torch.device("cpu")
        assert hook_point_device(tiny_bridge, f"blocks.1.{site}") == torch.device("meta")
    assert hook_point_device(tiny_bridge, "hook_embed") == torch.device("cpu")


def test_hook_point_device_is_accelerates_execution_device_for_an_offloaded_layer(tiny_bridge):
    cpu_offload(tiny_bridge.original_model.model.layers[1], execution_device=torch.device("cpu"))
    assert tiny_bridge.original_model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    assert hook_point_device(tiny_bridge, "blocks.1.hook_mlp_out") == torch.device("cpu")


def test_hook_point_device_names_the_gpu_accelerate_dispatched_a_layer_to(tiny_bridge, fake_gpus, monkeypatch):
    fake_gpus(2)
    # What dispatch_model leaves on modules it sent to GPU 1: a hook whose execution device is the index (the
    # parameters stay on the CPU here, so the hook's device must win over theirs).
    layer = tiny_bridge.original_model.model.layers[1]
    for module in (layer, layer.self_attn.o_proj):
        monkeypatch.setattr(module, "_hf_hook", SimpleNamespace(execution_device=1), raising=False)
    assert hook_point_device(tiny_bridge, "blocks.1.hook_resid_post") == torch.device("cuda", 1)
    assert hook_point_device(tiny_bridge, "blocks.1.attn.hook_z") == torch.device("cuda", 1)
    assert hook_point_device(tiny_bridge, "blocks.0.hook_resid_post") == torch.device("cpu")


# --- hooks: each layer's tensors placed once, on their layer's device -----------------------------------------


def _sv(model, dtype=torch.float32) -> SafetyVector:
    g = torch.Generator().manual_seed(0)
    return SafetyVector((torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=g) * 3).to(dtype))


@pytest.fixture()
def copies(monkeypatch):
    """Every Tensor.to / .float that makes a new tensor during the test, as (shape, device) of the copy."""
    made: list[tuple[tuple[int, ...], torch.device]] = []
    for name in ("to", "float"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            if out is not self:
                made.append((tuple(self.shape), out.device))
            return out

        monkeypatch.setattr(torch.Tensor, name, spy)
    return made


def test_safety_hooks_place_each_layer_vector_on_its_layer_device(tiny_bridge, monkeypatch):
    tiny_bridge.original_model.model.layers[1].to("meta")
    seen: list[torch.Tensor] = []
    monkeypatch.setitem(sa_lens.steering.FORMULAS, "official", lambda x, v, a: seen.append(v) or x)
    sv = _sv(tiny_bridge, torch.float64)  # fp64 in, fp32 placed: the formulas' dtype
    hooks = dict(safety_hooks(sv, model=tiny_bridge))
    for layer, device in ((0, "cpu"), (1, "meta")):
        placed: DeviceCopies = hooks[f"blocks.{layer}.hook_mlp_out"].__defaults__[0]
        assert placed.devices == [torch.device(device)]  # placed at build time, before any call
        x = torch.zeros(1, 3, tiny_bridge.cfg.d_model, device=device)
        hooks[f"blocks.{layer}.hook_mlp_out"](x, None)
        hooks[f"blocks.{layer}.hook_mlp_out"](x, None)
        first, second = seen[-2:]
        assert first is second and first.device == torch.device(device) and first.dtype == torch.float32
        if device == "cpu":
            assert torch.equal(first, sv.directions[layer].float())


def test_steering_calls_copy_nothing_once_placed(tiny_bridge, copies):
    sv = _sv(tiny_bridge, torch.float64)  # the formulas compute in fp32: a per-call cast would be a copy
    x = torch.randn(2, 4, tiny_bridge.cfg.d_model)
    for formula in ("official", "add", "ablate"):
        for positions in ("all", "prompt"):
            fn = dict(safety_hooks(sv, formula=formula, positions=positions, model=tiny_bridge))["blocks.1.hook_mlp_out"]
            copies.clear()
            fn(x, None)
            fn(x, None)
            assert not [c for c in copies if c[0] == (tiny_bridge.cfg.d_model,)], (formula, positions)


def test_hooks_without_the_model_place_the_vector_on_first_use_only(tiny_bridge, copies):
    sv = _sv(tiny_bridge, torch.float64)  # needs a cast: one copy, on the first call
    fn = dict(safety_hooks(sv))["blocks.0.hook_mlp_out"]
    x = torch.randn(1, 3, tiny_bridge.cfg.d_model)
    copies.clear()
    out1 = fn(x, None)
    assert len([c for c in copies if c[0] == (tiny_bridge.cfg.d_model,)]) == 1
    copies.clear()
    out2 = fn(x, None)
    assert not [c for c in copies if c[0] == (tiny_bridge.cfg.d_model,)]
    assert torch.equal(out1, out2)


def test_placed_hooks_give_bit_identical_generations(tiny_bridge):
    sv = _sv(tiny_bridge)
    with tiny_bridge.hooks(fwd_hooks=safety_hooks(sv, 0.5)):
        unplaced = _logits(tiny_bridge)
    with tiny_bridge.hooks(fwd_hooks=safety_hooks(sv, 0.5, model=tiny_bridge)):
        placed = _logits(tiny_bridge)
    assert torch.equal(placed, unplaced)


def test_steering_on_an_offloaded_layer_matches_the_whole_model(disk_bridge, tiny_bridge):
    sv = _sv(tiny_bridge)
    results = []
    for model in (tiny_bridge, disk_bridge):
        with model.hooks(fwd_hooks=safety_hooks(sv, 0.5, model=model)):
            results.append(_logits(model))
        with DirectionalAblation(sv.directions[0]).apply(model):
            results.append(_logits(model))
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])
    assert not torch.equal(results[0], results[1])


def test_directional_ablation_places_its_direction_on_each_layer_device(tiny_bridge, monkeypatch):
    built = []
    monkeypatch.setattr(sa_lens.interventions, "safety_hooks",
                        lambda *a, **k: built.extend(hooks := safety_hooks(*a, **k)) or hooks)
    tiny_bridge.original_model.model.layers[1].to("meta")
    with DirectionalAblation(_sv(tiny_bridge).directions[0], sites=("resid_post",)).apply(tiny_bridge):
        pass
    placed = {name: fn.__defaults__[0].devices for name, fn in built}
    assert placed == {"blocks.0.hook_resid_post": [torch.device("cpu")],
                      "blocks.1.hook_resid_post": [torch.device("meta")]}


def test_head_ablation_means_placed_on_their_layer_device_in_the_model_dtype(tiny_bridge, copies):
    cfg = tiny_bridge.cfg
    mean_z = torch.randn(cfg.n_layers, cfg.n_heads, cfg.d_head, dtype=torch.float64)
    heads = [(0, 1), (1, 0), (1, 2)]
    plain = dict(ablate_heads_hooks(heads, mean_z))
    placed = dict(ablate_heads_hooks(heads, mean_z, model=tiny_bridge))
    z = torch.randn(2, 3, cfg.n_heads, cfg.d_head)
    for name in placed:
        means: DeviceCopies = placed[name].__defaults__[1]
        assert means.devices == [torch.device("cpu")]
        copies.clear()
        got = placed[name](z, None)
        assert not [c for c in copies if len(c[0]) == 2]  # the [heads, d_head] rows were not copied again
        assert torch.equal(got, plain[name](z, None))
    tiny_bridge.original_model.model.layers[1].to("meta")
    moved = dict(ablate_heads_hooks(heads, mean_z, model=tiny_bridge))
    assert moved["blocks.1.attn.hook_z"].__defaults__[1].devices == [torch.device("meta")]


# --- harm_removal refuses weights that are not in memory ------------------------------------------------------


@pytest.fixture()
def hv(tiny_dir, tiny_dir_other):
    base, _ = sa_lens.load_hf_model(tiny_dir)
    harmful, _ = sa_lens.load_hf_model(tiny_dir_other)
    return HarmVector.from_models(base, harmful).trim(0.1)


def _state(model) -> dict[str, torch.Tensor]:
    """Every weight as the model runs with it: in-memory parameters, and offloaded ones read from their store."""
    offloaded = offloaded_weights(model.original_model if hasattr(model, "original_model") else model)
    out = {}
    for name, p in (model.original_model if hasattr(model, "original_model") else model).named_parameters():
        read = offloaded.get(id(p))
        out[name] = (p if read is None else read()).detach().clone()
    return out


def test_harm_removal_refuses_a_disk_offloaded_layer_and_edits_nothing(disk_bridge, hv):
    before = _state(disk_bridge)
    for edit in (lambda: harm_removal(disk_bridge, hv, 3.0).__enter__(), lambda: apply_harm_removal(disk_bridge, hv)):
        with pytest.raises(InputError, match=r"'model.layers.1.[^']*' is offloaded by accelerate to CPU or disk.*"
                                             r"export_harm_removed\(target_folder.*export_harm_removed_streamed"):
            edit()
    after = _state(disk_bridge)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_harm_removal_refuses_a_cpu_offloaded_hf_model(tiny_dir, hv):
    model, _ = sa_lens.load_hf_model(tiny_dir)
    cpu_offload(model, execution_device=torch.device("cpu"))
    before = _state(model)
    with pytest.raises(InputError, match="offloaded by accelerate"):
        harm_removal(model, hv, 3.0)
    assert all(torch.equal(before[n], t) for n, t in _state(model).items())


def test_harm_removal_refuses_meta_parameters(tiny_dir, hv):
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_dir))
    with pytest.raises(InputError, match=r"is on the meta device.*Load the model without CPU/disk offload"):
        harm_removal(empty, hv, 3.0)


def test_harm_removal_edits_a_model_whose_offloaded_part_it_does_not_touch(disk_bridge, hv):
    layer0 = HarmVector({k: v for k, v in hv.deltas.items() if k.startswith("model.layers.0.")})
    before = {k: v.detach().clone() for k, v in checkpoint_parameters(disk_bridge).items() if k in layer0.deltas}
    with harm_removal(disk_bridge, layer0, 3.0):
        edited = checkpoint_parameters(disk_bridge)
        assert any(not torch.equal(edited[k], before[k]) for k in before)
    assert all(torch.equal(checkpoint_parameters(disk_bridge)[k], before[k]) for k in before)
