"""Benchmark Safe-Align on the embedded model, side by side in one run; prints ratios, not absolute claims.

Measures (median of ``--repeats`` interleaved runs, greedy, KV cache on):
1. tokens/s of steered generation (official formula, every layer's MLP output) vs unsteered, same path;
2. that path (``sa_lens.generate`` through the bridge) vs Hugging Face ``generate`` on the same weights
   (eager attention, the bridge's arithmetic, and transformers' default sdpa kernel);
3. ICV extraction on 64 pairs, batched vs one text per forward pass (the official code's loop).

Usage: ``python analyses/bench_steering.py [--repeats 3] [--batch 32] [--tokens 32]``. Targets (issue 4):
ratio 1 ≥ 0.9, ratio 2 ≥ 0.7, ratio 3 ≥ 5.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

import sa_lens
from sa_lens import data
from sa_lens.generation import generate_tokens
from sa_lens.models import embedded_model_path
from sa_lens.prompts import format_prompts


def _tokens_per_second(model, texts, tokens: int, **kwargs) -> float:
    start = time.perf_counter()
    rows = generate_tokens(model, texts, tokens, **kwargs)
    elapsed = time.perf_counter() - start
    # Every row is computed until the longest one stops, so that is the work done.
    return len(rows) * max(len(r) for r in rows) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
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
    for _ in range(args.repeats):
        results["unsteered"].append(_tokens_per_second(model, texts, args.tokens))
        with model.hooks(fwd_hooks=hooks):
            results["steered"].append(_tokens_per_second(model, texts, args.tokens))
        for attn, m in hf.items():
            results[f"hf_{attn}"].append(_tokens_per_second(m, texts, args.tokens, tokenizer=model.tokenizer))
    med = {k: statistics.median(v) for k, v in results.items()}
    timings: dict[str, list[float]] = {"batched": [], "per_example": []}
    for _ in range(args.repeats):
        for name, bs in (("batched", 32), ("per_example", 1)):
            start = time.perf_counter()
            sa_lens.SafetyVector.from_pairs(model, pairs, batch_size=bs)
            timings[name].append(time.perf_counter() - start)
    t = {k: statistics.median(v) for k, v in timings.items()}
    print(f"generation, batch {args.batch} × {args.tokens} new tokens, tokens/s (median of {args.repeats}):")
    for k, v in med.items():
        print(f"  {k:<10} {v:8.1f}")
    print(f"steered / unsteered (same path):         {med['steered'] / med['unsteered']:.2f}   (target ≥ 0.9)")
    print(f"sa_lens path / HF generate, eager:       {med['unsteered'] / med['hf_eager']:.2f}   (target ≥ 0.7)")
    print(f"sa_lens path / HF generate, sdpa:        {med['unsteered'] / med['hf_sdpa']:.2f}")
    print(f"ICV extraction on 64 pairs: batched {t['batched']:.1f} s, per-example loop {t['per_example']:.1f} s, "
          f"speed-up {t['per_example'] / t['batched']:.1f}×   (target ≥ 5)")


if __name__ == "__main__":
    main()
