"""The accelerator check of issue "Past one machine": one command, a JSON summary, at most ~8 minutes.

Run on a machine with a GPU and vLLM (``pip install -e ".[vllm]"``)::

    python analyses/gpu_check.py                      # bf16 on cuda; prints JSON, writes analyses/results/gpu_check/cuda.json
    python analyses/gpu_check.py --device cpu         # the same code on vLLM's CPU build (fp32), as a smoke run

Sections (each timed; one that fails is reported with its error and the others still run):

- ``parity``: the embedded model, 16 prompts × 32 tokens, greedy: vLLM backend vs HF backend token for token, for
  Original, HDR (a synthetic τH′), Safe-Align (official formula, all layers) and Safety Arithmetic.
- ``hook_calls``: Safe-Align hook calls per layer vs generated tokens, eager; and with CUDA graphs on
  (``enforce_eager=False``), whether the backend's check catches steps the hooks missed.
- ``tensor_parallel``: TP 1 vs TP 2 tokens and throughput, where two GPUs exist.
- ``throughput``: 64 prompts × 64 tokens, sa_lens HF path vs vLLM backend, unsteered and with Safe-Align.
- ``hdr_memory``: peak accelerator memory of ``harm_removal`` on a synthetic Llama-shaped model of
  ``--hdr-params`` parameters (random weights, τH′ at top-10 %), as a ratio of the model's bytes.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

import sa_lens
from sa_lens import HarmVector, SafetyVector, checkpoint_parameters, demonstration_text
from sa_lens.data.public import load_bundled_set
from sa_lens.evaluation.decoding import preset
from sa_lens.generation import generate_tokens
from sa_lens.interventions import Compose, HarmRemoval, SafeAlign
from sa_lens.prompts import format_prompts
from sa_lens.vllm_backend import VLLMBackend

RESULTS = Path(__file__).parent / "results" / "gpu_check"  # cuda.json, or cpu.json for the smoke run


def _states(model) -> dict:
    params = {k: v.detach().float().cpu() for k, v in checkpoint_parameters(model).items()}
    g = torch.Generator().manual_seed(0)
    hv = HarmVector.from_models(params, {k: v + 2e-3 * torch.randn(v.shape, generator=g) for k, v in params.items()})
    harm = load_bundled_set("harmful").prompts
    pairs = [(demonstration_text(q, "Sure, here is how. First,"), demonstration_text(q, "I can't help with that."))
             for q in harm[:12]]
    sv = SafetyVector.from_pairs(model, pairs)
    hv = hv.trim(0.10)
    return {"Original": Compose(), "Safe-Align": SafeAlign(vector=sv, alpha=0.12), "HDR": HarmRemoval(hv, 3.0),
            "Safety Arithmetic": Compose((HarmRemoval(hv, 3.0), SafeAlign(pairs=pairs, alpha=0.12)))}


def _hf_rows(model, state, texts, tokens, batch=32):
    with state.apply(model):
        return [r for i in range(0, len(texts), batch) for r in generate_tokens(model, texts[i : i + batch], tokens)]


def parity(model, states, prompts, backend) -> dict:
    texts = format_prompts(model.tokenizer, prompts, chat_template=True)
    out = {}
    for name in backend.order(states):
        with backend.serve(model, states[name], None) as served:
            rows = served.tokens(prompts, preset("greedy", max_new_tokens=32), 0)
        want = _hf_rows(model, states[name], texts, 32)
        out[name] = f"{sum(a == b for a, b in zip(rows, want))}/{len(rows)}"
    return out


def hook_calls(model, states, prompts, backend, device: str) -> dict:
    texts = format_prompts(model.tokenizer, prompts, chat_template=True)
    with backend.serve(model, states["Safe-Align"], None):
        backend._llm.collective_rpc("sa_lens_hook_calls")  # reset
        # The backend's own generation without its check, to read the raw counts.
        rows = backend._generate(backend._llm, model.tokenizer, texts, 32, False, 1.0, None, 0, served_stops(model))
        calls = backend._llm.collective_rpc("sa_lens_hook_calls")
    longest = max(len(r) for r in rows)
    out = {"eager": {"tokens_longest_reply": longest, "calls_per_layer": sorted({n for c in calls for n in c.values()})}}
    if device == "cuda":
        graphs = VLLMBackend(dtype=backend.dtype, enforce_eager=False)
        try:
            with graphs.serve(model, states["Safe-Align"], None) as served:
                served.tokens(prompts, preset("greedy", max_new_tokens=32), 0)
            out["cuda_graphs"] = "hooks fired on every step"
        except RuntimeError as e:
            out["cuda_graphs"] = f"caught: {e}"[:300]
        finally:
            graphs.close()
    return out


def served_stops(model) -> list[int]:
    from sa_lens.generation import hf_and_tokenizer, stop_token_ids

    return stop_token_ids(*hf_and_tokenizer(model, None))


def _tps(fn) -> tuple[float, list]:
    t = time.perf_counter()
    rows = fn()
    s = time.perf_counter() - t
    return round(sum(map(len, rows)) / s, 1), rows


def throughput(model, states, prompts, backend) -> dict:
    texts = format_prompts(model.tokenizer, prompts, chat_template=True)
    settings = preset("greedy", max_new_tokens=64)
    out = {}
    for name in ("Original", "Safe-Align"):
        def on_vllm(name=name):
            with backend.serve(model, states[name], None) as served:
                return served.tokens(prompts, settings, 0)
        on_vllm()  # warm
        v, vr = _tps(on_vllm)
        h, hr = _tps(lambda name=name: _hf_rows(model, states[name], texts, 64))
        out[name] = {"vllm_tok_s": v, "sa_lens_hf_tok_s": h, "ratio": round(v / h, 2),
                     "identical": f"{sum(a == b for a, b in zip(vr, hr))}/{len(vr)}"}
    return out


def tensor_parallel(model, states, prompts, dtype: str) -> dict:
    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s)"}
    settings = preset("greedy", max_new_tokens=64)
    out, rows = {}, {}
    for tp in (1, 2):
        be = VLLMBackend(dtype=dtype, tensor_parallel_size=tp)
        try:
            with be.serve(model, states["Safe-Align"], None) as served:
                served.tokens(prompts[:4], settings, 0)
                t = time.perf_counter()
                rows[tp] = served.tokens(prompts, settings, 0)
                out[f"tp{tp}_tok_s"] = round(sum(map(len, rows[tp])) / (time.perf_counter() - t), 1)
        finally:
            be.close()
    out["identical"] = f"{sum(a == b for a, b in zip(rows[1], rows[2]))}/{len(rows[1])}"
    return out


def hdr_memory(n_params: float, device: str, dtype: torch.dtype) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    # Llama-shaped: d_model 64·k, 4·d_model MLP, 32k vocab; k chosen so the model has about n_params parameters.
    layers, vocab = 16, 32000
    d = 64
    while (layers * 12 * (d + 64) ** 2 + 2 * vocab * (d + 64)) < n_params:
        d += 64
    cfg = LlamaConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers, num_attention_heads=d // 64,
                      num_key_value_heads=d // 64, vocab_size=vocab, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    params = dict(checkpoint_parameters(model))
    g = torch.Generator(device=device).manual_seed(0)
    # τH′ as the trim would leave it: 10 % of entries per tensor, sparse, built tensor by tensor on the device.
    from sa_lens import SparseDelta

    deltas = {}
    for k, v in params.items():
        n = v.numel() // 10
        idx = torch.randperm(v.numel(), generator=g, device=device)[:n].sort().values
        deltas[k] = SparseDelta(tuple(v.shape), idx.cpu(), (1e-3 * torch.randn(n, generator=g, device=device)).float().cpu())
    hv = HarmVector(deltas, {"top_k": 0.1})
    model_bytes = sum(v.numel() * v.element_size() for v in params.values())
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    hr = sa_lens.harm_removal(model, hv, lam=3.0)
    with hr:
        restore = hr.restore_nbytes
    out = {"params": sum(v.numel() for v in params.values()), "model_bytes": model_bytes, "restore_nbytes": restore}
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        out["peak_extra / model_bytes"] = round(out["peak_extra_bytes"] / model_bytes, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hdr-params", type=float, default=None, help="synthetic model size (default 3e9 cuda, 3e7 cpu)")
    ap.add_argument("--sections", default="parity,hook_calls,throughput,tensor_parallel,hdr_memory",
                    help="comma-separated subset to run (default: all)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    dname = str(dtype).removeprefix("torch.")
    t_all = time.perf_counter()
    model = sa_lens.load_model(dtype=dtype, device=args.device)
    states = _states(model)
    prompts16 = load_bundled_set("harmful").prompts[:8] + load_bundled_set("safe").prompts[:8]
    h, s = load_bundled_set("harmful").prompts, load_bundled_set("safe").prompts
    prompts64 = [p for pair in zip(h, s) for p in pair][:64]
    backend = VLLMBackend(dtype=dname)
    summary: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": torch.cuda.device_count(),
                     "dtype": dname, "vllm": backend.version, "torch": torch.__version__}
    sections = {
        "parity": lambda: parity(model, states, prompts16, backend),
        "hook_calls": lambda: hook_calls(model, states, prompts16, backend, args.device),
        "throughput": lambda: throughput(model, states, prompts64, backend),
        "tensor_parallel": lambda: tensor_parallel(model, states, prompts64, dname),
        "hdr_memory": lambda: hdr_memory(args.hdr_params or (3e9 if cuda else 3e7), args.device, dtype),
    }
    wanted = args.sections.split(",")
    for name, run in sections.items():
        if name not in wanted:
            continue
        t = time.perf_counter()
        try:
            summary[name] = run()
        except Exception as e:  # one failing section must not hide the others' numbers
            summary[name] = {"error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc()[-1500:]}
        summary[name + "_s"] = round(time.perf_counter() - t, 1)
        if name == "throughput":
            backend.close()
    summary["total_s"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(summary, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.device}.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
