"""Benchmark the streaming τH build + global top-k against the official code's flatten-everything reference.

Writes synthetic Llama-shaped checkpoint pairs (TinyLlama-1.1B widths: d_model 2048, MLP 5632, GQA 32/4 heads,
vocab 32000, untied lm_head) to disk as sharded **bf16** safetensors (θH = θb + small noise, rounded to
bf16, so |τH| has many ties, as real bf16 fine-tunes do), then measures each method in its own subprocess
so that peak RSS is clean (``ru_maxrss`` after the work minus the resident set after the same imports;
if an import's transient peak exceeds that, it is counted against the method, i.e. conservatively):

- ``streaming``: ``HarmVector.from_checkpoints(base, harmful, top_k, scope="global")`` (sa_lens.topk);
- ``reference``: the official HDR-TIES code's recipe (paper-notes.md §2.3): load both checkpoints,
  flatten each into one fp32 vector, τ = flat_H − flat_b, t = kthvalue(|τ|, d − ⌊k·d⌋), mask = |τ| ≥ t;
- ``restore``: ``harm_removal`` on the base checkpoint as a bf16 state dict with the saved vector:
  ``restore_nbytes`` against nnz × (2 + 8) bytes, the RSS growth inside the block (the saved originals
  plus the sparse indices moved in), and bit-exact weights after the block.

Both builds report a per-tensor SHA-256 of the kept flat indices, so "identical mask" is checked exactly.
The reference needs ~21 bytes per parameter, so it runs on the largest pair that fits in ``--ref-fraction``
of the available memory; the streaming build also runs on the ≥ 1 B pair alone.

Wall and CPU seconds are both reported: on a shared machine the wall time depends on the neighbours' load.

Usage: ``nice -n 5 python analyses/bench_harm_vector.py [--layers 22] [--workdir /tmp/sa_bench]``;
the printed report is also written to ``analyses/results/bench_harm_vector.json``.
Targets (issue 3): streaming peak ≤ kept entries × 12 B + 3 × the largest fp32 tensor pair; ≥ 4× lower
peak than the reference; wall time no worse; identical mask; restore ≈ top_k × (value + index) bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
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
    names = _names(base)
    start, t0, c0 = _rss_mib(), time.perf_counter(), _cpu_s()
    flats = []
    for folder in (base, harmful):
        state = _state(folder)
        flats.append(torch.cat([state[n].float().reshape(-1) for n in names]))  # parameters_to_vector
        del state
    flat_b, flat_h = flats
    tv = flat_h - flat_b
    d = tv.numel()
    kth = tv.abs().kthvalue(d - int(top_k * d)).values  # topk_values_mask(K) in HDR/Ties_Merge.py
    mask = tv.abs() >= kth
    wall, cpu, peak = time.perf_counter() - t0, _cpu_s() - c0, _peak_mib()
    digests, offset = {}, 0
    sizes = {n: torch.Size(shape).numel() for n, shape in _shapes(base).items()}
    for n in names:
        digests[n] = _digest(torch.nonzero(mask[offset : offset + sizes[n]]).squeeze(1))
        offset += sizes[n]
    return {"wall_s": wall, "cpu_s": cpu, "peak_above_baseline_mib": peak - start, "nnz": int(mask.sum()), "mask_sha256": digests}


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from sa_lens.checkpoints import Checkpoint

    return {n: s.shape for n, s in Checkpoint(folder).specs.items()}


def measure_restore(base: Path, vector: Path) -> dict:
    from sa_lens import HarmVector, harm_removal

    state = _state(base)  # bf16 target θt = θb
    hv = HarmVector.load(vector, sparse=True)
    before = _rss_mib()
    hr = harm_removal(state, hv, lam=3.0)
    with hr:
        nbytes, edited = hr.restore_nbytes, hr.edited
        in_block = _rss_mib()
    fresh = _state(base)
    exact = all(torch.equal(state[n].view(torch.int16), fresh[n].view(torch.int16)) for n in state)
    return {
        "restore_nbytes": nbytes,
        "edited": edited,
        "expected_nbytes": hv.nnz * (2 + 8),
        "rss_in_block_above_loaded_mib": in_block - before,
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
    parser.add_argument("--layers", type=int, default=22, help="decoder layers of the ≥1B pair (22 → 1.10 B params)")
    parser.add_argument("--top-k", type=float, default=0.10)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sa_bench"))
    parser.add_argument("--ref-fraction", type=float, default=0.5, help="share of MemAvailable the reference may use")
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
    ref_layers = int((args.ref_fraction * _available_bytes() / 21 - outer) // per_layer)
    ref_layers = max(1, min(ref_layers, args.layers))
    report["reference_layers"] = ref_layers
    print(f"reference fits {ref_layers} layers in {args.ref_fraction:.0%} of MemAvailable", flush=True)

    base, harmful, n = write_pair(args.workdir, ref_layers)
    stream = run_child("streaming", str(base), str(harmful), str(args.top_k))
    ref = run_child("reference", str(base), str(harmful), str(args.top_k))
    report["runs"][f"side_by_side_{n / 1e9:.2f}B"] = _compare(n, stream, ref)
    if ref_layers < args.layers:
        shutil.rmtree(args.workdir / f"L{ref_layers}", ignore_errors=True)  # disk: keep one pair at a time
    base, harmful, n = write_pair(args.workdir, args.layers)
    vector = args.workdir / "hv.safetensors"
    big = run_child("streaming", str(base), str(harmful), str(args.top_k), str(vector))
    report["runs"][f"streaming_only_{n / 1e9:.2f}B"] = _summarise(n, big)
    report["restore"] = run_child("restore", str(base), str(vector), "0")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


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
