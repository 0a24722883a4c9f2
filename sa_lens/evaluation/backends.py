"""Generation backends of :func:`sa_lens.evaluate`: who turns a state's prompts into replies.

A backend puts the model in a state and serves it (:meth:`serve`), yielding a :class:`Served` whose ``generate``
turns prompts into replies under :class:`~sa_lens.evaluation.decoding.GenerationSettings`. While a state is
served the bridge itself is in that state too, so what does not generate (multiple-choice scoring, the
state's weight fingerprint) reads the same model.

- ``"hf"`` (:class:`HFBackend`): sa_lens's own batched loop on the bridge (:func:`sa_lens.generate`), every
  TransformerLens hook applied.
- ``"vllm"`` (:class:`sa_lens.vllm_backend.VLLMBackend`): vLLM engines; HDR and other weight edits are served
  from an exported folder, Safe-Align as forward hooks inside vLLM's workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sa_lens.errors import InputError
from sa_lens.generation import generate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sa_lens.evaluation.decoding import GenerationSettings
    from sa_lens.interventions import Intervention

__all__ = ["BACKENDS", "Backend", "HFBackend", "Served", "get_backend"]

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class Served:
    """One state being served.

    Attributes:
        backend: what generates, for the report (``"hf"``, ``"vllm 0.32.0 (float32, TP 1, PP 1)"``, or a
            fallback's reason).
        key: the part of a record's resume key that names the backend (``""`` for ``hf``, whose keys keep the
            form they had before there were backends; a state vLLM hands to HF as a fallback gets HF's key).
        generate: ``(prompts, settings, seed) → replies``, one decoded reply per prompt, in order; ``seed``
            seeds sampling for this batch.
        tokens: the same as generated token ids (each row cut after its first stop token, which stays), where
            the backend has them separately (vLLM); None for ``hf`` (use :func:`sa_lens.generate_tokens`).
        from_texts: ``(texts, max_new_tokens, *, do_sample, temperature, top_k, seed) → token ids`` for texts
            already formatted (a multi-turn chat rendered by the caller); None for ``hf``.
    """

    backend: str
    key: str
    generate: Callable[[list[str], GenerationSettings, int], list[str]]
    tokens: Callable[[list[str], GenerationSettings, int], list[list[int]]] | None = None
    from_texts: Callable[..., list[list[int]]] | None = None


class Backend(Protocol):
    """What :func:`sa_lens.evaluate` needs of a generation backend."""

    def check(self, states: Mapping[str, Intervention]) -> None:
        """Raise InputError, before any generation, for a state this backend cannot serve."""

    def order(self, states: Mapping[str, Intervention]) -> list[str]:
        """The order to serve the states in (records do not depend on it; engine restarts may)."""

    def serve(self, model: Any, intervention: Intervention,
              tokenizer: PreTrainedTokenizerBase | None) -> contextlib.AbstractContextManager[Served]:
        """Put ``model`` in the state and serve it; undone on exit, also after an exception."""

    def close(self) -> None:
        """Release engines and processes."""


class HFBackend:
    """sa_lens's own generation loop on the model (bridge or plain HF), TransformerLens hooks included."""

    name = "hf"

    def check(self, states: Mapping[str, Intervention]) -> None:
        return None

    def order(self, states: Mapping[str, Intervention]) -> list[str]:
        return list(states)

    @contextlib.contextmanager
    def serve(self, model: Any, intervention: Intervention,
              tokenizer: PreTrainedTokenizerBase | None) -> Iterator[Served]:
        with intervention.apply(model):
            yield Served("hf", "", hf_generator(model, tokenizer))

    def close(self) -> None:
        return None


def hf_generator(model: Any, tokenizer: PreTrainedTokenizerBase | None) -> Callable[..., list[str]]:
    """``(prompts, settings, seed) → replies`` through :func:`sa_lens.generate`, the batch as one forward batch."""

    def run(prompts: list[str], settings: GenerationSettings, seed: int) -> list[str]:
        return generate(model, prompts, batch_size=len(prompts), seed=seed, tokenizer=tokenizer,
                        **settings.generate_kwargs())

    return run


def get_backend(backend: str | Backend, **engine_options: Any) -> Backend:
    """A backend from its name (``"hf"``, ``"vllm"``) or a ready object.

    Args:
        backend: a name in :data:`BACKENDS` or a built backend (e.g. ``VLLMBackend(tensor_parallel_size=2)``).
        engine_options: for ``"vllm"``, the options of :class:`sa_lens.vllm_backend.VLLMBackend`
            (``tensor_parallel_size``, ``dtype``, ``gpu_memory_utilization``, … any ``vllm.LLM`` argument).

    Raises:
        ValueError: an unknown name, options given with ``"hf"`` or a built backend, or (``"vllm"``) vLLM not
            installed.
    """
    if not isinstance(backend, str):
        if engine_options:
            raise InputError("engine options go to VLLMBackend(...) when you pass a built backend.")
        return backend
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "hf":
        if engine_options:
            raise InputError(f"engine options {sorted(engine_options)} are for backend='vllm'; the hf backend takes none.")
        return HFBackend()
    from sa_lens.vllm_backend import VLLMBackend

    return VLLMBackend(**engine_options)
