"""One layer at a time on the lab's cast: directional ablation, Safe-Align and HDR restricted to a single layer.

Usage: ``SA_LENS_CACHE=… python analyses/layerwise.py [-o analyses/results/layerwise] [--step 3]``
(cached lab models; dev-split subsamples; ~17 min per method at ``--step 6 --harmful 10 --safe 6 --qa 6
--tokens 8`` on a loaded 2-core machine; ``layerwise.csv`` is rewritten after each method). Then ``python analyses/make_figures.py``.

- ``directional_ablation`` on θb (the aligned model, which refuses): the difference-of-means direction of θb
  (harmful-train − safe-train requests, last token) removed from ``resid_post`` of one layer. Does refusal
  (1 − ASR) depend on the direction at that layer?
- ``safe_align`` on the SFT model (whose safety eroded): the lab's ICV (official pairs, computed on that model)
  injected at one layer's MLP output with the official formula at ``--alpha`` (default 1.0: at the paper's 0.12
  a single layer's push, 0.1·α·(1 + cos) ≈ 1–2 % of the output's direction, changes nothing measurable).
- ``harm_removal`` on the SFT model: θ − λ·τH′ with the global top-10 % trim of τH = θH − θb, restricted to one
  layer's parameters, λ = ``--lam`` (default 3, the paper's).
Writes ``layerwise.csv`` (tidy, see :func:`sa_lens.analysis.layers.layer_sweep`) and ``run.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import pandas as pd

from sa_lens import data
from sa_lens.analysis.layers import layer_sweep
from sa_lens.data.public import PromptSet, QASet, load_bundled_set
from sa_lens.evaluation.decoding import preset
from sa_lens.harm_vector import HarmVector
from sa_lens.lab import LabConfig, build_models, icv_pairs
from sa_lens.models import load_model
from sa_lens.safety_vector import SafetyVector


def first(name: str, n: int) -> PromptSet | QASet:
    """The first ``n`` items of a bundled dev set, named ``harmful`` / ``safe`` / ``qa`` in the CSV."""
    s = load_bundled_set(name, "dev")
    fields = ("prompts", "ids", "answers") if name == "qa" else ("prompts", "ids", "categories")
    return dataclasses.replace(s, name=name, **{f: getattr(s, f)[:n] for f in fields})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", default="analyses/results/layerwise")
    parser.add_argument("--step", type=int, default=6, help="every STEP-th layer, plus the last")
    parser.add_argument("--harmful", type=int, default=10)
    parser.add_argument("--safe", type=int, default=6)
    parser.add_argument("--qa", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=8, help="generated tokens per harmful/safe reply")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=3.0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    cfg = LabConfig(split="dev")
    cast = build_models(cfg)
    sets = [first("harmful", args.harmful), first("safe", args.safe), first("qa", args.qa)]
    # Greedy, chat template; ``--tokens`` per harmful/safe reply, 10 for a short QA answer.
    budget = {"settings": preset("greedy", max_new_tokens=args.tokens), "max_new_tokens": {"qa": 10}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    aligned = load_model(cast.paths["aligned"])
    layers = sorted({*range(0, aligned.cfg.n_layers, args.step), aligned.cfg.n_layers - 1})
    run = {"layers": layers, "n": {s.name: len(s) for s in sets}, "alpha": args.alpha, "lam": args.lam,
           "top_k": cfg.top_k, "tokens": args.tokens}
    frames: list[pd.DataFrame] = []

    def done(frame: pd.DataFrame, model: str) -> None:
        # Written after each method, so a long run that is stopped keeps what it measured.
        frames.append(frame.assign(model=model))
        pd.concat(frames, ignore_index=True).to_csv(out / "layerwise.csv", index=False)
        (out / "run.json").write_text(json.dumps(run | {"seconds": round(time.perf_counter() - t0, 1)}, indent=2))
        print(f"[{time.perf_counter() - t0:.0f} s] {frame['method'].iloc[0]} done", flush=True)

    direction = SafetyVector.from_prompts(aligned, [r["prompt"] for r in data.load_bundled("harmful", "train")],
                                          [r["prompt"] for r in data.load_bundled("safe", "train")])
    done(layer_sweep(aligned, sets, "directional_ablation", layers, sv=direction, **budget), "aligned θb")
    harmful_model = load_model(cast.paths["harmful"])
    hv = HarmVector.from_models(aligned, harmful_model).trim(cfg.top_k)
    del aligned, harmful_model

    sft = load_model(cast.paths["sft"])
    done(layer_sweep(sft, sets, "harm_removal", layers, hv=hv, lam=args.lam, **budget), "SFT")
    done(layer_sweep(sft, sets, "safe_align", layers, sv=SafetyVector.from_pairs(sft, icv_pairs(cfg, cast)),
                     alpha=args.alpha, **budget), "SFT")
    print(f"Done → {out / 'layerwise.csv'}")


if __name__ == "__main__":
    main()
