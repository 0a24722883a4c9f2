"""Write θ̂ = θt − λ·τH′ as a Hugging Face folder that ``from_pretrained`` loads (paper §3.1, eq. 3).

From a checkpoint folder the edit streams shard by shard (one shard in memory; the index, config and
tokenizer files are copied as they are), so a 70B target never has to fit in memory; from an in-memory
model or bridge it edits inside :func:`~sa_lens.harm_removal.harm_removal`, saves each checkpoint tensor
once under its checkpoint name (a bridge's aliases and its own buffers left out) and restores the caller's
weights bit-exactly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sa_lens.bridge import checkpoint_tokenizer, is_bridge
from sa_lens.checkpoints import PICKLE_SUFFIXES, Checkpoint
from sa_lens.defaults import DEFAULT_LAM
from sa_lens.errors import InputError
from sa_lens.harm_removal import apply_harm_removal, check_lam, harm_removal
from sa_lens.harm_vector import HarmVector, ModelLike, architecture_state_names, checkpoint_parameters
from sa_lens.parameter_names import checkpoint_name

__all__ = ["export_harm_removed", "save_checkpoint"]


def export_harm_removed(
    target: ModelLike | str | os.PathLike,
    hv: HarmVector,
    out_dir: str | os.PathLike,
    lam: float = DEFAULT_LAM,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> Path:
    """Save the harm-removed target θ̂ = θt − λ·τH′ (fp32 arithmetic, cast to each weight's dtype).

    Args:
        target: θt as a local checkpoint folder of safetensors (edited shard by shard), or an HF model /
            bridge (edited in place for the save, then restored; a tied ``lm_head`` is written once, as
            the embedding, and re-tied by ``from_pretrained``). GPT-2's and Phi-3's fused q/k/v are
            written as the checkpoint fuses them.
        hv: the (trimmed) harm vector; dense or sparse entries.
        out_dir: the folder to write; created; must not be the target folder.
        lam: λ (paper default 3 with top-10 % HDR†; paper-notes.md §2.5).
        tokenizer: written beside the weights for an in-memory target. Default for a bridge loaded by
            :func:`sa_lens.load_model`: the checkpoint's own tokenizer (not TransformerLens's copy, which adds a
            BOS the checkpoint may not); a plain HF model needs it passed (without it the folder has no
            tokenizer, and ``load_model`` refuses it). A folder target's tokenizer files are copied.
        progress: a tqdm bar over the shards.

    Returns:
        ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``sa_lens.load_model``.

    Raises:
        ValueError: λ not finite; names/shapes of ``hv`` that the target lacks; writing onto the target;
            the folder errors of :class:`~sa_lens.checkpoints.Checkpoint`; a state dict (it has no
            ``save_pretrained``: apply :func:`apply_harm_removal` and save it yourself).
    """
    check_lam(lam)
    out = Path(out_dir)
    if isinstance(target, (str, os.PathLike)):
        return _export_folder(Path(target), hv, out, lam, progress)
    model = target.original_model if is_bridge(target) else target
    if not hasattr(model, "save_pretrained"):
        raise InputError("export_harm_removed needs a checkpoint folder or a model with save_pretrained; got a state dict.")
    with harm_removal(target, hv, lam):
        return save_checkpoint(target, out, tokenizer)


def save_checkpoint(model: nn.Module, out_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Save a bridge's or HF model's weights as they are now as a ``from_pretrained`` folder, each tensor once under
    its checkpoint name (:func:`_checkpoint_state_dict`), with ``tokenizer`` (default for a bridge loaded by
    :func:`sa_lens.load_model`: the checkpoint's own).

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    hf = model.original_model if is_bridge(model) else model
    hf.save_pretrained(out, state_dict=_checkpoint_state_dict(hf))
    tokenizer = tokenizer or (checkpoint_tokenizer(model) if is_bridge(model) else None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _checkpoint_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Each tensor of the checkpoint once, under its checkpoint name: parameters, then persistent buffers.

    A bridge mounts its components inside the HF module tree, so ``state_dict()`` lists every weight under
    several aliases (``attn.q``, ``self_attn.q``, ``…._original_component.q_proj``), which
    ``save_pretrained`` refuses as shared tensors, and adds buffers of its own (an unembedding bias on
    ``lm_head``). ``named_parameters`` sees each tensor once, by its first path — the HF one — and a tied
    ``lm_head`` not at all, which ``from_pretrained`` re-ties from the config as for any tied checkpoint;
    buffers are kept only where the architecture itself has them (its state dict built on the meta device).
    """
    own = architecture_state_names(model) or frozenset()
    state = dict(checkpoint_parameters(model))
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            key = checkpoint_name(f"{prefix}.{name}" if prefix else name)
            if key in own and key not in state:
                state[key] = buf
    return state


def _export_folder(src: Path, hv: HarmVector, out: Path, lam: float, progress: bool) -> Path:
    if out.resolve() == src.resolve():
        raise InputError(f"{out}: export into a new folder, not onto the target checkpoint.")
    ckpt = Checkpoint(src)
    missing = sorted(n for n in hv.deltas if n not in ckpt.specs or ckpt.specs[n].shape != tuple(hv.deltas[n].shape))
    if missing:
        raise InputError(
            f"The harm vector has {len(missing)} parameter(s) the target lacks or shapes otherwise (e.g. "
            f"{missing[:3]}); build τH "
            "from checkpoints of the target's architecture, or load it with restrict=True."
        )
    out.mkdir(parents=True, exist_ok=True)
    for file in tqdm(ckpt.files, desc="θt − λ·τH′", unit="shard", disable=not progress):
        names = [n for n in hv.deltas if ckpt.specs[n].file == file]
        if not names:  # nothing to edit (e.g. a shard of integer buffers or a tied lm_head): copy it as it is
            shutil.copy2(file, out / file.name)
            continue
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(file)
        edits = HarmVector({n: hv.deltas[n] for n in names})
        apply_harm_removal(tensors, edits, lam)
        save_file(tensors, str(out / file.name), metadata=metadata)
        del tensors
    weight_root = src if src.is_dir() else src.parent
    for other in weight_root.iterdir():  # config, tokenizer, index: everything but the weights themselves
        # Pickle weights beside the safetensors (pytorch_model.bin and its index) hold the *unedited* θt:
        # copied, they would give the original model to anyone loading with use_safetensors=False.
        stale = other.suffix in (".safetensors", ".h5", ".msgpack", *PICKLE_SUFFIXES) or other.name.endswith(
            (".bin.index.json", ".pt.index.json")
        )
        if other.is_file() and not stale:
            shutil.copy2(other, out / other.name)
    return out
