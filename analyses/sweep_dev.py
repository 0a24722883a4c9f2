"""Choose the lab's defaults on the dev split: λ (TIES), top-k, λ (task vector) and α, one knob at a time.

Usage: ``python analyses/sweep_dev.py [-o analyses/results/sweep_dev.json]`` (uses the cached lab models; builds them if
absent). Each grid point is one model state measured on the dev split in both scenarios. The selection
rule is fixed before looking at the numbers: in the SFT scenario, the lowest ASR among settings whose
over-refusal rises by at most 10 points and whose utility falls by at most 5 points against Original;
ties go to the first setting in the grid; when no setting qualifies, the paper's value stays. Never run
this on the test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from sa_lens.lab import LabConfig, LabSession

GRID = {
    "HDR (TIES top-k)": [{"lam": lam, "top_k": 0.10} for lam in (0.5, 1.0, 1.5, 2.0, 3.0)]
    + [{"lam": 1.0, "top_k": k} for k in (0.05, 0.20)],
    "HDR (task vector)": [{"tv_lam": lam} for lam in (0.1, 0.25, 0.5, 1.0)],
    "Safe-Align": [{"alpha": a} for a in (0.12, 0.5, 1.0, 2.0)],
}


def select(rows: list[dict], original: dict) -> dict | None:
    """The pre-registered rule (module docstring) applied to one method's SFT rows."""
    ok = [
        r
        for r in rows
        if r["over_refusal"] <= original["over_refusal"] + 0.10 and r["utility"] >= original["utility"] - 0.05
    ]
    return min(ok, key=lambda r: r["asr"]) if ok else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", default="analyses/results/sweep_dev.json")
    args = parser.parse_args()
    base = LabConfig(split="dev")
    session = LabSession(base)
    results = []
    for scenario in ("SFT", "BASE"):
        original, _ = session.measure(scenario, "Original")
        results.append({**original, "setting": {}})
        for method, settings in GRID.items():
            for setting in settings:
                row, _ = session.measure(scenario, method, dataclasses.replace(base, **setting))
                results.append({**row, "setting": setting})
                print(f"{scenario:<5} {method:<18} {setting}: ASR {row['asr']:.3f}  over-refusal {row['over_refusal']:.3f}  "
                      f"utility {row['utility']:.3f}  degenerate {row['degenerate']:.3f}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    sft_original = next(r for r in results if r["scenario"] == "SFT" and r["method"] == "Original")
    for method in GRID:
        chosen = select([r for r in results if r["scenario"] == "SFT" and r["method"] == method], sft_original)
        print(f"chosen for {method}: {chosen['setting'] if chosen else 'none meets the rule'}")


if __name__ == "__main__":
    main()
