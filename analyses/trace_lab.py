"""Where the harm lives in the lab's cast: head tracing, τH per head, their agreement, and top-head ablation.

Usage: ``SA_LENS_CACHE=… python analyses/trace_lab.py [--phase all|trace|agree|ablate] [-o analyses/results/heads]``
(uses the cached lab models; builds them, ~15 min, if absent). Phases (``all`` runs the three in turn; ``agree``
and ``ablate`` read what ``trace`` wrote):

- ``heads_aligned.csv`` / ``heads_harmful.csv``: :func:`sa_lens.analysis.trace_heads` on θb and θH (dev split:
  harmful vs safe requests, paired by index), direction = difference of means of θb's last-token residuals on
  harmful-train vs safe-train requests (``SafetyVector.from_prompts``);
- ``weights_heads.csv``, ``weights_layers.csv``, ``o_alignment.csv``: τH = θH − θb per head / layer;
- ``agreement.csv``: Spearman ρ (n = 270 heads, permutation p) between weight- and activation-space rankings,
  over all heads and within layers (ranks and shuffles inside each layer: the layer trend removed);
- ``ablation.csv``: θb with the top-10 heads of each measure zero-ablated (``HeadAblation`` interventions),
  against 10 random heads and no ablation: the mean refusal − compliance logit difference on all dev harmful
  and safe requests (one forward pass) and the keyword-judged ASR (``sa_lens.evaluate``, bootstrap 95 %
  interval) of greedy replies to ``--gen-prompts`` dev harmful requests;
- ``summary.json``: top heads per measure and the numbers above.
Then ``python analyses/make_figures.py`` draws the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import pandas as pd
import torch

import sa_lens
from sa_lens import data
from sa_lens.analysis.capture import capture
from sa_lens.analysis.heads import trace_heads
from sa_lens.analysis.logit_diff import token_sets
from sa_lens.analysis.weights import head_mass, layer_mass, o_alignment, rank_agreement
from sa_lens.data.public import load_bundled_set
from sa_lens.evaluation.decoding import preset
from sa_lens.harm_vector import HarmVector
from sa_lens.interventions import Compose, HeadAblation, Intervention
from sa_lens.lab import LabConfig, build_models
from sa_lens.models import load_model
from sa_lens.provenance import portable_name
from sa_lens.safety_vector import SafetyVector

ACTIVATION_MEASURES = ("dla_diff", "projection_diff", "attrib_patch_into_harmless", "attrib_patch_into_harmful",
                       "change_projection_harmful", "change_dla_harmful")
WEIGHT_MEASURES = ("l2sq_total", "l2sq_o", "o_alignment")


def _wide(df: pd.DataFrame) -> pd.DataFrame:
    heads = df[df["head"].notna()]
    wide = heads.pivot_table(index=["layer", "head"], columns="measure", values="value")
    wide.index = wide.index.set_levels([wide.index.levels[0].astype(int), wide.index.levels[1].astype(int)])
    return wide


def _dev(name: str) -> list[str]:
    return [r["prompt"] for r in data.load_bundled(name, "dev")]


def trace(cast, out: Path, args) -> None:
    """Head tables on θb and θH, τH per head / layer, ΔW_O alignment."""
    t0 = time.perf_counter()
    aligned, harmful_model = load_model(cast.paths["aligned"]), load_model(cast.paths["harmful"])
    hv = HarmVector.from_models(aligned, harmful_model)
    sv = SafetyVector.from_prompts(aligned, [r["prompt"] for r in data.load_bundled("harmful", "train")],
                                   [r["prompt"] for r in data.load_bundled("safe", "train")])
    sv.save(out / "direction_aligned.safetensors")
    pairs = (_dev("harmful")[: args.pairs], _dev("safe")[: args.pairs])
    attrs = {}
    for name, model, patch in (("aligned", aligned, args.patch), ("harmful", harmful_model, None)):
        df = trace_heads(model, sv, *pairs, patch=patch)
        df.to_csv(out / f"heads_{name}.csv", index=False)
        attrs[name] = df.attrs
        print(f"[{time.perf_counter() - t0:.0f} s] traced θ{name}: logit diff harmful {df.attrs['logit_diff_harmful']:.2f}, "
              f"harmless {df.attrs['logit_diff_harmless']:.2f}", flush=True)
    (out / "trace_attrs.json").write_text(json.dumps(attrs, indent=2))
    n_heads = aligned.cfg.n_heads
    head_mass(hv, n_heads, aligned.cfg.n_key_value_heads).to_csv(out / "weights_heads.csv", index=False)
    layer_mass(hv).to_csv(out / "weights_layers.csv", index=False)
    o_alignment(hv, sv.directions, n_heads).to_csv(out / "o_alignment.csv", index=False)


def _tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(activation measures, weight measures) per (layer, head), from what :func:`trace` wrote."""
    act = _wide(pd.read_csv(out / "heads_aligned.csv"))
    change = (_wide(pd.read_csv(out / "heads_harmful.csv")) - act).add_prefix("change_")  # what the harmful fine-tune did
    act = act.join(change[["change_projection_harmful", "change_dla_harmful"]])
    wh, oa = pd.read_csv(out / "weights_heads.csv"), pd.read_csv(out / "o_alignment.csv")
    weights = pd.DataFrame({
        "l2sq_total": wh[wh.matrix == "total"].set_index(["layer", "head"])["l2sq"],
        "l2sq_o": wh[wh.matrix == "o"].set_index(["layer", "head"])["l2sq"],
        "o_alignment": oa.set_index(["layer", "head"])["alignment"],
    })
    return act, weights


def agree(out: Path) -> list[dict]:
    """Spearman ρ between each weight measure and each |activation measure|, overall and within layers."""
    act, weights = _tables(out)
    layer = pd.Series(act.index.get_level_values("layer"), index=act.index)
    rows = []
    for w in WEIGHT_MEASURES:
        for a in ACTIVATION_MEASURES:
            for scope, groups in (("all heads", None), ("within layers", layer)):
                r = rank_agreement(weights[w], act[a].abs(), groups=groups)
                rows.append({"weight_measure": w, "activation_measure": f"|{a}|", "scope": scope, **r})
                print(f"ρ({w}, |{a}|) {scope:>13} = {r['rho']:+.3f} (n={r['n']}, p={r['p_value']:.4f})", flush=True)
    pd.DataFrame(rows).to_csv(out / "agreement.csv", index=False)
    return rows


def ablate(cast, out: Path, args) -> tuple[dict, list[dict]]:
    """Zero-ablate the top heads of each measure in θb; logit difference and judged ASR against controls."""
    t0 = time.perf_counter()
    act, weights = _tables(out)
    aligned = load_model(cast.paths["aligned"])
    k = args.top
    tops = {
        # Heads refusal needs: patching their harmless output into the harmful run lowers the logit difference most.
        "attrib_patch_into_harmful": list(act["attrib_patch_into_harmful"].nsmallest(k).index),
        "dla_diff": list(act["dla_diff"].nlargest(k).index),
        "projection_diff": list(act["projection_diff"].abs().nlargest(k).index),
        "weights_l2sq_total": list(weights["l2sq_total"].nlargest(k).index),
        "random": random.Random(0).sample(list(act.index), k),
    }
    tops = {m: [(int(l), int(h)) for l, h in hs] for m, hs in tops.items()}
    sets = token_sets(aligned.tokenizer)
    harmful, safe = _dev("harmful"), _dev("safe")
    judged = dataclasses.replace(load_bundled_set("harmful", "dev"), name="harmful")
    judged = dataclasses.replace(judged, **{f: getattr(judged, f)[: args.gen_prompts] for f in ("prompts", "ids", "categories")})
    states: dict[str, Intervention] = {"none": Compose()} | {name: HeadAblation(tuple(heads)) for name, heads in tops.items()}
    # Replies to the judged requests, greedy, for every state in one call (each ablation applied and undone in turn).
    report = sa_lens.evaluate(aligned, [judged], "keyword", states=states,
                              settings=preset("greedy", max_new_tokens=args.max_new_tokens),
                              batch_size=args.gen_prompts, progress=False)
    judged_rows = {r["state"]: r for r in report.rows}
    rows = []
    for name, iv in states.items():
        with iv.apply(aligned):
            ld = {s: capture(aligned, prompts, sets, 1, grad=False, batch_size=16).logit_diff
                  for s, prompts in (("harmful", harmful), ("safe", safe))}
        label = " ".join(f"L{l}H{h}" for l, h in tops.get(name, []))
        for s, values in ld.items():
            rows.append({"ablated": name, "heads": label, "metric": f"logit_diff_{s}", "value": float(values.mean()),
                         "n": len(values), "ci_low": float(values.mean() - 1.96 * values.std() / len(values) ** 0.5),
                         "ci_high": float(values.mean() + 1.96 * values.std() / len(values) ** 0.5)})
        r = judged_rows[name]
        for metric in ("asr", "degenerate"):
            low, high = r[f"{metric}_ci95"]
            rows.append({"ablated": name, "heads": label, "metric": metric, "value": r[metric], "n": r[f"{metric}_n"],
                         "ci_low": low, "ci_high": high})
        print(f"[{time.perf_counter() - t0:.0f} s] ablate {name}: logit diff harmful {ld['harmful'].mean():+.2f} "
              f"safe {ld['safe'].mean():+.2f}; ASR {r['asr']:.3f}", flush=True)
    pd.DataFrame(rows).to_csv(out / "ablation.csv", index=False)
    return tops, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("all", "trace", "agree", "ablate"), default="all")
    parser.add_argument("-o", "--out", default="analyses/results/heads")
    parser.add_argument("--pairs", type=int, default=16, help="harmful/safe dev request pairs traced")
    parser.add_argument("--patch", type=int, default=12, help="heads patched exactly (top by attribution)")
    parser.add_argument("--top", type=int, default=10, help="heads ablated per measure")
    parser.add_argument("--gen-prompts", type=int, default=24, help="dev harmful requests judged per ablation")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cast = build_models(LabConfig())
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["models"] = {k: portable_name(v) for k, v in cast.paths.items()}
    if args.phase in ("all", "trace"):
        trace(cast, out, args)
        summary["pairs"] = args.pairs
    if args.phase in ("all", "agree"):
        summary["agreement"] = agree(out)
    if args.phase in ("all", "ablate"):
        tops, rows = ablate(cast, out, args)
        summary["top_heads"] = {m: [f"L{l}H{h}" for l, h in hs] for m, hs in tops.items()}
        summary["ablation"] = rows
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"→ {out}")


if __name__ == "__main__":
    main()
