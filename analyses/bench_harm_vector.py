"""Benchmark the streaming τH build + global top-k against the official code's flatten-everything reference.

Writes synthetic Llama-shaped checkpoint pairs (TinyLlama-1.1B widths: d_model 2048, MLP 5632, GQA 32/4 heads,
vocab 32000, untied lm_head) to disk as sharded **bf16** safetensors (θH = θb + small noise, rounded to
bf16, so |τH| has many ties, as real bf16 fine-tunes do), then measures each method in its own subprocess
so that peak RSS is clean (``ru_maxrss`` after the work minus the resident set after the same imports;
if an import's transient peak exceeds that, it is counted against the method, i.e. conservatively):

- ``streaming``: ``HarmVector.from_checkpoints(base, harmful, top_k, scope="global")`` (sa_lens.topk);
- ``reference``: the official HDR-TIES code's recipe (paper-notes.md §2.3): flatten each checkpoint into
  one fp32 vector, τ = flat_H − flat_b, t = kthvalue(|τ|, d − ⌊k·d⌋), mask = |τ| ≥ t. Written leaner than
  the official code (shard by shard into a preallocated vector, τ in place, θb's vector dropped before the
  trim), so its peak — ≈ 20 B/param: τ, |τ| and kthvalue's own value + int64 index copies — is a floor
  under the official one and the ratio below is conservative;
- ``restore``: ``harm_removal`` on the base checkpoint as a bf16 state dict with the saved vector (loaded
  sparse): ``restore_nbytes`` against nnz × (2 + 8) bytes, the anonymous-memory growth inside the block
  (the saved bf16 originals: the int64 indices are the vector's own, shared, not copied) and after it, and
  bit-exact weights after the block.

Both builds report a per-tensor SHA-256 of the kept flat indices, so "identical mask" is checked exactly.
The reference needs ~20 bytes per parameter; when the ≥ 1 B pair does not fit in ``--ref-fraction`` of the
available memory, it runs on the largest pair that does and the streaming build also runs on the big pair alone.

Each method runs ``--repeats`` times, interleaved (S R R S S R …), after the files are synced to disk; medians of wall and CPU
seconds and the highest peak are reported (on a shared machine the wall time depends on the neighbours' load).

Usage: ``python analyses/bench_harm_vector.py [--layers 20] [--workdir /tmp/sa_bench]`` on an idle machine
(20 layers: 1.01 B parameters; the reference then needs ≈ 19 GiB);
the printed report is also written to ``analyses/results/bench_harm_vector.json``.
Targets (issue 3): streaming peak ≤ kept entries × 12 B (the output) + 3 × the largest fp32 tensor pair; ≥ 4× lower
peak than the reference; wall time no worse; identical mask; restore ≈ top_k × (value + index) bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

D_MODEL, D_MLP, N_HEADS, N_KV, VOCAB = 2048, 5632, 32, 4, 32000
SHARD_BYTES = 1 << 30
RESULTS = Path(__file__).parent / "results" / "bench_harm_vector.json"


def llama_shapes(n_layers: int) -> dict[str, tuple[int, ...]]:
    kv = D_MODEL * N_KV // N_HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, D_MODEL)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (D_MODEL, D_MODEL),
            p + "self_attn.k_proj.weight": (kv, D_MODEL),
            p + "self_attn.v_proj.weight": (kv, D_MODEL),
            p + "self_attn.o_proj.weight": (D_MODEL, D_MODEL),
            p + "mlp.gate_proj.weight": (D_MLP, D_MODEL),
            p + "mlp.up_proj.weight": (D_MLP, D_MODEL),
            p + "mlp.down_proj.weight": (D_MODEL, D_MLP),
            p + "input_layernorm.weight": (D_MODEL,),
            p + "post_attention_layernorm.weight": (D_MODEL,),
        }
    return shapes | {"model.norm.weight": (D_MODEL,), "lm_head.weight": (VOCAB, D_MODEL)}


def write_pair(root: Path, n_layers: int) -> tuple[Path, Path, int]:
    """θb and θH folders (bf16, ~1 GiB shards, index file); returns them and the parameter count."""
    shapes = llama_shapes(n_layers)
    dirs = (root / f"L{n_layers}" / "base", root / f"L{n_layers}" / "harmful")
    if all((d / "model.safetensors.index.json").exists() for d in dirs):
        return *dirs, sum(torch.Size(s).numel() for s in shapes.values())
    g = torch.Generator().manual_seed(0)
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    weight_map, shard, shard_bytes, n_shards = {}, ({}, {}), 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, n_shards
        n_shards += 1
        for d, tensors in zip(dirs, shard):
            save_file(tensors, str(d / f"model-{n_shards:05d}.safetensors"))
        weight_map.update({n: f"model-{n_shards:05d}.safetensors" for n in shard[0]})
        shard, shard_bytes = ({}, {}), 0

    for i, (name, shape) in enumerate(shapes.items()):
        base = torch.randn(shape, generator=g) * 0.02
        # A fine-tune moves a few directions more than others: per-row scales spread |τ| over decades.
        scale = 1e-4 * torch.exp(torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=g))
        harmful = base + scale * torch.randn(shape, generator=g)
        shard[0][name], shard[1][name] = base.bfloat16(), harmful.bfloat16()
        shard_bytes += 2 * base.numel()
        if shard_bytes >= SHARD_BYTES or i == len(shapes) - 1:
            flush()
    for d in dirs:
        index = {"metadata": {}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    os.sync()  # else the first method measured competes with the kernel writing 4 GB back to disk
    return *dirs, sum(torch.Size(s).numel() for s in shapes.values())


def _names(folder: Path) -> list[str]:
    return list(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def _digest(indices: torch.Tensor) -> str:
    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def measure_streaming(base: Path, harmful: Path, top_k: float, save: Path | None) -> dict:
    from sa_lens import HarmVector

    start, t0, c0 = _rss_mib(), time.perf_counter(), _cpu_s()
    hv = HarmVector.from_checkpoints(base, harmful, top_k=top_k, scope="global", progress=False)
    wall, cpu, peak = time.perf_counter() - t0, _cpu_s() - c0, _peak_mib()
    names = _names(base)
    out = {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_above_baseline_mib": peak - start,
        "nnz": hv.nnz,
        "output_mib": sum(hv.sparse(n).nbytes for n in names) / 2**20,
        "largest_fp32_pair_mib": max(2 * 4 * hv.sparse(n).numel for n in names) / 2**20,
        "mask_sha256": {n: _digest(hv.sparse(n).indices) for n in names},
    }
    if save is not None:
        hv.save(save, lam=3.0)
    return out


def measure_reference(base: Path, harmful: Path, top_k: float) -> dict:
    names, shapes = _names(base), _shapes(base)
    sizes = {n: torch.Size(shapes[n]).numel() for n in names}
    offsets, d = {}, 0
    for n in names:
        offsets[n], d = d, d + sizes[n]
    start, t0, c0 = _rss_mib(), time.perf_counter(), _cpu_s()
    flats = []
    for folder in (base, harmful):
        flat = torch.empty(d)  # parameters_to_vector, filled shard by shard (leaner than loading the model)
        for shard in sorted(folder.glob("*.safetensors")):
            for n, t in load_file(shard).items():
                flat[offsets[n] : offsets[n] + sizes[n]] = t.reshape(-1)
        flats.append(flat)
    tv = flats[1].sub_(flats[0])  # in place, and θb's vector dropped: leaner than the official code
    del flats
    magnitude = tv.abs()
    kth = magnitude.kthvalue(d - int(top_k * d)).values  # topk_values_mask(K) in HDR/Ties_Merge.py
    mask = magnitude >= kth
    wall, cpu, peak = time.perf_counter() - t0, _cpu_s() - c0, _peak_mib()
    digests = {n: _digest(torch.nonzero(mask[offsets[n] : offsets[n] + sizes[n]]).squeeze(1)) for n in names}
    return {"wall_s": wall, "cpu_s": cpu, "peak_above_baseline_mib": peak - start, "nnz": int(mask.sum()), "mask_sha256": digests}


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from sa_lens.checkpoints import Checkpoint

    return {n: s.shape for n, s in Checkpoint(folder).specs.items()}


def _anon_mib() -> float:
    """Anonymous resident memory (heap, tensors): unlike RSS it ignores file pages mapped by safetensors."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def measure_restore(base: Path, vector: Path) -> dict:
    import gc

    from sa_lens import HarmVector, harm_removal
    from sa_lens.memory import release_freed_memory

    state = {n: t.clone() for n, t in _state(base).items()}  # bf16 θt = θb in memory, as a loaded model is
    hv = HarmVector.load(vector, sparse=True)
    gc.collect()  # the file-backed tensors _state read, dropped before the baseline
    release_freed_memory()
    before = _anon_mib()
    hr = harm_removal(state, hv, lam=3.0)
    with hr:
        nbytes, edited = hr.restore_nbytes, hr.edited
        in_block = _anon_mib()
    after = _anon_mib()
    fresh = _state(base)
    exact = all(torch.equal(state[n].view(torch.int16), fresh[n].view(torch.int16)) for n in state)
    return {
        "restore_nbytes": nbytes,
        "edited": edited,
        "expected_nbytes": hv.nnz * (2 + 8),
        "originals_mib": hv.nnz * 2 / 2**20,
        "anon_in_block_above_loaded_mib": in_block - before,
        "anon_after_exit_above_loaded_mib": after - before,
        "bit_exact_after_exit": exact,
    }


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode != 0:
        return {"failed": out.returncode, "stderr_tail": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20, help="decoder layers of the ≥1B pair (20 → 1.01 B params)")
    parser.add_argument("--top-k", type=float, default=0.10)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sa_bench"))
    parser.add_argument("--ref-fraction", type=float, default=0.9, help="share of MemAvailable the reference may use")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each method (medians reported)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints afterwards")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import sa_lens  # noqa: F401  # same imports in every child, so the baselines compare

        kind, *rest = args.child
        base, harmful, top_k = Path(rest[0]), Path(rest[1]), float(rest[2])
        if kind == "streaming":
            result = measure_streaming(base, harmful, top_k, Path(rest[3]) if len(rest) > 3 else None)
        elif kind == "reference":
            result = measure_reference(base, harmful, top_k)
        else:
            result = measure_restore(base, harmful)
        print(json.dumps(result))
        return

    report: dict = {"dtype": "bfloat16 on disk, float32 arithmetic", "top_k": args.top_k, "runs": {}}
    per_layer = sum(torch.Size(s).numel() for n, s in llama_shapes(1).items() if ".layers.0." in n)
    outer = sum(torch.Size(s).numel() for n, s in llama_shapes(0).items())
    ref_layers = int((args.ref_fraction * _available_bytes() / 20 - outer) // per_layer)
    ref_layers = max(1, min(ref_layers, args.layers))
    report["reference_layers"] = ref_layers
    print(f"reference fits {ref_layers} layers in {args.ref_fraction:.0%} of MemAvailable", flush=True)

    base, harmful, n = write_pair(args.workdir, ref_layers)
    vector = args.workdir / "hv.safetensors"  # written after the peak is read
    streams, refs = [], []
    for i in range(args.repeats):  # interleaved S R R S S R: each runs after the other as often as after itself
        for kind in ("streaming", "reference") if i % 2 == 0 else ("reference", "streaming"):
            if kind == "streaming":
                streams.append(run_child("streaming", str(base), str(harmful), str(args.top_k), str(vector)))
            else:
                refs.append(run_child("reference", str(base), str(harmful), str(args.top_k)))
    report["runs"][f"side_by_side_{n / 1e9:.2f}B"] = _compare(n, _median_run(streams), _median_run(refs))
    if ref_layers < args.layers:
        shutil.rmtree(args.workdir / f"L{ref_layers}", ignore_errors=True)  # disk: keep one pair at a time
        base, harmful, n = write_pair(args.workdir, args.layers)
        big = run_child("streaming", str(base), str(harmful), str(args.top_k), str(vector))
        report["runs"][f"streaming_only_{n / 1e9:.2f}B"] = _summarise(n, big)
    report["restore"] = run_child("restore", str(base), str(vector), "0")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _median_run(runs: list[dict]) -> dict:
    """One summary of repeated runs: median wall and CPU seconds, the highest peak, every wall time."""
    failed = [r for r in runs if "failed" in r]
    if failed:
        return failed[0]
    out = dict(runs[0])
    for key in ("wall_s", "cpu_s"):
        out[key] = statistics.median(r[key] for r in runs)
    out["peak_above_baseline_mib"] = max(r["peak_above_baseline_mib"] for r in runs)
    out["wall_s_runs"] = [round(r["wall_s"], 2) for r in runs]
    return out


def _summarise(n: int, s: dict) -> dict:
    if "failed" in s:
        return {"params": n, "streaming": s}
    bound = s["output_mib"] + 3 * s["largest_fp32_pair_mib"]
    out = {"params": n, "streaming": {k: v for k, v in s.items() if k != "mask_sha256"}}
    out["target_mib"] = bound
    out["peak_within_target"] = s["peak_above_baseline_mib"] <= bound
    return out


def _compare(n: int, s: dict, r: dict) -> dict:
    out = _summarise(n, s)
    out["reference"] = {k: v for k, v in r.items() if k != "mask_sha256"}
    if "failed" not in s and "failed" not in r:
        out["masks_identical"] = s["mask_sha256"] == r["mask_sha256"] and s["nnz"] == r["nnz"]
        out["peak_ratio_reference_over_streaming"] = r["peak_above_baseline_mib"] / s["peak_above_baseline_mib"]
        out["wall_ratio_reference_over_streaming"] = r["wall_s"] / s["wall_s"]
        out["cpu_ratio_reference_over_streaming"] = r["cpu_s"] / s["cpu_s"]
    return out


if __name__ == "__main__":
    main()
