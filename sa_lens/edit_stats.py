"""Second-moment statistics of an MLP's keys, C = E[k kᵀ], for ROME's update (Meng et al. 2022, Eq. 2).

ROME spreads an edit over key space by C⁻¹: directions common in ordinary text move least. The original
estimates C on 100,000 Wikipedia tokens; offline, sa_lens estimates it on the text bundled in ``sa_lens.data``
(every request, question, answer and task response, as plain text) or on texts the caller passes. The result is
cached on disk (``<cache>/rome_stats/``) under a key of everything it depends on: the bytes of the weights that
shape the keys (embeddings and layers 0..L), the layer, the texts and the dtype, so a model edited in any of those
gets fresh statistics, and a second edit at the same layer reads them in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from sa_lens.errors import InputError
from sa_lens.eval_mode import eval_mode
from sa_lens.harm_vector import checkpoint_parameters
from sa_lens.mlp_projection import MlpOutput
from sa_lens.models import cache_dir
from sa_lens.parameter_names import layer_index
from sa_lens.prompts import tokenize_padded

__all__ = ["bundled_texts", "key_second_moment"]

_MEMO: dict[str, tuple[Tensor, int]] = {}


class _KeysRead(Exception):
    """Ends a statistics forward pass once the projection's keys are read (as ROME's nethook ``stop=True``)."""


def bundled_texts() -> list[str]:
    """The plain texts the default statistics are estimated on (all of ``sa_lens.data``'s bundled sets)."""
    from sa_lens import data

    texts = [r["prompt"] for name in ("harmful", "safe") for r in data.load_bundled(name)]
    texts += [f"{r['question']} {r['answers'][0]}" for r in data.load_bundled("qa")]
    texts += [f"{r['prompt']} {r['response']}" for r in data.load_bundled("sft_task")]
    return texts


def _weights_digest(model, site: MlpOutput) -> str:
    # The keys are the projection's inputs: later layers and the projection itself cannot change them, so
    # sequential edits at one layer share one estimate (ROME's C is the unedited model's, too).
    own = {site.name, site.name.removesuffix("weight") + "bias"}
    h = hashlib.sha256()
    for name, p in sorted(checkpoint_parameters(model).items()):
        i = layer_index(name)
        if name not in own and (i is None or i <= site.layer):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def key_second_moment(
    model,
    tokenizer,
    site: MlpOutput,
    texts: Sequence[str] | None = None,
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = True,
) -> tuple[Float[Tensor, "d_mlp d_mlp"], int]:
    """E[k kᵀ] of ``site``'s keys over every token of ``texts`` (float64 sums, returned as float32), and the count.

    Args:
        model: the HF model the keys are read from (a bridge's ``original_model``).
        tokenizer: its tokenizer; texts are read raw, with the checkpoint's BOS rule.
        site: the MLP output projection (:func:`sa_lens.mlp_projection.mlp_output`).
        texts: the corpus; None = :func:`bundled_texts`.
        batch_size, max_length: texts per forward pass, and tokens kept per text.
        progress: a tqdm bar over batches.

    Returns:
        ``(C, n_tokens)``, cached on disk and in memory.

    Raises:
        ValueError: no texts.
    """
    texts = bundled_texts() if texts is None else list(texts)
    if not texts:
        raise InputError("key_second_moment needs at least one text.")
    key = hashlib.sha256(json.dumps({
        "weights": _weights_digest(model, site), "weight": site.name, "texts": texts,
        "max_length": max_length, "dtype": str(site.weight.dtype), "version": 1,
    }).encode()).hexdigest()[:24]
    if key in _MEMO:
        return _MEMO[key]
    path = cache_dir() / "rome_stats" / f"{key}.safetensors"
    if path.exists():
        try:
            stored = load_file(str(path))
            _MEMO[key] = stored["mom2"], int(stored["count"].item())
            return _MEMO[key]
        except Exception:  # a damaged cache file (safetensors or OS error) is recomputed and rewritten
            path.unlink(missing_ok=True)
    total = torch.zeros(site.d_key, site.d_key, dtype=torch.float64)
    count = 0

    def hook(_module, args) -> None:
        nonlocal total, count
        k = args[0][mask.to(args[0].device)].detach().double().cpu()
        total += k.T @ k
        count += k.shape[0]
        raise _KeysRead  # the layers above and the LM head cannot change these keys: skip them

    handle = site.module.register_forward_pre_hook(hook)
    device = next(model.parameters()).device
    try:
        with eval_mode(model), torch.no_grad():
            for b in tqdm(range(0, len(texts), batch_size), desc=f"key statistics L{site.layer}", disable=not progress):
                enc = tokenize_padded(tokenizer, texts[b : b + batch_size], "right", add_special_tokens=True, device=device)
                ids, attn = enc["input_ids"][:, :max_length], enc["attention_mask"][:, :max_length]
                mask = attn.bool()
                try:
                    model(input_ids=ids, attention_mask=attn, use_cache=False)
                except _KeysRead:
                    pass
    finally:
        handle.remove()
    mom2 = (total / count).float()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: concurrent runs never share a half file
    save_file({"mom2": mom2, "count": torch.tensor(count)}, str(tmp))
    tmp.rename(path)  # whole or absent: a run killed mid-write leaves no half file under the key
    _MEMO[key] = mom2, count
    return mom2, count
