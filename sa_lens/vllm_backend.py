"""vLLM as a generation backend of :func:`sa_lens.evaluate`: ``evaluate(..., backend="vllm")``.

How a state reaches vLLM (issue "Past one machine"):

- **Weights.** A state that edits weights (HDR, a knowledge edit, or a composition holding one) is applied to the
  bridge as usual, and the edited weights are written once as a Hugging Face folder
  (:func:`sa_lens.save_checkpoint`) under a name that is the hash of those weights, so a rerun reuses the
  export. The original state is served from the model's own folder (or hub id).
- **Hooks.** Safe-Align runs as forward hooks on each decoder layer's ``mlp`` / ``self_attn`` module inside vLLM's
  workers (:mod:`sa_lens.vllm_worker`), with the ICV read from the bridge in the state's weights (from θ̂
  for Safety Arithmetic), exactly as the HF path reads it.
- **What cannot run here** is refused before any generation (or served by the HF path with ``fallback=True``,
  and the report says so): Safe-Align at ``resid_pre`` / ``resid_post`` (vLLM fuses the residual add into the
  next norm) or with a prompt / generated position policy (vLLM's flattened batches carry no per-row
  positions), directional and head ablation.

Pitfalls this module handles: vLLM's ``generation_config.json`` defaults (``generation_config="vllm"`` and every
sampling parameter set), a second BOS from re-tokenised chat text (prompts go in as token ids built by
:func:`sa_lens.prompts.token_ids`; vLLM's tokenizer is not loaded), ``dtype="auto"`` downcasting fp32 (the
bridge's dtype is passed), hooks skipped by CUDA-graph replays (eager mode by default, and hook calls are
counted per generated token), prefix caching across states (off, and reset whenever hooks change).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sa_lens.errors import InputError
from sa_lens.evaluation.backends import Served, hf_generator
from sa_lens.evaluation.distributed import Shard
from sa_lens.export import save_checkpoint
from sa_lens.fingerprint import content_digest, loaded_fingerprint, state_fingerprint
from sa_lens.generation import hf_and_tokenizer, stop_token_ids
from sa_lens.interventions import Compose, HarmRemoval, Intervention, KnowledgeEdit, SafeAlign
from sa_lens.models import cache_dir
from sa_lens.prompts import format_prompts, token_ids
from sa_lens.provenance import model_name
from sa_lens.safety_vector import processing_mode
from sa_lens.vllm_worker import MODULE_OF_SITE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sa_lens.evaluation.decoding import GenerationSettings

__all__ = ["VLLMBackend", "unsupported"]

EXTENSION = "sa_lens.vllm_worker.SteeringExtension"
CPU_KV_CACHE_BYTES = 2**30
"""KV cache reserved on a CPU-only machine unless the caller sets one: vLLM's CPU build otherwise reserves a
fraction (0.92) of all RAM, which fails beside any other process."""


def _steps(intervention: Intervention) -> list[Intervention]:
    """The intervention as a flat list of non-Compose steps, outermost first."""
    if isinstance(intervention, Compose):
        return [s for step in intervention.steps for s in _steps(step)]
    return [intervention]


def _edits_weights(intervention: Intervention) -> bool:
    return any(isinstance(step, (HarmRemoval, KnowledgeEdit)) for step in _steps(intervention))


def unsupported(intervention: Intervention) -> str | None:
    """Why vLLM cannot serve this state, or None when it can (see the module docstring)."""
    for step in _steps(intervention):
        if isinstance(step, (HarmRemoval, KnowledgeEdit)):
            continue
        if isinstance(step, SafeAlign):
            if step.site not in MODULE_OF_SITE:
                return (f"Safe-Align at site {step.site!r}: vLLM fuses the residual add into the next layer's norm, so "
                        f"only {sorted(MODULE_OF_SITE)} are module outputs there")
            if step.positions != "all":
                return (f"Safe-Align with positions={step.positions!r}: vLLM's flattened batches carry no prompt / "
                        "generated labels; use positions='all'")
            continue
        return f"{type(step).__name__} has no vLLM form (it is neither a weight edit nor a per-layer module hook)"
    return None


class VLLMBackend:
    """Generate with vLLM engines, one engine at a time, steering hooks installed per state.

    Args:
        model_path: the folder or hub id vLLM serves the original weights from; default: the bridge's own
            (``config._name_or_path``, e.g. the embedded model's folder).
        dtype: vLLM's dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); default: the bridge's parameter
            dtype, never vLLM's ``"auto"`` (which may downcast fp32, and HDR's λ·τH′ is a few bf16 ulps).
        tensor_parallel_size, pipeline_parallel_size: vLLM's parallel sizes (GPUs per engine).
        gpu_memory_utilization: fraction of GPU memory vLLM may take; on a CPU-only machine the default reserves
            a 1 GiB KV cache instead (``kv_cache_memory_bytes``).
        enforce_eager: no CUDA graphs (default), so hooks fire on every decode step; with False the hook calls
            are counted and a state whose hooks missed steps is refused.
        fallback: serve a state vLLM cannot run (see :func:`unsupported`) with the HF path instead of refusing it;
            the report names the backend of each state.
        export_dir: where weight-edited states are exported (default ``<sa_lens cache>/vllm-exports``).
        engine_options: any other ``vllm.LLM`` argument (``max_model_len``, ``swap_space``, …).

    Raises:
        ValueError: vLLM is not installed (the message says how to install it); an option this backend sets
            itself (``model``, ``skip_tokenizer_init``, ``worker_extension_cls``, …); parallel sizes that are not
            integers ≥ 1, flags that are not booleans; a torchrun / accelerate job (every rank would start an
            engine on the same GPUs). :meth:`serve` refuses a state vLLM cannot serve (without ``fallback``) and a
            bridge in compatibility mode.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        dtype: str | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool = True,
        fallback: bool = False,
        export_dir: str | os.PathLike | None = None,
        **engine_options: Any,
    ) -> None:
        try:
            import vllm
        except ImportError:
            raise InputError(
                "backend='vllm' needs vLLM: pip install 'sa_lens[vllm]' on a GPU machine; on a CPU-only machine "
                "`make vllm-env` builds .venv-vllm with vLLM's CPU build, and sa_lens runs from there."
            ) from None
        fixed = sorted(set(engine_options) & {"model", "tokenizer", "skip_tokenizer_init", "worker_extension_cls",
                                              "generation_config", "enable_prefix_caching"})
        if fixed:
            raise InputError(f"VLLMBackend sets {fixed} itself (token-id prompts, the steering extension, no "
                             "prefix cache across states); leave them out.")
        for what, flag in (("enforce_eager", enforce_eager), ("fallback", fallback)):
            if not isinstance(flag, bool):
                raise InputError(f"{what} must be True or False, got {flag!r}.")
        if Shard.from_env().parallel:
            raise InputError(
                "backend='vllm' under torchrun / accelerate launch is not supported: every rank would start an engine "
                "on the same GPUs. Run one process and let vLLM parallelise (tensor_parallel_size=…, or the engine "
                "option data_parallel_size=…), or use backend='hf' for data-parallel evaluation.")
        for what, n in (("tensor_parallel_size", tensor_parallel_size), ("pipeline_parallel_size", pipeline_parallel_size)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise InputError(f"{what} must be an integer ≥ 1, got {n!r}.")
        self.version = vllm.__version__
        self.model_path = None if model_path is None else str(model_path)
        self.dtype = dtype
        self.tensor_parallel_size = tensor_parallel_size
        self.pipeline_parallel_size = pipeline_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.fallback = fallback
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.engine_options = engine_options
        self._llm: Any = None
        self._folder: str | None = None
        self._dtype: str | None = None
        self._serving_edits = False
        self.engine_starts = 0

    # ---- what can run ------------------------------------------------------------------------------------

    def check(self, states: Mapping[str, Intervention]) -> None:
        if self.fallback:
            return
        reasons = {name: r for name, iv in states.items() if (r := unsupported(iv))}
        if reasons:
            lines = "; ".join(f"{name!r}: {r}" for name, r in reasons.items())
            raise InputError(f"vLLM cannot serve {lines}. Run those states with backend='hf', or pass "
                             "VLLMBackend(fallback=True) to serve them with the HF path.")

    def order(self, states: Mapping[str, Intervention]) -> list[str]:
        # Each change of weights costs an engine start: states on the weights the running engine holds (edited or
        # not) go first, then the others, each group in the caller's order.
        return sorted(states, key=lambda s: _edits_weights(states[s]) != self._serving_edits)

    def key(self, dtype: str) -> str:
        """The resume-key part: backend, version, dtype and parallel sizes."""
        return f"vllm-{self.version}-{dtype}-tp{self.tensor_parallel_size}-pp{self.pipeline_parallel_size}"

    # ---- serving -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def serve(self, model: Any, intervention: Intervention,
              tokenizer: PreTrainedTokenizerBase | None) -> Iterator[Served]:
        reason = unsupported(intervention)
        if reason is not None:
            if not self.fallback:
                self.check({intervention.name: intervention})
            with intervention.apply(model):
                yield Served(f"hf (fallback: {reason})", "", hf_generator(model, tokenizer))
            return
        if processing_mode(model) == "processed":
            raise InputError("vLLM serves the checkpoint's raw weights, but this bridge's were folded and centred by "
                             "enable_compatibility_mode(), and its vectors are in those coordinates. Use backend='hf', "
                             "or a bridge without compatibility mode.")
        hf, tok = hf_and_tokenizer(model, tokenizer)
        dtype = self.dtype or str(next(hf.parameters()).dtype).removeprefix("torch.")
        with contextlib.ExitStack() as stack:
            specs, edits = [], False
            for step in _steps(intervention):
                if isinstance(step, SafeAlign):
                    # The ICV the HF path would inject: read from the bridge as the steps before left it.
                    sv = step.safety_vector(model)
                    step = dataclasses.replace(step, vector=sv, pairs=None)
                    specs += _hook_specs(step, sv)
                else:
                    edits = True
                stack.enter_context(step.apply(model))
            folder = self._export(model, tok) if edits else self._source(model, tok)
            llm = self._engine(folder, dtype)
            llm.collective_rpc("sa_lens_install", args=(specs,))
            stack.callback(self._remove_hooks, llm)
            llm.reset_prefix_cache()
            stops = stop_token_ids(hf, tok)
            label = f"vllm {self.version} ({dtype}, TP {self.tensor_parallel_size}, PP {self.pipeline_parallel_size})"

            def from_texts(texts: list[str], max_new_tokens: int, *, do_sample: bool = False,
                           temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> list[list[int]]:
                rows = self._generate(llm, tok, texts, max_new_tokens, do_sample, temperature, top_k, seed, stops)
                if specs:
                    self._check_hook_calls(llm, rows)
                return rows

            def tokens(prompts: list[str], settings: GenerationSettings, seed: int) -> list[list[int]]:
                texts = format_prompts(tok, prompts, chat_template=settings.prompt_format == "chat",
                                       system_prompt=settings.system_prompt)
                return from_texts(texts, settings.max_new_tokens, do_sample=settings.do_sample,
                                  temperature=settings.temperature, top_k=settings.top_k, seed=seed)

            def run(prompts: list[str], settings: GenerationSettings, seed: int) -> list[str]:
                return [tok.decode(r, skip_special_tokens=True).strip() for r in tokens(prompts, settings, seed)]

            self._serving_edits = edits
            yield Served(label, self.key(dtype), run, tokens, from_texts)

    def _generate(self, llm: Any, tok: PreTrainedTokenizerBase, texts: list[str], max_new_tokens: int,
                  do_sample: bool, temperature: float, top_k: int | None, seed: int,
                  stops: list[int]) -> list[list[int]]:
        from vllm import SamplingParams

        ids = token_ids(tok, texts, add_special_tokens=True)  # BOS exactly once, as the HF path tokenizes
        # Every knob set: vLLM would otherwise take generation_config.json's. EOS only through stop_token_ids,
        # the same list the HF path stops on; the stop token stays in the row, as there.
        params = [SamplingParams(
            n=1, max_tokens=max_new_tokens, min_tokens=0, temperature=temperature if do_sample else 0.0,
            top_k=(top_k or 0) if do_sample else 0, top_p=1.0, min_p=0.0,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            stop_token_ids=stops, ignore_eos=True, detokenize=False,
            seed=(seed * 1_000_003 + i) % 2**63 if do_sample else None,
        ) for i in range(len(ids))]
        outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    @staticmethod
    def _check_hook_calls(llm: Any, rows: list[list[int]]) -> None:
        """Each engine step generates at most one token per row, so a hook that fired on every step fired at
        least as often as the longest reply has tokens; fewer means CUDA-graph replays skipped it."""
        need = max((len(r) for r in rows), default=0)
        per_worker = llm.collective_rpc("sa_lens_hook_calls")
        seen: dict[int, int] = {}
        for calls in per_worker:
            for layer, n in calls.items():
                seen[layer] = max(seen.get(layer, 0), n)
        short = {layer: n for layer, n in seen.items() if n < need}
        if not seen or short:
            raise RuntimeError(
                f"Safe-Align hooks fired on fewer engine steps than tokens were generated ({short or 'none'} calls, "
                f"{need} tokens): CUDA graphs replayed without them. Use VLLMBackend(enforce_eager=True).")

    def _remove_hooks(self, llm: Any) -> None:
        try:
            llm.collective_rpc("sa_lens_remove")
        except Exception:  # a dead engine cannot be reused: drop it, and the next state starts a fresh one
            self.close()

    # ---- weights and engines -----------------------------------------------------------------------------

    def _source(self, model: Any, tok: PreTrainedTokenizerBase) -> str:
        """The folder (or hub id) of the weights the bridge holds, which vLLM then serves.

        The model's own folder only while its weights are still those :func:`sa_lens.load_model` read from it; a
        bridge edited by hand, or one sa_lens did not load, is exported like an edited state. A ``model_path``
        given to the backend is trusted as it is.
        """
        if self.model_path is not None:
            return self.model_path
        hf, _ = hf_and_tokenizer(model, tok)
        path = getattr(hf.config, "_name_or_path", "")
        loaded = loaded_fingerprint(hf)
        if not path or loaded is None or loaded != state_fingerprint(hf):
            return self._export(model, tok)
        return path

    def _export(self, model: Any, tok: PreTrainedTokenizerBase) -> str:
        hf, _ = hf_and_tokenizer(model, tok)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name(model))[-60:]
        # Named by the weights' bytes (not the fast sums of the resume keys): a reused export is these weights.
        folder = (self.export_dir or cache_dir() / "vllm-exports") / f"{name}-{content_digest(hf)[:20]}"
        if not (folder / "config.json").exists():
            tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            save_checkpoint(model, tmp, tok)
            try:
                tmp.rename(folder)  # atomic: a crash never leaves a half export under the final name
            except OSError:
                if not (folder / "config.json").exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same weights first
        return str(folder)

    def _engine(self, folder: str, dtype: str) -> Any:
        if self._llm is not None and (self._folder, self._dtype) == (folder, dtype):
            return self._llm
        self.close()
        from vllm import LLM

        options = dict(self.engine_options)
        if self.gpu_memory_utilization is not None:
            options["gpu_memory_utilization"] = self.gpu_memory_utilization
        elif not torch.cuda.is_available():
            options.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
        if not torch.cuda.is_available():
            # vLLM's CPU build keeps one core for its front end by default: on a 2-core machine that halves the
            # worker's threads (190 → 295 tokens/s measured here with none reserved). A caller's setting wins.
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        self._llm = LLM(
            model=folder, dtype=dtype, skip_tokenizer_init=True, generation_config="vllm",
            enable_prefix_caching=False, enforce_eager=self.enforce_eager, seed=0,
            tensor_parallel_size=self.tensor_parallel_size, pipeline_parallel_size=self.pipeline_parallel_size,
            worker_extension_cls=EXTENSION, **options,
        )
        self._folder, self._dtype = folder, dtype
        self.engine_starts += 1
        return self._llm

    def close(self) -> None:
        """Shut the running engine down and free its memory (its worker processes end)."""
        if self._llm is None:
            return
        with contextlib.suppress(Exception):  # an engine that already died has nothing left to shut
            self._llm.llm_engine.engine_core.shutdown()
        self._llm = self._folder = self._dtype = None
        self._serving_edits = False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _hook_specs(step: SafeAlign, sv: Any) -> list[dict[str, Any]]:
    """The worker-side hooks of one Safe-Align step: per layer its ICV, α, site and formula."""
    per_layer = dict(step.per_layer_alpha)
    layers = range(sv.n_layers) if step.layers is None else step.layers
    return [{"layer": layer, "site": step.site, "formula": step.formula,
             "alpha": per_layer.get(layer, step.alpha), "vector": sv.directions[layer].float().tolist()}
            for layer in layers]
