"""``sa-lens harm-vector`` and ``sa-lens apply``: build τH from two checkpoints; subtract λ·τH′ from a target.

Local folders with safetensors weights are streamed (one tensor pair, or one tensor, in memory); hub ids and
pickle-only folders are loaded as models. ``apply --base B --harmful H --target T`` streams from the three folders
without holding τH′ (:mod:`sa_lens.streamed_export`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sa_lens.commands.model_args import edit_area_between, local_or_hub, streamable
from sa_lens.defaults import DEFAULT_LAM, DEFAULT_TOP_K
from sa_lens.errors import InputError
from sa_lens.export import DEFAULT_MAX_SHARD_SIZE
from sa_lens.layer_spec import check_layers, layers_argument
from sa_lens.parameter_names import KINDS, layer_count
from sa_lens.topk import COUNTS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "harm-vector",
        help="Build τH = θH − θb from two checkpoints, trim it, and save it (safetensors + JSON sidecar).",
    )
    p.add_argument("--base", required=True, help="θb: hub id or local HF folder")
    p.add_argument("--harmful", required=True, help="θH: fine-tuned from θb on harmful QA (hub id or folder)")
    p.add_argument("--top-k", type=float, default=DEFAULT_TOP_K, help="fraction kept, in (0, 1] (default: %(default)s)")
    p.add_argument("--scope", choices=("global", "per_layer", "per_tensor"), default="global")
    p.add_argument("--no-trim", action="store_true", help="keep the full task vector (the paper's HDR‡ baseline)")
    p.add_argument("--layers", type=layers_argument, help="only these decoder layers, counted from 0: 4-6, 4,5,6 or 4-6,10")
    p.add_argument("--kinds", type=_kinds, help=f"only these parameter kinds, comma-separated: {','.join(KINDS)}")
    p.add_argument("--edit-area", metavar="EDITED", help="only the layers where EDITED differs from --base, ±1 (paper Eq. 11)")
    p.add_argument("--lam", type=float, help="λ to record as the suggested strength")
    p.add_argument("-o", "--out", required=True, help="output .safetensors path")
    p.set_defaults(run=_run_harm_vector)

    p = sub.add_parser(
        "apply",
        help="Subtract λ·τH′ from a target checkpoint and save the edited model: from a saved harm vector, or "
        "streamed from the --base and --harmful folders without holding τH′ (70B-scale).",
    )
    p.add_argument("--target", required=True, help="θt: hub id or local HF folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--harm-vector", help="a .safetensors file written by `sa-lens harm-vector`")
    source.add_argument("--base", help="θb's safetensors folder: stream τH = θH − θb (with --harmful) instead of a saved vector")
    p.add_argument("--harmful", help="θH's safetensors folder (with --base)")
    # None = not given: a saved --harm-vector was trimmed when it was built, so these are refused beside it.
    p.add_argument("--top-k", type=float, help=f"with --base: fraction kept, in (0, 1] (default: {DEFAULT_TOP_K})")
    p.add_argument("--scope", choices=("global", "per_layer", "per_tensor"), help="with --base (default: global)")
    p.add_argument("--count", choices=COUNTS, help="with --base: which entries top-k keeps, sa_lens.topk (default: official)")
    p.add_argument("--no-trim", action="store_true", help="with --base: subtract the full task vector (HDR‡)")
    p.add_argument("--lam", type=float, default=DEFAULT_LAM, help="λ (default: %(default)s)")
    p.add_argument("--restrict", action="store_true", help="apply only the parameters the target shares with the vector")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="output shard size for a folder target, e.g. 5GB or 2GiB (default: %(default)s)")
    p.add_argument("-o", "--out", required=True, help="output folder (save_pretrained layout)")
    p.set_defaults(run=_run_apply)


def _check_layers(layers: list[int] | None, names) -> None:
    """Refuse --layers naming a layer the model lacks (a typo would otherwise shrink τH silently); the model's
    layers are counted from its parameter names."""
    if layers is None:
        return
    check_layers(layers, layer_count(names))


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {unknown}; choose from {','.join(KINDS)}")
    return kinds


def _run_harm_vector(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sa_lens.checkpoints import Checkpoint
    from sa_lens.harm_vector import HarmVector, checkpoint_parameters
    from sa_lens.models import load_hf_model

    if Path(args.out).suffix != ".safetensors":  # before the build, which can take hours
        raise InputError(f"{args.out}: vector files end in .safetensors (the sidecar goes beside it as .json).")
    for path in (args.base, args.harmful, args.edit_area):
        if path is not None:
            local_or_hub(path)
    layers = args.layers
    if args.edit_area:
        area = edit_area_between(args.base, args.edit_area, ("--base", "--edit-area"))
        print(f"Edit area: layers {list(area.layers)} (changed: {list(area.changed_layers)}).")
        layers = sorted(set(area.layers) & set(layers)) if layers is not None else list(area.layers)
    top_k = None if args.no_trim else args.top_k
    if streamable(args.base) and streamable(args.harmful):
        _check_layers(args.layers, Checkpoint(args.base).specs)
        hv = HarmVector.from_checkpoints(args.base, args.harmful, top_k=top_k, scope=args.scope, layers=layers, kinds=args.kinds)
    else:
        base = load_hf_model(args.base)[0]
        _check_layers(args.layers, checkpoint_parameters(base))
        hv = HarmVector.from_models(base, load_hf_model(args.harmful)[0], layers=layers, kinds=args.kinds)
        hv = hv if top_k is None else hv.trim(top_k, args.scope)
    if not hv.deltas:
        raise InputError(f"No parameters left after --layers {args.layers} / --kinds {args.kinds}; widen the selection.")
    path = hv.save(args.out, lam=args.lam)
    print(f"{path}: {hv.nnz:,} of {hv.numel:,} entries non-zero ({hv.nnz / hv.numel:.1%}).")
    return 0


def _run_apply(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sa_lens.export import export_harm_removed
    from sa_lens.harm_vector import HarmVector
    from sa_lens.models import load_hf_model

    if args.base is not None:
        return _run_apply_streamed(args)
    given = [flag for flag, value in (("--harmful", args.harmful), ("--no-trim", args.no_trim or None),
                                      ("--top-k", args.top_k), ("--scope", args.scope), ("--count", args.count))
             if value is not None]
    if given:
        raise InputError(f"{', '.join(given)} go with --base (a streamed apply); a --harm-vector is applied as it was "
                         "saved (trim it when you build it: sa-lens harm-vector --top-k …).")
    local_or_hub(args.target)
    if streamable(args.target):
        hv = HarmVector.load(args.harm_vector, target=args.target, restrict=args.restrict, sparse=True)
        export_harm_removed(args.target, hv, args.out, args.lam, max_shard_size=args.max_shard_size)
    else:
        model, tokenizer = load_hf_model(args.target)
        hv = HarmVector.load(args.harm_vector, target=model, restrict=args.restrict, sparse=True)
        export_harm_removed(model, hv, args.out, args.lam, tokenizer=tokenizer)
    print(f"Saved θt − {args.lam}·τH′ to {args.out} ({hv.nnz:,} weights changed).")
    return 0


def _run_apply_streamed(args: argparse.Namespace) -> int:
    """``apply --base B --harmful H --target T``: :func:`sa_lens.streamed_export.export_harm_removed_streamed`."""
    from sa_lens.streamed_export import export_harm_removed_streamed

    if args.harmful is None:
        raise InputError("--base needs --harmful: τH = θH − θb is streamed from the two folders.")
    if args.restrict:
        raise InputError("--restrict applies to a saved --harm-vector; with --base, θb, θH and θt must share every parameter.")
    for label, path in (("--base", args.base), ("--harmful", args.harmful), ("--target", args.target)):
        local_or_hub(path)
        if not streamable(path):
            raise InputError(
                f"{label} {path}: the streamed apply reads local safetensors folders only (model.safetensors or its "
                "index). For a hub id or pickle weights, build the vector with `sa-lens harm-vector` and pass "
                "--harm-vector."
            )
    out = export_harm_removed_streamed(
        args.base, args.harmful, args.target, args.out, args.lam,
        top_k=None if args.no_trim else (DEFAULT_TOP_K if args.top_k is None else args.top_k),
        scope=args.scope or "global", count=args.count or "official", max_shard_size=args.max_shard_size,
    )
    print(f"Saved θt − {args.lam}·τH′ to {out} (thresholds and the harm vector's digest in {out}/README.md).")
    return 0
