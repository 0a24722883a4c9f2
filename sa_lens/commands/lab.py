"""``sa-lens lab``: the CPU reproduction of Safety Arithmetic on the embedded model."""

from __future__ import annotations

import argparse

from sa_lens.lab import LabConfig


def register(sub: argparse._SubParsersAction) -> None:
    d = LabConfig()
    p = sub.add_parser(
        "lab",
        help="Reproduce the paper's BASE, SFT and EDIT tables on the embedded SmolLM2-135M-Instruct (CPU, minutes).",
        description="Builds the aligned / harmful / SFT models by small fine-tunes and the edited model by ROME "
        "edits (all cached), then measures Original, HDR (TIES top-k), HDR (task vector), Safe-Align and Safety "
        "Arithmetic on held-out prompts; in EDIT, restricted to the edit area.",
    )
    p.add_argument("-o", "--out", default="sa_lens_report", help="report folder (default: %(default)s)")
    p.add_argument("--split", choices=("dev", "test"), default=d.split, help="evaluation split; tune on dev only")
    p.add_argument("--lam", type=float, default=d.lam, help="λ for HDR with the TIES top-k vector (default: %(default)s)")
    p.add_argument("--top-k", type=float, default=d.top_k, help="fraction of τH kept, in (0, 1] (default: %(default)s)")
    p.add_argument("--tv-lam", type=float, default=d.tv_lam, help="λ for the untrimmed task-vector baseline (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="Safe-Align α (default: %(default)s)")
    p.add_argument("--harmful-data", action="append", help="extra public harmful set (CSV, JSON or JSONL), e.g. AdvBench's "
                   "harmful_behaviors.csv; repeat for several sources (named by file stem): ASR per source with intervals, "
                   "and the macro mean")
    p.add_argument("--harmful-column", help="column holding the prompts (default: the first of prompt/goal/behavior/question/instruction/text)")
    p.add_argument("--harmful-limit", type=int, default=d.harmful_limit, help="use the first N rows of --harmful-data (default: %(default)s)")
    p.add_argument("--n-edits", type=int, default=d.n_edits,
                   help="bundled NoIntentEdit-style instances ROME writes into the edited model (default: %(default)s)")
    p.add_argument("--edit-layer", type=int, default=d.edit_layer,
                   help="layer ROME edits (default: round(5 × n_layers / 32), Llama-2-7b's 5 scaled; 5 on SmolLM2)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sa_lens.lab import run_lab

    try:
        cfg = LabConfig(
            split=args.split,
            lam=args.lam,
            top_k=args.top_k,
            tv_lam=args.tv_lam,
            alpha=args.alpha,
            harmful_data=tuple(args.harmful_data or ()),
            harmful_column=args.harmful_column,
            harmful_limit=args.harmful_limit,
            n_edits=args.n_edits,
            edit_layer=args.edit_layer,
        )
    except ValueError as e:  # names the bad option before any model is built
        parser.error(str(e).replace("top_k", "--top-k").replace("harmful_limit", "--harmful-limit")
                     .replace("n_edits", "--n-edits").replace("edit_layer", "--edit-layer"))
    run_lab(cfg, args.out)
    return 0
