"""``sa-lens edit``: ROME-edit a model with knowledge-edit requests and save it, the EDIT scenario's θedit.

The edited folder loads with :func:`sa_lens.load_model` and is the ``--target`` of ``sa-lens run --scenario edit``
(its ``--base`` is the model given here). Beside the weights, ``edit_report.json`` records the model, layer,
ROME options, each edit's loss, steps and update, its CounterFact scores after the edit, and the changed tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from sa_lens.editing import RomeOptions, default_edit_layer
from sa_lens.errors import InputError

REPORT_FILE = "edit_report.json"
OLD_ANSWER_TOKENS = 64
"""Generation budget of the unedited model's reply that stands for a request's old answer (``--chat``)."""
BUNDLED_EDITS = ("edits", "noint_edits")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "edit",
        help="ROME-edit a model with knowledge-edit requests and save the edited model (θedit of the EDIT scenario).",
        description="Apply ROME edits (one MLP output projection, rank-one updates, one request after the other) "
        "permanently, score them (efficacy, generalisation, specificity) and save a from_pretrained folder with "
        f"{REPORT_FILE}. Use it as --target of `sa-lens run --scenario edit`, with this --model as --base.",
    )
    p.add_argument("--model", help="hub id or local HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--edits", required=True, help="JSONL/JSON/CSV of requests, CounterFact-style (prompt with {} for "
                   "the subject, subject, target_new, optional target_true, paraphrase_prompts, neighborhood_prompts) "
                   "or NoIntentEdit-style (question, answer, optional subject, paraphrase); or a bundled set: "
                   f"{', '.join(BUNDLED_EDITS)}")
    p.add_argument("--layer", type=int, help="decoder layer whose MLP output projection is edited, counted from 0 "
                   "(default: round(5 × n_layers / 32): Llama-2-7b's layer 5, the one the paper's code implies, scaled "
                   "to the depth; SmolLM2-135M's 30 → 5, the lab's)")
    p.add_argument("--chat", action="store_true", help="prompt as a user turn of the chat template, target as the "
                   "assistant's reply (chat models, question/answer rows); rows without target_true then get the "
                   f"unedited model's greedy reply ({OLD_ANSWER_TOKENS} tokens) as old answer, for efficacy")
    p.add_argument("--steps", type=int, default=RomeOptions.steps, help="Adam steps for each value (default: %(default)s)")
    p.add_argument("--lr", type=float, default=RomeOptions.lr, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--max-loss", type=float, default=RomeOptions.max_loss, help="refuse an edit whose target NLL "
                   "(nats/token) stays above this; nothing is written then (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder holding a model")
    p.add_argument("-o", "--out", required=True, help="output folder: the edited model and " + REPORT_FILE)
    p.set_defaults(run=_run)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output that would clobber something, before minutes of editing."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; the edited model needs a folder of its own.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise InputError(f"{out} exists and is not empty; pass --overwrite to replace it, or choose another folder.")
    if not (out / "config.json").exists():
        raise InputError(f"{out} holds no model (no config.json); --overwrite only replaces a model folder, so this "
                         "one is left alone. Choose another folder.")


def _requests(source: str):
    from sa_lens.data import load_bundled
    from sa_lens.edit_requests import load_edits

    if source in BUNDLED_EDITS and not Path(source).exists():
        return load_edits(load_bundled(source))
    return load_edits(source)


def _old_answers(model, tokenizer, requests, chat: bool) -> list[str | None]:
    """The unedited model's greedy reply to each request without ``target_true`` (chat prompts only)."""
    from sa_lens.generation import generate

    todo = [i for i, r in enumerate(requests) if r.target_true is None]
    olds: list[str | None] = [None] * len(requests)
    if not chat or not todo:
        return olds
    replies = generate(model, [requests[i].text() for i in todo], OLD_ANSWER_TOKENS, tokenizer=tokenizer,
                       chat_template=True, progress="old answers")
    for i, reply in zip(todo, replies):
        olds[i] = reply or None  # an empty reply has no tokens to score
    return olds


def _write(model, tokenizer, out: Path, report: dict) -> None:
    """Save into a sibling temporary folder, then move it into place: a failure leaves ``out`` as it was."""
    from sa_lens.editing import save_edited

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_edited(model, tmp, tokenizer)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            shutil.rmtree(out)  # checked by _check_out: empty, or a model folder and --overwrite
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sa_lens.editing import apply_edits, edit_scores, summarise_scores
    from sa_lens.mlp_projection import decoder_layer_count, mlp_output
    from sa_lens.models import load_hf_model
    from sa_lens.provenance import model_name, portable_name

    out = Path(args.out)
    if args.model is not None and Path(args.model).exists() and Path(args.model).resolve() == out.resolve():
        raise InputError(f"{out} is the model being edited; write the edited model elsewhere (the EDIT scenario needs "
                         "both: `sa-lens run --scenario edit --base` the original, --target the edited one).")
    _check_out(out, args.overwrite)
    requests = _requests(args.edits)
    options = RomeOptions(steps=args.steps, lr=args.lr, max_loss=args.max_loss, chat=args.chat)
    model, tokenizer = load_hf_model(args.model)
    n_layers = decoder_layer_count(model)
    layer = default_edit_layer(n_layers) if args.layer is None else args.layer
    if not 0 <= layer < n_layers:
        raise InputError(f"--layer {layer} is out of range: the model has {n_layers} decoder layers (0-{n_layers - 1}).")
    site = mlp_output(model, layer)  # refuses an architecture without one MLP output projection, before generating
    olds = _old_answers(model, tokenizer, requests, args.chat)
    results = apply_edits(model, requests, layer, options, tokenizer=tokenizer, progress=True)
    scores = edit_scores(model, requests, old_answers=olds, chat=args.chat, tokenizer=tokenizer)
    summary = summarise_scores(scores)
    report = {
        "model": model_name(model),
        "edits_source": portable_name(args.edits),
        "layer": layer,
        "layer_rule": "given (--layer)" if args.layer is not None else "round(5 × n_layers / 32) (default_edit_layer)",
        "n_layers": n_layers,
        "options": asdict(options),
        "changed_tensors": [site.name],
        "edits": [{**res.to_dict(), **score, "prompt": req.text(), "subject": req.subject, "target": req.target,
                   "old_answer": req.target_true or old}
                  for req, res, score, old in zip(requests, results, scores, olds)],
        "summary": summary,
    }
    _write(model, tokenizer, out, report)
    shown = ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in summary.items())
    print(f"{len(results)} edit(s) at layer {layer} ({site.name}); {shown}. Saved to {out} with {REPORT_FILE}.")
    return 0
