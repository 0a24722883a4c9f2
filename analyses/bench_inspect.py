"""Time of the sa_lens Inspect provider vs ``sa_lens.generate`` on the same prompts; prints ratios, not absolute claims.

Measures on the embedded model (greedy, ``--tokens`` new tokens, the first ``--prompts`` bundled harmful test
prompts, ``--repeats`` interleaved runs, medians), for Original and a Safe-Align state from four bundled pairs:

1. ``sa_lens.generate`` inside ``state.apply(model)`` (one batch of all prompts; entering the state not timed);
2. ``inspect_ai.eval`` of the same prompts (``harmful_asr`` task: generate + keyword scorer + writing the log) on a
   provider built beforehand (``get_model("sa_lens/default", interventions=...)``): the per-eval overhead;
3. building that provider: loading the model and entering the state (once per ``inspect eval`` command).

Also counts replies identical between 1 and 2. Usage: ``OMP_NUM_THREADS=1 python analyses/bench_inspect.py
[--prompts 16] [--tokens 32] [--repeats 3]``; every run's times go to ``analyses/results/bench_inspect.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from inspect_ai import eval as inspect_eval
from inspect_ai.model import get_model

import sa_lens
from sa_lens import Compose, Demonstration, SafeAlign, demonstration_pairs
from sa_lens.data import load_bundled
from sa_lens.inspect_tasks import harmful_asr
from sa_lens.interventions import save

RESULTS = Path(__file__).parent / "results" / "bench_inspect.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    prompts = [r["prompt"] for r in load_bundled("harmful", "test")[: args.prompts]]
    pairs = demonstration_pairs(Demonstration(r["prompt"], "Sure, here is a step-by-step guide. Step 1:")
                                for r in load_bundled("harmful", "train")[:4])
    states = {"Original": Compose(), "Safe-Align": SafeAlign(pairs=tuple(pairs), alpha=0.12)}
    model = sa_lens.load_model()
    out: dict = {"torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                 "prompts": args.prompts, "tokens": args.tokens, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, state in states.items():
            path = save(state, Path(tmp) / f"{name}.json")
            t0 = time.perf_counter()
            provider = get_model("sa_lens/default", memoize=False, interventions=str(path), batch_size=args.prompts)
            build = time.perf_counter() - t0
            runs = {"generate": [], "inspect": [], "build_provider": build}
            for _ in range(args.repeats):
                with state.apply(model):  # entered outside the clock, as the provider enters it when built
                    t0 = time.perf_counter()
                    ref = sa_lens.generate(model, prompts, args.tokens, batch_size=args.prompts)
                    runs["generate"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                log = inspect_eval(harmful_asr(limit=args.prompts), model=provider, log_dir=str(Path(tmp) / "logs"),
                                   display="none", max_tokens=args.tokens)[0]
                runs["inspect"].append(time.perf_counter() - t0)
                assert log.status == "success", log.error
            order = {r["id"]: i for i, r in enumerate(load_bundled("harmful", "test")[: args.prompts])}
            got = [s.output.completion for s in sorted(log.samples, key=lambda s: order[s.id])]
            runs["identical"] = sum(g == r for g, r in zip(got, ref))
            provider.api.close()
            g, i = statistics.median(runs["generate"]), statistics.median(runs["inspect"])
            runs["ratio"] = i / g
            out["runs"][name] = runs
            print(f"{name:10s} generate {g:6.2f} s   inspect eval {i:6.2f} s   ratio {i / g:4.2f}   "
                  f"provider build {build:5.2f} s   identical replies {runs['identical']}/{len(ref)}")
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
