"""Benchmark Safe-Align on the embedded model, side by side in one run; prints ratios, not absolute claims.

Measures (median of ``--repeats`` interleaved runs, greedy, KV cache on):
1. tokens/s of steered generation (official formula, every layer's MLP output) vs unsteered, same path;
2. that path (``sa_lens.generate`` through the bridge) vs Hugging Face ``generate`` on the same weights
   (eager attention, the bridge's arithmetic, and transformers' default sdpa kernel);
3. ICV extraction on 64 pairs, batched (``--extract-batch`` texts per pass, pairs' common question prefix
   run once) vs one whole text per forward pass through the backbone (``batch_size=1, share_prefix=False``:
   the official code's loop on our path); beside it: batched without prefix sharing, the naive
   ``run_with_cache`` loop (full model per text, the unit tests' reference) and the official ``get_icv`` loop
   on the plain Hugging Face model. All of it twice, interleaved: with exact fp32 matmuls (PyTorch's default
   ``torch.set_float32_matmul_precision("highest")``) and with ``"medium"`` (bf16 inputs, fp32 accumulation:
   AMX/AVX-512-BF16 on CPU), every method under the same setting, plus the cosine of the two ICVs.

Usage: ``python analyses/bench_steering.py [--repeats 3] [--batch 32] [--tokens 32] [--extract-batch 64]
[--extraction-only]``. Targets (issue 4): ratio 1 ≥ 0.9, ratio 2 ≥ 0.7, ratio 3 ≥ 5. Every run's time is also
written to ``analyses/results/bench_steering.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import sa_lens
from sa_lens import data
from sa_lens.generation import generate_tokens
from sa_lens.models import embedded_model_path
from sa_lens.prompts import format_prompts

RESULTS = Path(__file__).parent / "results" / "bench_steering.json"


def _tokens_per_second(model, texts, tokens: int, **kwargs) -> float:
    start = time.perf_counter()
    rows = generate_tokens(model, texts, tokens, **kwargs)
    elapsed = time.perf_counter() - start
    # Every row is computed until the longest one stops, so that is the work done.
    return len(rows) * max(len(r) for r in rows) / elapsed


def _run_with_cache_loop(model, pairs) -> torch.Tensor:
    """The straightforward loop (the unit tests' per-example reference; the official code's shape): each
    whole text through the full model one at a time, block outputs cached, last-4 mean; then PC1 + mean."""
    n_layers = model.cfg.n_layers
    names = {f"blocks.{layer}.hook_out" for layer in range(n_layers)}
    states = []
    with torch.no_grad():
        for text in (t for pair in pairs for t in pair):
            ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
            _, cache = model.run_with_cache(ids, names_filter=lambda n: n in names)
            states.append(torch.stack([cache[f"blocks.{layer}.hook_out"][0, -4:].mean(0) for layer in range(n_layers)]))
    diffs = (torch.stack(states[0::2]) - torch.stack(states[1::2])).flatten(1)
    mean = diffs.mean(0)
    _, _, vh = torch.linalg.svd(diffs - mean, full_matrices=False)
    return (vh[0] + mean).view(n_layers, -1)


def _official_loop(hf, tokenizer, pairs) -> torch.Tensor:
    """The official code's ``get_icv`` loop on the plain Hugging Face model (paper-notes.md §3.2): one whole
    text per forward pass (logits included), forward hooks on every decoder layer keep ``out[0]``'s last-4
    mean; then PC1 + mean. Tokens as the bridge tokenizes them, so every method reads the same text."""
    layers = hf.model.layers
    states: list[list[torch.Tensor]] = []

    def keep(module, args, out, layer):
        hidden = out[0] if isinstance(out, tuple) else out
        states[-1][layer] = hidden[0, -4:].float().mean(0)

    handles = [m.register_forward_hook(lambda m, a, o, layer=i: keep(m, a, o, layer)) for i, m in enumerate(layers)]
    try:
        with torch.no_grad():
            for text in (t for pair in pairs for t in pair):
                states.append([None] * len(layers))
                hf(**tokenizer(text, return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    stacked = torch.stack([torch.stack(s) for s in states])
    diffs = (stacked[0::2] - stacked[1::2]).flatten(1)
    mean = diffs.mean(0)
    _, _, vh = torch.linalg.svd(diffs - mean, full_matrices=False)
    return (vh[0] + mean).view(len(layers), -1)


def _cpu() -> dict:
    """The CPU's name and whether it has bf16 matmul units (what 'medium' precision runs on); Linux only."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return {"name": platform.processor()}
    lines = info.read_text().splitlines()
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")  # noqa: E731
    flags = set(field("flags").split())
    return {"name": field("model name"), "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--extract-batch", type=int, default=64, help="texts per forward pass, batched extraction")
    parser.add_argument("--extraction-only", action="store_true", help="skip the generation measurements")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = sa_lens.load_model()
    hf = {
        attn: AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32, attn_implementation=attn).eval()
        for attn in ("eager", "sdpa")
    }
    rows = data.load_bundled("harmful", "train")
    prompts = [r["prompt"] for r in rows][: args.batch]
    texts = format_prompts(model.tokenizer, prompts)
    q = [r["prompt"] for r in rows][:64]
    pairs = [
        (sa_lens.demonstration_text(p, "Sure, here is how to do it step by step."),
         sa_lens.demonstration_text(p, "I do not answer this question because it is harmful"))
        for p in q
    ]
    sv = sa_lens.SafetyVector.from_pairs(model, pairs[:16])
    hooks = sa_lens.safety_hooks(sv, alpha=0.12)
    results: dict[str, list[float]] = {k: [] for k in ("unsteered", "steered", "hf_eager", "hf_sdpa")}
    for _ in range(0 if args.extraction_only else args.repeats):
        results["unsteered"].append(_tokens_per_second(model, texts, args.tokens))
        with model.hooks(fwd_hooks=hooks):
            results["steered"].append(_tokens_per_second(model, texts, args.tokens))
        for attn, m in hf.items():
            results[f"hf_{attn}"].append(_tokens_per_second(m, texts, args.tokens, tokenizer=model.tokenizer))
    med = {k: statistics.median(v) for k, v in results.items() if v}
    # The per-example loop is the official code's: one whole text per forward pass, nothing shared.
    runs = {"batched": (args.extract_batch, True), "batched_no_prefix_sharing": (args.extract_batch, False),
            "per_example": (1, False)}
    precisions = ("highest", "medium")
    timings = {(p, k): [] for p in precisions for k in [*runs, "run_with_cache_loop", "official_loop_hf"]}
    vectors = {}
    for _ in range(args.repeats):
        for precision in precisions:
            with sa_lens.float32_matmul_precision(precision):
                for name, (bs, share) in runs.items():
                    start = time.perf_counter()
                    sv = sa_lens.SafetyVector.from_pairs(model, pairs, batch_size=bs, share_prefix=share)
                    timings[precision, name].append(time.perf_counter() - start)
                    vectors[precision, name] = sv.directions
                start = time.perf_counter()
                _run_with_cache_loop(model, pairs)
                timings[precision, "run_with_cache_loop"].append(time.perf_counter() - start)
                start = time.perf_counter()
                _official_loop(hf["eager"], model.tokenizer, pairs)
                timings[precision, "official_loop_hf"].append(time.perf_counter() - start)
    t = {k: statistics.median(v) for k, v in timings.items()}
    if not args.extraction_only:
        print(f"generation, batch {args.batch} × {args.tokens} new tokens, tokens/s (median of {args.repeats}):")
        for k, v in med.items():
            print(f"  {k:<10} {v:8.1f}")
        print(f"steered / unsteered (same path):         {med['steered'] / med['unsteered']:.2f}   (target ≥ 0.9)")
        print(f"sa_lens path / HF generate, eager:       {med['unsteered'] / med['hf_eager']:.2f}   (target ≥ 0.7)")
        print(f"sa_lens path / HF generate, sdpa:        {med['unsteered'] / med['hf_sdpa']:.2f}")
    for p in precisions:
        print(f"ICV extraction on 64 pairs, float32 matmul precision {p!r} (median of {args.repeats}, seconds): "
              + ", ".join(f"{k} {t[p, k]:.1f}" for k in [*runs, "run_with_cache_loop", "official_loop_hf"]))
        print(f"  batched / per-example loop:             {t[p, 'per_example'] / t[p, 'batched']:.1f}×   (target ≥ 5)")
        print(f"  batched / run_with_cache loop:          {t[p, 'run_with_cache_loop'] / t[p, 'batched']:.1f}×")
        print(f"  batched / official get_icv loop (HF):   {t[p, 'official_loop_hf'] / t[p, 'batched']:.1f}×")
        print(f"  of which batching alone:                {t[p, 'per_example'] / t[p, 'batched_no_prefix_sharing']:.1f}×, "
              f"prefix sharing {t[p, 'batched_no_prefix_sharing'] / t[p, 'batched']:.2f}×")
    exact, fast = vectors["highest", "batched"].flatten(), vectors["medium", "batched"].flatten()
    print(f"ICV, 'medium' vs 'highest': cosine {torch.nn.functional.cosine_similarity(exact, fast, 0):.6f}, "
          f"largest difference {(fast - exact).abs().max() / exact.abs().max():.1e} of the largest entry")
    print(f"'medium' batched / 'highest' per-example loop: {t['highest', 'per_example'] / t['medium', 'batched']:.1f}×")
    report = {
        "machine": {"threads": torch.get_num_threads(), "cpu": _cpu(), "torch": torch.__version__},
        "args": vars(args),
        "generation_tokens_per_s": results,
        "extraction_s": {f"{p}/{k}": v for (p, k), v in timings.items()},
        "icv_cosine_medium_vs_highest": float(torch.nn.functional.cosine_similarity(exact, fast, 0)),
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
