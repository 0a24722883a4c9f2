"""``sa-lens trace-heads``: which heads carry the harm direction (activation space, and weight space with τH)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trace-heads",
        help="Trace the harm direction through every attention head; write CSV, heatmaps and HTML views.",
        description="Projection of each head's output on the direction, direct logit attribution to the "
        "refusal-vs-compliance logit difference, attribution and activation patching between harmful and "
        "harmless requests; with --harm-vector also τH per head and the rank agreement of the two spaces.",
    )
    p.add_argument("--model", help="hub id or local HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--safety-vector", help="a .safetensors direction from `sa-lens safety-vector` / SafetyVector.save "
                   "(default: difference of means over the bundled harmful-train vs safe-train requests)")
    p.add_argument("--harm-vector", help="a .safetensors τH from `sa-lens harm-vector` (adds the weight-space tables)")
    p.add_argument("--harmful", help="CSV/JSON/JSONL of harmful requests (default: bundled harmful dev split)")
    p.add_argument("--harmless", help="CSV/JSON/JSONL of harmless requests (default: bundled safe dev split)")
    p.add_argument("--refusal-tokens", help="comma-separated reply-initial refusal words (default: I,Sorry,As,Unfortunately)")
    p.add_argument("--compliance-tokens", help="comma-separated reply-initial compliance words (default: Sure,Here,To,The,1,Certainly)")
    p.add_argument("-n", "--pairs", type=int, default=16, help="harmful/harmless pairs traced (default: %(default)s)")
    p.add_argument("--patch", type=int, default=12, help="heads patched exactly, top by attribution; 0 = none (default: %(default)s)")
    p.add_argument("--top", type=int, default=8, help="heads listed per measure and shown in the views (default: %(default)s)")
    p.add_argument("-o", "--out", default="heads_report", help="report folder (default: %(default)s)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sa_lens import data
    from sa_lens.analysis.report import write_head_report
    from sa_lens.harm_vector import HarmVector
    from sa_lens.models import load_model
    from sa_lens.safety_vector import SafetyVector

    if args.pairs < 1 or args.patch < 0 or args.top < 1:
        parser.error("--pairs and --top must be ≥ 1 and --patch ≥ 0")
    model = load_model(args.model)
    harmful = data.load_prompts(args.harmful) if args.harmful else [r["prompt"] for r in data.load_bundled("harmful", "dev")]
    harmless = data.load_prompts(args.harmless) if args.harmless else [r["prompt"] for r in data.load_bundled("safe", "dev")]
    if args.safety_vector:
        sv = SafetyVector.load(args.safety_vector, model)
    else:
        sv = SafetyVector.from_prompts(model, [r["prompt"] for r in data.load_bundled("harmful", "train")],
                                       [r["prompt"] for r in data.load_bundled("safe", "train")])
    hv = HarmVector.load(args.harm_vector, target=model) if args.harm_vector else None
    tokens = {f"{kind}_tokens": getattr(args, f"{kind}_tokens").split(",")
              for kind in ("refusal", "compliance") if getattr(args, f"{kind}_tokens")}
    summary = write_head_report(model, sv, harmful[: args.pairs], harmless[: args.pairs], args.out, hv=hv,
                                patch=args.patch or None, top=args.top, **tokens)
    for measure, heads in summary["top_heads"].items():
        print(f"{measure:<28} {' '.join(heads)}")
    print(f"Head report written to {args.out} (heads.csv, heads_activation.png/.pdf, views.html, summary.json"
          f"{', weights_heads.csv, heads_weights.png/.pdf, agreement.csv' if hv is not None else ''}).")
    return 0
