"""Run an analysis on a model in a known state, and give the model back as it was (issue 13, item 6).

An analysis result must not depend on what the caller happened to leave on the model:

- **train/eval mode**: a model left in ``train()`` runs dropout, so every activation, attribution and vector
  would be a random draw. Inside :func:`analysis_state` every module is in eval mode; on exit each module's
  own ``training`` flag is put back as it was (per module, so a partly frozen model keeps its mix), also when
  the analysis raises.
- **hooks left attached**: a TransformerLens hook added with ``bridge.add_hook`` (and not removed), or a plain
  PyTorch hook on any submodule, would silently change what is read. These are refused, naming each hook and
  how to remove it. Hooks sa_lens itself puts on are allowed: the named hooks of its interventions
  (``fn.__name__`` starting ``sa_lens.``, e.g. inside ``with SafeAlign(...).apply(model):``, a state the caller
  chose on purpose), the KV-cache routing pre-hook (:func:`sa_lens.generation.enable_kv_cache`) and the
  pass counter of :func:`sa_lens.positions.prompt_length`. So are the PyTorch hooks the libraries underneath
  install for themselves (transformers' output capturing and TransformerLens's block wiring appear after the
  first forward pass; accelerate's and torch's own): their code lives in those packages.

Precision is not changed here: a bf16/fp16 model runs in its own dtype, and each analysis states the tolerance
it reaches there (e.g. :func:`sa_lens.analysis.heads.dla_components`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from sa_lens.errors import InputError
from sa_lens.eval_mode import eval_mode
from sa_lens.generation import _route_cache
from sa_lens.positions import GenerationPasses

__all__ = ["TORCH_HOOK_DICTS", "analysis_state", "foreign_hooks", "in_analysis_state", "is_machinery_hook"]

# The prefix of every hook sa_lens builds (steering, head ablation): fn.__name__ = "sa_lens.<owner>.<site>".
OWN_HOOK_PREFIX = "sa_lens."
TORCH_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
# Packages whose PyTorch hooks are their own machinery, not a caller's leftover change.
_LIBRARY_PACKAGES = ("transformers", "transformer_lens", "accelerate", "torch")
_F = TypeVar("_F", bound=Callable)


def _from_a_library(fn: Callable) -> bool:
    """A hook whose code lives in one of the libraries underneath (e.g. the permanent TransformerLens hooks its OPT
    adapter wires between ``fc1`` and ``fc2``): their machinery, not a caller's change."""
    package = (getattr(fn, "__module__", None) or type(fn).__module__ or "").split(".")[0]
    return package in _LIBRARY_PACKAGES


def is_machinery_hook(fn: Callable) -> bool:
    """sa_lens's own PyTorch hooks (KV-cache routing, the pass counter) and the libraries' internal ones."""
    return fn is _route_cache or isinstance(getattr(fn, "__self__", None), GenerationPasses) or _from_a_library(fn)


def foreign_hooks(model: torch.nn.Module) -> list[str]:
    """Hooks on ``model`` that sa_lens did not put there, one description per hook (empty: none).

    TransformerLens hooks are read from each hook point's handles (``fwd_hooks`` / ``bwd_hooks``), whose
    ``user_hook`` is the caller's function; the PyTorch hook each handle wraps is not counted twice. Every
    other PyTorch hook of every submodule (forward, forward-pre, backward, backward-pre) is listed unless it
    is one of sa_lens's own or a library's internal one.
    """
    found: list[str] = []
    names = {id(module): name or "<model>" for name, module in model.named_modules()}
    for name, module in model.named_modules():
        wrapped: set[int] = set()
        for direction in ("fwd", "bwd"):
            for handle in getattr(module, f"{direction}_hooks", None) or []:
                wrapped.add(handle.hook.id)
                fn = handle.user_hook
                label = getattr(fn, "__name__", repr(fn))
                if not (label.startswith(OWN_HOOK_PREFIX) or _from_a_library(fn)):
                    kind = "permanent " if handle.is_permanent else ""
                    found.append(f"{kind}TransformerLens {direction} hook {label!r} on {name or '<model>'}")
        for attr in TORCH_HOOK_DICTS:
            for hook_id, fn in getattr(module, attr).items():
                if hook_id in wrapped or is_machinery_hook(fn):
                    continue
                label = getattr(fn, "__qualname__", repr(fn))
                found.append(f"PyTorch {attr.strip('_').replace('_hooks', '')} hook {label!r} on {names[id(module)]}")
    return found


@contextlib.contextmanager
def analysis_state(model: torch.nn.Module, what: str = "this analysis") -> Iterator[torch.nn.Module]:
    """Run the block with ``model`` in eval mode and no foreign hooks; restore every module's mode on exit.

    Nesting is safe (an inner block finds eval mode and restores eval mode; the outer one restores the caller's).

    Args:
        model: a TransformerBridge (or any ``nn.Module``).
        what: the analysis' name, for the error message.

    Yields:
        The same model.

    Raises:
        ValueError: hooks sa_lens did not add are attached (each named, with how to remove it); nothing is
            changed then.
    """
    found = foreign_hooks(model)
    if found:
        listed = "; ".join(found[:8]) + (f"; and {len(found) - 8} more" if len(found) > 8 else "")
        raise InputError(
            f"{what} refuses to run with hooks left on the model, which would change what it reads: {listed}. "
            "Remove TransformerLens hooks with model.reset_hooks(including_permanent=True) and PyTorch hooks with "
            "the handle their register_*_hook call returned (handle.remove()); to analyse a modified model, apply "
            "the change as a sa_lens intervention (with iv.apply(model): ...)."
        )
    with eval_mode(model):
        yield model


def in_analysis_state(fn: _F) -> _F:
    """Decorate an analysis entry point taking ``model``: its body runs inside :func:`analysis_state`."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        model = signature.bind(*args, **kwargs).arguments["model"]
        with analysis_state(model, f"{fn.__qualname__}()"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
