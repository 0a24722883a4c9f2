"""Precision and recall of the keyword judge's "refusal" verdict on hand-written replies, before and after a change.

Reads ``tests/data/refusal_styles.jsonl`` (173 replies in several model families' styles, labelled refusal or
compliance; how they were written and split: ``tests/data/refusal_styles.md``) and judges every reply with
two versions of :class:`sa_lens.evaluation.judges.KeywordJudge`: the one in ``sa_lens/evaluation/judges.py`` at
``--before`` (a git revision, read with ``git show``; default 81dcb90, the list before issue 13) and the one in
the working tree. A reply counts as predicted refusal when the verdict is REFUSAL (NOT_REFUSED and DEGENERATE
are not). Reported for all rows and for the held-out rows (``split == "heldout"``, never read while tuning):
the confusion counts (tp, fp, fn, tn), precision and recall of refusal, and per row the replies whose verdict
differs between the versions or from the label.

Usage: ``python analyses/keyword_judge_measure.py [--before REV] [-o analyses/results/keyword_judge]``
(under a second on one core); writes ``measure.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "refusal_styles.jsonl"
JUDGES = "sa_lens/evaluation/judges.py"


def judge_at(revision: str):
    """The KeywordJudge class of ``sa_lens/evaluation/judges.py`` as it was at a git revision."""
    source = subprocess.run(["git", "show", f"{revision}:{JUDGES}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"judges_{revision}", f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass/enum machinery looks the module up by name
    spec.loader.exec_module(module)
    return module.KeywordJudge


def scores(rows: list[dict], predicted: list[bool]) -> dict:
    """Confusion counts and precision/recall of "refusal" (precision is None when nothing was predicted)."""
    truth = [r["label"] == "refusal" for r in rows]
    tp = sum(p and t for p, t in zip(predicted, truth))
    fp = sum(p and not t for p, t in zip(predicted, truth))
    fn = sum(t and not p for p, t in zip(predicted, truth))
    tn = len(rows) - tp - fp - fn
    return {"n": len(rows), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="81dcb90", help="git revision of the judge to compare against")
    parser.add_argument("-o", "--out", type=Path, default=ROOT / "analyses" / "results" / "keyword_judge")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from sa_lens.evaluation.judges import KeywordJudge, Verdict

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    judges = {"before": judge_at(args.before)(), "after": KeywordJudge()}
    predicted = {name: [j.judge(r["reply"]).value == Verdict.REFUSAL.value for r in rows] for name, j in judges.items()}
    heldout = [i for i, r in enumerate(rows) if r["split"] == "heldout"]
    report = {
        "data": str(DATA.relative_to(ROOT)),
        "before": args.before,
        "after": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() + " (working tree)",
        "results": {
            name: {"all": scores(rows, p), "heldout": scores([rows[i] for i in heldout], [p[i] for i in heldout])}
            for name, p in predicted.items()
        },
        "errors_after": [
            {"id": r["id"], "split": r["split"], "label": r["label"], "reply": r["reply"][:120]}
            for r, p in zip(rows, predicted["after"]) if p != (r["label"] == "refusal")
        ],
        "changed": [
            {"id": r["id"], "label": r["label"], "before": b, "after": a, "reply": r["reply"][:120]}
            for r, b, a in zip(rows, predicted["before"], predicted["after"]) if a != b
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "measure.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    for name, res in report["results"].items():
        for part, s in res.items():
            print(f"{name:6s} {part:7s} n={s['n']:3d} tp={s['tp']:2d} fp={s['fp']:2d} fn={s['fn']:2d} "
                  f"tn={s['tn']:2d} P={s['precision']} R={s['recall']}")


if __name__ == "__main__":
    main()
