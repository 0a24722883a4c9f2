"""``sa-lens`` command line: ``lab`` (the CPU reproduction of Safety Arithmetic), ``harm-vector``, ``apply``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sa_lens.lab import LabConfig

__all__ = ["main"]


def _lab_parser(sub: argparse._SubParsersAction) -> None:
    d = LabConfig()
    p = sub.add_parser(
        "lab",
        help="Reproduce the paper's BASE and SFT tables on the embedded SmolLM2-135M-Instruct (CPU, minutes).",
        description="Builds the aligned / harmful / SFT models by small fine-tunes (cached), then measures "
        "Original, HDR (TIES top-k), HDR (task vector), Safe-Align and Safety Arithmetic on held-out prompts.",
    )
    p.add_argument("-o", "--out", default="sa_lens_report", help="report folder (default: %(default)s)")
    p.add_argument("--split", choices=("dev", "test"), default=d.split, help="evaluation split; tune on dev only")
    p.add_argument("--lam", type=float, default=d.lam, help="λ for HDR with the TIES top-k vector (default: %(default)s)")
    p.add_argument("--top-k", type=float, default=d.top_k, help="fraction of τH kept, in (0, 1] (default: %(default)s)")
    p.add_argument("--tv-lam", type=float, default=d.tv_lam, help="λ for the untrimmed task-vector baseline (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="Safe-Align α (default: %(default)s)")
    p.add_argument("--harmful-data", help="extra public harmful set (CSV, JSON or JSONL), e.g. AdvBench's harmful_behaviors.csv")
    p.add_argument("--harmful-column", help="column holding the prompts (default: the first of prompt/goal/behavior/question/instruction/text)")
    p.add_argument("--harmful-limit", type=int, default=d.harmful_limit, help="use the first N rows of --harmful-data (default: %(default)s)")


def _harm_vector_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "harm-vector",
        help="Build τH = θH − θb from two checkpoints, trim it, and save it (safetensors + JSON sidecar).",
    )
    p.add_argument("--base", required=True, help="θb: hub id or local HF folder")
    p.add_argument("--harmful", required=True, help="θH: fine-tuned from θb on harmful QA (hub id or folder)")
    p.add_argument("--top-k", type=float, default=0.10, help="fraction kept, in (0, 1] (default: %(default)s)")
    p.add_argument("--scope", choices=("global", "per_layer", "per_tensor"), default="global")
    p.add_argument("--no-trim", action="store_true", help="keep the full task vector (the paper's HDR‡ baseline)")
    p.add_argument("--lam", type=float, help="λ to record as the suggested strength")
    p.add_argument("-o", "--out", required=True, help="output .safetensors path")


def _apply_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="Subtract λ·τH′ from a target checkpoint and save the edited model.")
    p.add_argument("--target", required=True, help="θt: hub id or local HF folder")
    p.add_argument("--harm-vector", required=True, help="a .safetensors file written by `sa-lens harm-vector`")
    p.add_argument("--lam", type=float, default=3.0, help="λ (default: %(default)s)")
    p.add_argument("--restrict", action="store_true", help="apply only the parameters the target shares with the vector")
    p.add_argument("-o", "--out", required=True, help="output folder (save_pretrained layout)")


def _run_harm_vector(args: argparse.Namespace) -> None:
    from sa_lens.harm_vector import HarmVector
    from sa_lens.models import load_hf_model

    base, _ = load_hf_model(args.base)
    harmful, _ = load_hf_model(args.harmful)
    hv = HarmVector.from_models(base, harmful)
    if not args.no_trim:
        hv = hv.trim(args.top_k, args.scope)
    path = hv.save(args.out, lam=args.lam)
    print(f"{path}: {hv.nnz:,} of {hv.numel:,} entries non-zero ({hv.nnz / hv.numel:.1%}).")


def _run_apply(args: argparse.Namespace) -> None:
    from sa_lens.harm_removal import apply_harm_removal
    from sa_lens.harm_vector import HarmVector
    from sa_lens.models import load_hf_model

    model, tokenizer = load_hf_model(args.target)
    hv = HarmVector.load(args.harm_vector, target=model, restrict=args.restrict)
    apply_harm_removal(model, hv, args.lam)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"Saved θt − {args.lam}·τH′ to {args.out} ({hv.nnz:,} weights changed).")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sa-lens`` console script."""
    parser = argparse.ArgumentParser(prog="sa-lens", description="Safety Arithmetic on TransformerLens.")
    sub = parser.add_subparsers(dest="command", required=True)
    _lab_parser(sub)
    _harm_vector_parser(sub)
    _apply_parser(sub)
    args = parser.parse_args(argv)
    if args.command in ("harm-vector", "apply"):
        try:
            (_run_harm_vector if args.command == "harm-vector" else _run_apply)(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"sa-lens {args.command}: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "lab":
        from sa_lens.data import DataError
        from sa_lens.lab import run_lab

        try:
            cfg = LabConfig(
                split=args.split,
                lam=args.lam,
                top_k=args.top_k,
                tv_lam=args.tv_lam,
                alpha=args.alpha,
                harmful_data=args.harmful_data,
                harmful_column=args.harmful_column,
                harmful_limit=args.harmful_limit,
            )
        except ValueError as e:  # names the bad option before any model is built
            parser.error(str(e).replace("top_k", "--top-k").replace("harmful_limit", "--harmful-limit"))
        try:
            run_lab(cfg, args.out)
        except DataError as e:
            print(f"sa-lens lab: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
