"""``sa-lens safety-vector``: extract the in-context safety vector (ICV) of a model and save it."""

from __future__ import annotations

import argparse

from sa_lens.layer_spec import layers_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "safety-vector",
        help="Extract the ICV [n_layers, d_model] from demonstration pairs or harmful/harmless prompts and save it.",
        description="With --pairs: the official ICV recipe (paper §3.2) on (question, unsafe answer, safe answer) "
        "rows. With --harmful/--harmless: difference of means of the chat-template end of plain requests.",
    )
    p.add_argument("--model", help="hub id or local HF folder (default: the embedded SmolLM2-135M-Instruct)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="demonstrations: CSV/JSON/JSONL with columns question, unsafe_answer and "
                     "optionally safe_answer (default: the official refusal)")
    src.add_argument("--harmful", help="file of harmful requests (used with --harmless)")
    p.add_argument("--harmless", help="file of harmless requests (with --harmful)")
    p.add_argument("--column", help="prompt column of --harmful/--harmless (default: the first of prompt/goal/behavior/…)")
    p.add_argument("--positions", choices=("last4_mean", "last", "span"), help="read positions (default: last4_mean "
                   "for pairs, as the official code; last for prompts)")
    p.add_argument("--method", choices=("pca_plus_mean", "pca", "mean_diff"),
                   help="how pairs' differences become one vector (default: pca_plus_mean, the official code's)")
    p.add_argument("--layers", type=layers_argument, help="layers to extract over, counted from 0: 4-6, 4,5,6 or "
                   "4-6,10 (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default: %(default)s)")
    p.add_argument("--matmul-precision", choices=("highest", "high", "medium"), default="highest",
                   help="torch.set_float32_matmul_precision for the extraction: 'medium' runs matmuls with bf16 "
                        "inputs on AMX CPUs and GPUs (faster, ICV within cosine ≈ 0.99999; default: %(default)s, exact)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors path (a .json sidecar is written beside it)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sa_lens.precision import float32_matmul_precision

    if args.harmful and not args.harmless:
        parser.error("--harmful needs --harmless (the two sets whose difference of means is the direction).")
    if args.harmless and not args.harmful:
        parser.error("--harmless is used with --harmful; for demonstration pairs pass --pairs alone.")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be ≥ 1; got {args.batch_size}.")
    # The CLI also runs in-process (tests, notebooks): torch's settings are restored afterwards.
    with float32_matmul_precision(args.matmul_precision):
        sv = _extract(args, parser)
    path = sv.save(args.out)
    norms = sv.directions.norm(dim=1)
    peak = int(norms.argmax())
    print(f"{path}: ICV [{sv.n_layers}, {sv.d_model}] from {sv.meta.get('n_pairs') or sv.meta['n_harmful']} "
          f"{'pairs' if args.pairs else 'harmful requests'}; largest norm at layer {peak} ({norms[peak]:.2f}).")
    return 0


def _extract(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from sa_lens.data import load_prompts
    from sa_lens.demonstrations import demonstration_pairs, load_demonstrations
    from sa_lens.models import load_model
    from sa_lens.safety_vector import SafetyVector

    if args.pairs:
        pairs = demonstration_pairs(load_demonstrations(args.pairs))
        model = load_model(args.model)
        return SafetyVector.from_pairs(model, pairs, positions=args.positions or "last4_mean",
                                       method=args.method or "pca_plus_mean", layers=args.layers, batch_size=args.batch_size)
    if args.positions == "span" or args.layers is not None or args.method is not None:
        parser.error("--harmful/--harmless take a difference of means at the template end: "
                     "--positions last or last4_mean only, and no --method or --layers.")
    harmful, harmless = load_prompts(args.harmful, args.column), load_prompts(args.harmless, args.column)
    model = load_model(args.model)
    return SafetyVector.from_prompts(model, harmful, harmless, positions=args.positions or "last",
                                     batch_size=args.batch_size)
