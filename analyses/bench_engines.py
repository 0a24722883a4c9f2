"""Throughput of the generation engines, side by side in one run (issue "Past one machine"); prints ratios.

Embedded SmolLM2-135M-Instruct, fp32, greedy, the same 64 prompts (bundled harmful + safe requests, chat
template), 64 new tokens; Safe-Align is the official formula at every layer's MLP output with one ICV.
Rows, each timed ``--repeats`` times in interleaved rounds (median reported):

- ``hf generate (sdpa)``: plain transformers ``generate``, batch ``--batch``, unsteered;
- ``hf generate (sdpa) + Safe-Align``: the same with the ICV as plain PyTorch forward hooks on each ``mlp``;
- ``sa_lens hf``, ``sa_lens hf + Safe-Align``: ``sa_lens.generate`` on the bridge (batch ``--batch``), the
  state applied as sa_lens applies it (TransformerLens hooks);
- ``vllm``, ``vllm + Safe-Align``: the vLLM backend, all prompts at once (vLLM schedules its own batches), the
  hooks in vLLM's workers; engine start-up is timed apart.

Peers: repeng is not on the package index and steering-vectors pins transformers < 5 (both environments have
5.x), so neither runs here; the JSON says so. Run in vLLM's environment (``make vllm-env``):
``OMP_WAIT_POLICY=PASSIVE .venv-vllm/bin/python analyses/bench_engines.py [--repeats 3]``. Targets: vLLM +
Safe-Align ≥ 2× ``sa_lens hf + Safe-Align`` on a CPU (≥ 3× on a GPU) with identical greedy tokens;
``sa_lens hf + Safe-Align`` ≥ 0.95× ``hf generate (sdpa) + Safe-Align``. Results: ``analyses/results/engines/bench.json``.
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
from sa_lens.data.public import load_bundled_set
from sa_lens.evaluation.decoding import preset
from sa_lens.generation import generate_tokens, stop_token_ids
from sa_lens.interventions import Compose, SafeAlign
from sa_lens.models import embedded_model_path
from sa_lens.prompts import format_prompts, tokenize_left_padded
from sa_lens.steering import inject_official
from sa_lens.vllm_backend import VLLMBackend

RESULTS = Path(__file__).parent / "results" / "engines" / "bench.json"
ALPHA = 0.12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    bridge = sa_lens.load_model()
    tok = bridge.tokenizer
    harm, safe = load_bundled_set("harmful").prompts, load_bundled_set("safe").prompts
    prompts = [p for pair in zip(harm, safe) for p in pair][: args.prompts]
    texts = format_prompts(tok, prompts, chat_template=True)
    pairs = [(sa_lens.demonstration_text(q, "Sure, here is how. First,"), sa_lens.demonstration_text(q, "I can't help with that."))
             for q in harm[:30]]
    sv = sa_lens.SafetyVector.from_pairs(bridge, pairs)
    steer = SafeAlign(vector=sv, alpha=ALPHA)

    plain = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32, attn_implementation="sdpa").eval()
    stops = stop_token_ids(plain, tok)

    def plain_run(hooked: bool) -> list[list[int]]:
        handles = []
        if hooked:  # the same step sa_lens applies, as plain hooks on the HF modules
            for layer, block in enumerate(plain.model.layers):
                v = sv.directions[layer]
                handles.append(block.mlp.register_forward_hook(lambda m, a, out, v=v: inject_official(out, v, ALPHA)))
        try:
            rows = []
            for i in range(0, len(texts), args.batch):
                enc = tokenize_left_padded(tok, texts[i : i + args.batch], add_special_tokens=True)
                with torch.inference_mode():
                    out = plain.generate(**enc, max_new_tokens=args.tokens, do_sample=False, eos_token_id=stops,
                                         pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
                for row in out[:, enc["input_ids"].shape[1]:].tolist():
                    rows.append(row[: next((j + 1 for j, t in enumerate(row) if t in stops), len(row))])
            return rows
        finally:
            for h in handles:
                h.remove()

    def sa_lens_run(state) -> list[list[int]]:
        with state.apply(bridge):
            rows = []
            for i in range(0, len(texts), args.batch):
                rows += generate_tokens(bridge, texts[i : i + args.batch], args.tokens)
            return rows

    backend = VLLMBackend()
    settings = preset("greedy", max_new_tokens=args.tokens)
    t0 = time.perf_counter()
    with backend.serve(bridge, Compose(), None) as served:
        served.tokens(prompts[:1], settings, 0)
    startup = time.perf_counter() - t0

    def vllm_run(state) -> list[list[int]]:
        with backend.serve(bridge, state, None) as served:
            return served.tokens(prompts, settings, 0)

    rows_of = {
        "hf generate (sdpa)": lambda: plain_run(False),
        "hf generate (sdpa) + Safe-Align": lambda: plain_run(True),
        "sa_lens hf": lambda: sa_lens_run(Compose()),
        "sa_lens hf + Safe-Align": lambda: sa_lens_run(steer),
        "vllm": lambda: vllm_run(Compose()),
        "vllm + Safe-Align": lambda: vllm_run(steer),
    }
    seconds: dict[str, list[float]] = {k: [] for k in rows_of}
    tokens: dict[str, list[list[int]]] = {}
    for r in range(args.repeats):
        for name, run in rows_of.items():
            t = time.perf_counter()
            tokens[name] = run()
            seconds[name].append(time.perf_counter() - t)
            print(f"round {r + 1} {name}: {seconds[name][-1]:.1f} s", flush=True)
    backend.close()

    table = {}
    for name, secs in seconds.items():
        med = statistics.median(secs)
        n_tok = sum(len(x) for x in tokens[name])
        table[name] = {"seconds": secs, "median_s": round(med, 2), "replies_per_s": round(len(prompts) / med, 3),
                       "tokens_per_s": round(n_tok / med, 1), "generated_tokens": n_tok}
    same = {f"{a} = {b}": sum(x == y for x, y in zip(tokens[a], tokens[b]))
            for a, b in [("vllm", "sa_lens hf"), ("vllm + Safe-Align", "sa_lens hf + Safe-Align"),
                         ("sa_lens hf", "hf generate (sdpa)"), ("sa_lens hf + Safe-Align", "hf generate (sdpa) + Safe-Align")]}
    tps = {k: v["tokens_per_s"] for k, v in table.items()}
    ratios = {
        "vllm + Safe-Align / sa_lens hf + Safe-Align": round(tps["vllm + Safe-Align"] / tps["sa_lens hf + Safe-Align"], 2),
        "vllm / sa_lens hf": round(tps["vllm"] / tps["sa_lens hf"], 2),
        "sa_lens hf + Safe-Align / hf generate (sdpa) + Safe-Align":
            round(tps["sa_lens hf + Safe-Align"] / tps["hf generate (sdpa) + Safe-Align"], 3),
        "sa_lens hf / hf generate (sdpa)": round(tps["sa_lens hf"] / tps["hf generate (sdpa)"], 3),
    }
    print(f"\n{'engine':36} {'replies/s':>10} {'tokens/s':>9}")
    for name, row in table.items():
        print(f"{name:36} {row['replies_per_s']:10.2f} {row['tokens_per_s']:9.1f}")
    print(f"vLLM engine start-up: {startup:.1f} s")
    for k, v in ratios.items():
        print(f"{k}: {v}")
    for k, v in same.items():
        print(f"identical greedy replies, {k}: {v}/{len(prompts)}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "model": sa_lens.provenance.model_name(bridge), "dtype": "float32", "prompts": len(prompts),
        "max_new_tokens": args.tokens, "hf_batch": args.batch, "repeats": args.repeats,
        "machine": {"cpus": torch.get_num_threads(), "processor": platform.machine(), "cuda": torch.cuda.is_available()},
        "versions": {"torch": torch.__version__, "vllm": backend.version, "transformers": __import__("transformers").__version__},
        "vllm_startup_s": round(startup, 1), "engines": table, "ratios": ratios, "identical_greedy_replies": same,
        "peers_not_run": {"repeng": "not on the package index", "steering-vectors": "pins transformers<5"},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
