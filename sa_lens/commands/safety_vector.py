"""``sa-lens safety-vector``: extract the in-context safety vector (ICV) of a model and save it."""

from __future__ import annotations

import argparse

from sa_lens.data import DataError
from sa_lens.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "safety-vector",
        help="Extract the ICV [n_layers, d_model] from demonstration pairs or harmful/harmless prompts and save it.",
        description="With --pairs: the official ICV recipe (paper §3.2) on (question, unsafe answer, safe answer) "
        "rows. With --harmful/--harmless: difference of means of the chat-template end of plain requests.",
    )
    p.add_argument("--model", help="hub id or local HF folder (default: the embedded SmolLM2-135M-Instruct)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="CSV/JSON/JSONL with columns question, unsafe_answer and optionally safe_answer "
                     "(default safe answer: the official refusal)")
    src.add_argument("--harmful", help="file of harmful requests (used with --harmless)")
    p.add_argument("--harmless", help="file of harmless requests (with --harmful)")
    p.add_argument("--column", help="prompt column of --harmful/--harmless (default: the first of prompt/goal/behavior/…)")
    p.add_argument("--positions", choices=("last4_mean", "last", "span"), help="read positions (default: last4_mean "
                   "for pairs, as the official code; last for prompts)")
    p.add_argument("--method", choices=("pca_plus_mean", "pca", "mean_diff"),
                   help="how pairs' differences become one vector (default: pca_plus_mean, the official code's)")
    p.add_argument("--layers", help="comma-separated layers to extract over, e.g. 4,5,6 (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default: %(default)s)")
    p.add_argument("--matmul-precision", choices=("highest", "high", "medium"), default="highest",
                   help="torch.set_float32_matmul_precision for the extraction: 'medium' runs matmuls with bf16 "
                        "inputs on AMX CPUs and GPUs (faster, ICV within cosine ≈ 0.99999; default: %(default)s, exact)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors path (a .json sidecar is written beside it)")
    p.set_defaults(run=_run)


def _pairs(path: str) -> list[tuple[str, str]]:
    from sa_lens.data import load_records
    from sa_lens.safety_vector import SAFE_DEMO_ANSWER, demonstration_text

    records = load_records(path, column="question")
    by_lower = {k.lower(): k for k in records[0]}
    if "unsafe_answer" not in by_lower:
        raise DataError(f"{path}: no 'unsafe_answer' column; columns found: {', '.join(map(repr, records[0]))}. "
                        "Each row needs question, unsafe_answer and optionally safe_answer.")
    unsafe, safe = by_lower["unsafe_answer"], by_lower.get("safe_answer")
    pairs = []
    for rowno, r in enumerate(records, start=1):
        answer = r.get(unsafe)
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{path}: row {rowno}: 'unsafe_answer' is empty. Fill in or delete that row.")
        safe_answer = r.get(safe) if safe else None
        pairs.append((demonstration_text(r["prompt"], answer.strip()),
                      demonstration_text(r["prompt"], safe_answer.strip() if safe_answer else SAFE_DEMO_ANSWER)))
    return pairs


def _layers(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--layers must be comma-separated integers such as 4,5,6; got {spec!r}.") from None


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sa_lens.precision import float32_matmul_precision

    if args.harmful and not args.harmless:
        parser.error("--harmful needs --harmless (the two sets whose difference of means is the direction).")
    if args.harmless and not args.harmful:
        parser.error("--harmless is used with --harmful; for demonstration pairs pass --pairs alone.")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be ≥ 1; got {args.batch_size}.")
    layers = _layers(args.layers)
    # The CLI also runs in-process (tests, notebooks): torch's settings are restored afterwards.
    with float32_matmul_precision(args.matmul_precision):
        sv = _extract(args, parser, layers)
    path = sv.save(args.out)
    norms = sv.directions.norm(dim=1)
    peak = int(norms.argmax())
    print(f"{path}: ICV [{sv.n_layers}, {sv.d_model}] from {sv.meta.get('n_pairs') or sv.meta['n_harmful']} "
          f"{'pairs' if args.pairs else 'harmful requests'}; largest norm at layer {peak} ({norms[peak]:.2f}).")
    return 0


def _extract(args: argparse.Namespace, parser: argparse.ArgumentParser, layers: list[int] | None):
    from sa_lens.data import load_prompts
    from sa_lens.models import load_model
    from sa_lens.safety_vector import SafetyVector

    if args.pairs:
        pairs = _pairs(args.pairs)
        model = load_model(args.model)
        return SafetyVector.from_pairs(model, pairs, positions=args.positions or "last4_mean",
                                       method=args.method or "pca_plus_mean", layers=layers, batch_size=args.batch_size)
    if args.positions == "span" or layers is not None or args.method is not None:
        parser.error("--harmful/--harmless take a difference of means at the template end: "
                     "--positions last or last4_mean only, and no --method or --layers.")
    harmful, harmless = load_prompts(args.harmful, args.column), load_prompts(args.harmless, args.column)
    model = load_model(args.model)
    return SafetyVector.from_prompts(model, harmful, harmless, positions=args.positions or "last",
                                     batch_size=args.batch_size)
