"""Benchmark the chunked ``state_fingerprint`` (sa_lens/fingerprint.py) against the whole-tensor one it replaced.

The old digest (``sa_lens.evaluation.harness`` before issue 15) converted each parameter whole to float64 and
squared it: ``x = p.double(); x.sum(); (x * x).sum()`` — 16 extra bytes per fp32 entry at its peak, 8.4 GB for a
Llama-3 embedding (128256 × 4096) and more for a 70 B model's. The new one converts ``CHUNK_ELEMENTS`` (2**22)
entries at a time and squares that copy in place: 32 MiB, whatever the tensor.

Each method runs in its own subprocess on one synthetic embedding-like fp32 parameter (default 128256 × 4096,
filled from a seeded normal), so peak memory is clean: the child imports sa_lens.fingerprint, allocates and fills
the tensor, then reads ``ru_maxrss`` (the peak so far: imports + the tensor), runs the method, and reads
``ru_maxrss`` again; the difference is the method's peak extra resident memory (tracemalloc does not see torch's
allocations). The methods alternate (new, old, old, new, …) ``--repeats`` times each; medians are reported.

The old method needs about 20 bytes per entry (the tensor and two float64 temporaries); when that does not fit in
``--mem-fraction`` of the available memory, the table is cut to the rows that fit, and the report says so.

Usage: ``OMP_NUM_THREADS=1 python analyses/bench_fingerprint.py [--rows 128256] [--cols 4096] [--repeats 3]``;
the printed report is also written to ``analyses/results/fingerprint/bench.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "fingerprint" / "bench.json"
OLD_BYTES_PER_ENTRY = 4 + 8 + 8  # the fp32 tensor, its float64 copy, the float64 square
METHODS = ("new", "old")


def old_state_fingerprint(model: torch.nn.Module) -> str:
    """The digest as ``sa_lens.evaluation.harness.state_fingerprint`` computed it before the chunked version."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().double()
            h.update(f"{name}:{x.sum().item():.17g}:{(x * x).sum().item():.17g};".encode())
    hooked = sorted(n for n, hp in getattr(model, "hook_dict", {}).items() if getattr(hp, "fwd_hooks", None))
    h.update(",".join(hooked).encode())
    return h.hexdigest()[:12]


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def child(method: str, rows: int, cols: int, seed: int) -> dict:
    """Run one method on a fresh table in this process; return its wall time, peak extra memory and digest."""
    from sa_lens.fingerprint import state_fingerprint  # imported before the baseline: its RSS is not the method's

    table = torch.nn.Module()
    table.weight = torch.nn.Parameter(torch.empty(rows, cols), requires_grad=False)
    table.weight.data.normal_(generator=torch.Generator().manual_seed(seed))
    before = _peak_bytes()
    fingerprint = state_fingerprint if method == "new" else old_state_fingerprint
    start = time.perf_counter()
    cpu_start = time.process_time()
    digest = fingerprint(table)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"method": method, "wall_s": wall, "cpu_s": cpu, "peak_extra_bytes": _peak_bytes() - before,
            "digest": digest}


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128256, help="rows of the table (Llama-3's vocabulary)")
    parser.add_argument("--cols", type=int, default=4096, help="columns of the table (d_model of a 7-8 B model)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method, interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mem-fraction", type=float, default=0.6,
                        help="share of MemAvailable the old method's ≈ 20 B/entry may take")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.cols, args.seed)))
        return

    from sa_lens.fingerprint import CHUNK_ELEMENTS

    rows, available = args.rows, _available_bytes()
    fitting = int(args.mem_fraction * available) // (OLD_BYTES_PER_ENTRY * args.cols)
    if fitting < rows:
        print(f"the old method needs ≈ {OLD_BYTES_PER_ENTRY * rows * args.cols / 2**30:.1f} GiB; "
              f"{available / 2**30:.1f} GiB available: using {fitting} rows", file=sys.stderr)
        rows = fitting
    runs: list[dict] = []
    order = [m for i in range(args.repeats) for m in (METHODS if i % 2 == 0 else METHODS[::-1])]
    for method in order:
        out = subprocess.run(
            [sys.executable, __file__, "--child", method, "--rows", str(rows), "--cols", str(args.cols),
             "--seed", str(args.seed)],
            check=True, capture_output=True, text=True, env=os.environ.copy(),
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{method}: {runs[-1]['wall_s']:.2f} s, peak extra {runs[-1]['peak_extra_bytes'] / 2**20:.0f} MiB",
              file=sys.stderr)

    summary = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        summary[method] = {
            "wall_s_median": statistics.median(r["wall_s"] for r in mine),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in mine),
            "peak_extra_MiB_max": max(r["peak_extra_bytes"] for r in mine) / 2**20,
            "digests": sorted({r["digest"] for r in mine}),
        }
    new, old = summary["new"], summary["old"]
    entries = rows * args.cols
    report = {
        "what": "state_fingerprint on one fp32 embedding-like parameter: chunked float64 sums (new) vs the "
                "whole-tensor double() copy (old), each run in its own process; peak extra = ru_maxrss after - "
                "before the call",
        "shape": [rows, args.cols], "requested_shape": [args.rows, args.cols], "tensor_MiB": entries * 4 / 2**20,
        "chunk_elements": CHUNK_ELEMENTS, "chunk_float64_MiB": CHUNK_ELEMENTS * 8 / 2**20,
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "methods": summary,
        "ratios": {
            "peak_extra_old_over_new": old["peak_extra_MiB_max"] / max(new["peak_extra_MiB_max"], 1e-9),
            "wall_new_over_old": new["wall_s_median"] / old["wall_s_median"],
            "cpu_new_over_old": new["cpu_s_median"] / old["cpu_s_median"],
        },
        "new_digest_deterministic": len(new["digests"]) == 1,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"\npeak extra memory: old {old['peak_extra_MiB_max']:.0f} MiB / new {new['peak_extra_MiB_max']:.0f} MiB "
          f"= {report['ratios']['peak_extra_old_over_new']:.1f}x less; "
          f"time: new / old = {report['ratios']['wall_new_over_old']:.2f}")


if __name__ == "__main__":
    main()
