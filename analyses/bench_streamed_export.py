"""Benchmark the streamed export (sa_lens.export_harm_removed_streamed) on a synthetic ≥ 1 B-parameter trio.

Writes θb and θH as ``analyses/bench_harm_vector.py`` does (TinyLlama-1.1B widths, 20 layers = 1.01 B parameters,
untied lm_head, **bf16**, ~1 GiB shards, θH = θb + row-scaled noise, seeded) and a target θt = θb + other noise
(so target ≠ base), all under ``--workdir`` (deleted afterwards unless ``--keep``). Then, each in its own child
process so that its peak is its own:

- ``streamed``: ``export_harm_removed_streamed(θb, θH, θt, out, λ=3, top_k=0.1, scope="global")``, output
  shards cut at ``--max-shard-size`` (default 1GB, about the input's);
- ``today``: ``export_harm_removed(θt, HarmVector.from_checkpoints(θb, θH, top_k=0.1), out, λ=3)``, the export
  that holds τH′ (run where its estimated need, kept entries × 12 bytes + 3 GiB, fits in ``--mem-fraction`` of
  the available memory; on the 1 B trio that is ~4 GiB, so it runs).

Peak memory: each child imports sa_lens, frees what it can, resets its high-water mark (``5 >
/proc/self/clear_refs``) and reads ``VmHWM`` after the export: the peak resident set above the resident set it
started from. The target: ≤ 1.5 × the largest shard of the input. The two outputs are compared tensor by tensor,
byte for byte, on the 1 B trio and on a smaller one (``--small-layers``).

Usage: ``python analyses/bench_streamed_export.py [--layers 20] [--workdir /tmp/sa_stream_bench]`` on an idle
machine; the report is printed and written to ``analyses/results/streamed_export/bench.json`` (no paths).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_harm_vector import write_pair
from safetensors import safe_open
from safetensors.torch import load_file, save_file

RESULTS = Path(__file__).parent / "results" / "streamed_export" / "bench.json"
LAM, TOP_K = 3.0, 0.10


def write_target(base: Path) -> Path:
    """θt = θb + noise of another seed, shard for shard, beside θb (bf16, same index)."""
    target = base.parent / "target"
    if (target / "model.safetensors.index.json").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for file in sorted(base.iterdir()):
        if file.suffix != ".safetensors":
            shutil.copy2(file, target / file.name)
            continue
        shard = load_file(file)
        edited = {n: (t.float() + 1e-3 * torch.randn(t.shape, generator=g)).bfloat16() for n, t in shard.items()}
        save_file(edited, str(target / file.name))
        del shard, edited
    os.sync()
    return target


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(kind: str, base: Path, harmful: Path, target: Path, out: Path, max_shard_size: str) -> dict:
    import gc

    import sa_lens
    from sa_lens.memory import release_freed_memory

    gc.collect()
    release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    start_kib, t0, c0 = _status_kib("VmRSS"), time.perf_counter(), _cpu_s()
    if kind == "streamed":
        sa_lens.export_harm_removed_streamed(base, harmful, target, out, LAM, top_k=TOP_K, max_shard_size=max_shard_size,
                                             progress=False)
    else:
        hv = sa_lens.HarmVector.from_checkpoints(base, harmful, top_k=TOP_K, progress=False)
        sa_lens.export_harm_removed(target, hv, out, LAM, progress=False, max_shard_size=max_shard_size)
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(_cpu_s() - c0, 1),
        "peak_above_start_mib": round((_status_kib("VmHWM") - start_kib) / 1024, 1),
        "start_rss_mib": round(start_kib / 1024, 1),
    }


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode != 0:
        return {"failed": out.returncode, "stderr_tail": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def identical(a: Path, b: Path) -> dict:
    """Tensor-by-tensor byte comparison of two export folders (one tensor pair in memory at a time)."""
    def where(folder: Path) -> dict[str, Path]:
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                out |= {k: file for k in f.keys()}
        return out

    wa, wb = where(a), where(b)
    differ = []
    for name in sorted(set(wa) & set(wb)):
        with safe_open(str(wa[name]), "pt") as fa, safe_open(str(wb[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            differ.append(name)
    return {"tensors": len(wa), "same_names": set(wa) == set(wb), "differing": differ[:5], "identical": set(wa) == set(wb) and not differ}


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def bench_trio(root: Path, layers: int, max_shard_size: str, mem_fraction: float) -> dict:
    base, harmful, params = write_pair(root, layers)
    target = write_target(base)
    shards = sorted(target.glob("*.safetensors"))
    largest_in = max(f.stat().st_size for f in shards)
    result = {"params": params, "input_shards": len(shards), "largest_input_shard_mib": round(largest_in / 2**20, 1)}
    outs = {kind: base.parent / f"out_{kind}" for kind in ("streamed", "today")}
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    result["streamed"] = run_child("streamed", str(base), str(harmful), str(target), str(outs["streamed"]), max_shard_size)
    out_shards = sorted(outs["streamed"].glob("*.safetensors"))
    result["output_shards"] = len(out_shards)
    result["largest_output_shard_mib"] = round(max(f.stat().st_size for f in out_shards) / 2**20, 1) if out_shards else None
    if "peak_above_start_mib" in result["streamed"]:
        result["peak_over_largest_input_shard"] = round(result["streamed"]["peak_above_start_mib"] * 2**20 / largest_in, 3)
        result["within_target_1_5x"] = result["peak_over_largest_input_shard"] <= 1.5
    need = TOP_K * params * 12 + 3 * 2**30  # from_checkpoints' kept entries + the export's tensors and temporaries
    if need <= mem_fraction * _available_bytes():
        result["today"] = run_child("today", str(base), str(harmful), str(target), str(outs["today"]), max_shard_size)
        result["equal_to_today"] = identical(outs["streamed"], outs["today"])
    else:
        result["today"] = f"skipped: needs ~{need / 2**30:.1f} GiB"
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20, help="decoder layers of the big trio (20 → 1.01 B params)")
    parser.add_argument("--small-layers", type=int, default=2, help="decoder layers of the small trio (0 to skip)")
    parser.add_argument("--max-shard-size", default="1GB", help="output shard size (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sa_stream_bench"))
    parser.add_argument("--mem-fraction", type=float, default=0.8, help="share of MemAvailable today's export may use")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints afterwards")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, base, harmful, target, out, size = args.child
        print(json.dumps(child(kind, Path(base), Path(harmful), Path(target), Path(out), size)))
        return
    report = {
        "dtype": "bfloat16 on disk, float32 arithmetic",
        "lam": LAM,
        "top_k": TOP_K,
        "scope": "global",
        "count": "official",
        "max_shard_size": args.max_shard_size,
        "cpus": os.cpu_count(),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "runs": {},
    }
    try:
        for layers in [n for n in (args.small_layers, args.layers) if n]:
            run = bench_trio(args.workdir, layers, args.max_shard_size, args.mem_fraction)
            report["runs"][f"{layers}_layers_{run['params'] / 1e9:.2f}B"] = run
            print(json.dumps(run, indent=1), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
