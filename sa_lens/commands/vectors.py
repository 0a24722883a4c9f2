"""``sa-lens harm-vector`` and ``sa-lens apply``: build τH from two checkpoints; subtract λ·τH′ from a target."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(run=_run_harm_vector)

    p = sub.add_parser("apply", help="Subtract λ·τH′ from a target checkpoint and save the edited model.")
    p.add_argument("--target", required=True, help="θt: hub id or local HF folder")
    p.add_argument("--harm-vector", required=True, help="a .safetensors file written by `sa-lens harm-vector`")
    p.add_argument("--lam", type=float, default=3.0, help="λ (default: %(default)s)")
    p.add_argument("--restrict", action="store_true", help="apply only the parameters the target shares with the vector")
    p.add_argument("-o", "--out", required=True, help="output folder (save_pretrained layout)")
    p.set_defaults(run=_run_apply)


def _run_harm_vector(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sa_lens.harm_vector import HarmVector
    from sa_lens.models import load_hf_model

    base, _ = load_hf_model(args.base)
    harmful, _ = load_hf_model(args.harmful)
    hv = HarmVector.from_models(base, harmful)
    if not args.no_trim:
        hv = hv.trim(args.top_k, args.scope)
    path = hv.save(args.out, lam=args.lam)
    print(f"{path}: {hv.nnz:,} of {hv.numel:,} entries non-zero ({hv.nnz / hv.numel:.1%}).")
    return 0


def _run_apply(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sa_lens.harm_removal import apply_harm_removal
    from sa_lens.harm_vector import HarmVector
    from sa_lens.models import load_hf_model

    model, tokenizer = load_hf_model(args.target)
    hv = HarmVector.load(args.harm_vector, target=model, restrict=args.restrict)
    apply_harm_removal(model, hv, args.lam)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"Saved θt − {args.lam}·τH′ to {args.out} ({hv.nnz:,} weights changed).")
    return 0
