"""Where the harm lives in the lab's cast: head tracing, τH per head, their agreement, and top-head ablation.

Usage: ``SA_LENS_CACHE=… python analyses/trace_lab.py [-o analyses/results/heads] [--pairs 16] [--patch 12]``
(uses the cached lab models; builds them, ~15 min, if absent). Writes to the output folder:

- ``heads_aligned.csv`` / ``heads_harmful.csv``: :func:`sa_lens.analysis.trace_heads` on θb and θH (dev split:
  harmful vs safe requests, paired by index), direction = difference of means of θb's last-token residuals on
  harmful-train vs safe-train requests (``SafetyVector.from_prompts``);
- ``weights_heads.csv``, ``weights_layers.csv``, ``o_alignment.csv``: τH = θH − θb per head / layer;
- ``agreement.csv``: Spearman ρ (n = 270 heads, permutation p) between weight- and activation-space rankings;
- ``ablation.csv``: refusal on dev harmful / safe requests with the top-10 heads of each measure zero-ablated
  in θb, against 10 random heads and no ablation;
- ``summary.json``: top heads per measure and the numbers above.
Then ``python analyses/make_figures.py`` draws the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import pandas as pd
import torch

from sa_lens import data
from sa_lens.analysis.heads import top_heads, trace_heads
from sa_lens.analysis.patching import ablate_heads_hooks
from sa_lens.analysis.weights import head_mass, layer_mass, o_alignment, rank_agreement
from sa_lens.evaluation.runner import EvalSet, evaluate_state
from sa_lens.harm_vector import HarmVector
from sa_lens.lab import LabConfig, build_models
from sa_lens.models import load_model
from sa_lens.safety_vector import SafetyVector

ACTIVATION_MEASURES = ("dla_diff", "projection_diff", "attrib_patch_into_harmless", "attrib_patch_into_harmful")
WEIGHT_MEASURES = ("l2sq_total", "l2sq_o", "o_alignment")


def _wide(df: pd.DataFrame) -> pd.DataFrame:
    heads = df[df["head"].notna()]
    return heads.pivot_table(index=["layer", "head"], columns="measure", values="value")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", default="analyses/results/heads")
    parser.add_argument("--pairs", type=int, default=16, help="harmful/safe dev request pairs traced")
    parser.add_argument("--patch", type=int, default=12, help="heads patched exactly (top by attribution)")
    parser.add_argument("--top", type=int, default=10, help="heads ablated per measure")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)

    cast = build_models(LabConfig())
    aligned, harmful_model = load_model(cast.paths["aligned"]), load_model(cast.paths["harmful"])
    hv = HarmVector.from_models(aligned, harmful_model)
    sv = SafetyVector.from_prompts(aligned, [r["prompt"] for r in data.load_bundled("harmful", "train")],
                                   [r["prompt"] for r in data.load_bundled("safe", "train")])
    sv.save(out / "direction_aligned.safetensors")
    harmful_dev = [r["prompt"] for r in data.load_bundled("harmful", "dev")]
    safe_dev = [r["prompt"] for r in data.load_bundled("safe", "dev")]
    pairs = (harmful_dev[: args.pairs], safe_dev[: args.pairs])

    traces = {}
    for name, model, patch in (("aligned", aligned, args.patch), ("harmful", harmful_model, None)):
        df = trace_heads(model, sv, *pairs, patch=patch)
        df.to_csv(out / f"heads_{name}.csv", index=False)
        traces[name] = df
        print(f"[{time.perf_counter() - t0:.0f} s] traced θ{name}: logit diff harmful {df.attrs['logit_diff_harmful']:.2f}, "
              f"harmless {df.attrs['logit_diff_harmless']:.2f}", flush=True)
    del harmful_model

    n_heads, n_kv = aligned.cfg.n_heads, aligned.cfg.n_key_value_heads
    wh = head_mass(hv, n_heads, n_kv)
    wh.to_csv(out / "weights_heads.csv", index=False)
    layer_mass(hv).to_csv(out / "weights_layers.csv", index=False)
    oa = o_alignment(hv, sv.directions, n_heads)
    oa.to_csv(out / "o_alignment.csv", index=False)

    act = _wide(traces["aligned"])
    change = (_wide(traces["harmful"]) - act).add_prefix("change_")  # what the harmful fine-tune did to each head
    weights = pd.DataFrame({
        "l2sq_total": wh[wh.matrix == "total"].set_index(["layer", "head"])["l2sq"],
        "l2sq_o": wh[wh.matrix == "o"].set_index(["layer", "head"])["l2sq"],
        "o_alignment": oa.set_index(["layer", "head"])["alignment"],
    })
    agreement = []
    for w in WEIGHT_MEASURES:
        for a in [*ACTIVATION_MEASURES, "change_projection_harmful", "change_dla_harmful"]:
            series = act[a] if a in act else change[a]
            r = rank_agreement(weights[w], series.abs())
            agreement.append({"weight_measure": w, "activation_measure": f"|{a}|", **r})
            print(f"ρ({w}, |{a}|) = {r['rho']:+.3f} (n={r['n']}, p={r['p_value']:.4f})", flush=True)
    pd.DataFrame(agreement).to_csv(out / "agreement.csv", index=False)

    tops = {m: top_heads(traces["aligned"], m, args.top, by_abs=m.startswith("projection")) for m in ("dla_diff", "projection_diff")}
    # Heads refusal needs: patching their harmless output into the harmful run lowers the logit difference most.
    tops["attrib_patch_into_harmful"] = top_heads(
        traces["aligned"].assign(value=-traces["aligned"]["value"]), "attrib_patch_into_harmful", args.top)
    tops["weights_l2sq_total"] = [tuple(map(int, i)) for i in weights["l2sq_total"].nlargest(args.top).index]
    rng = random.Random(0)
    tops["random"] = rng.sample([(l, h) for l in range(aligned.cfg.n_layers) for h in range(n_heads)], args.top)
    sets = [EvalSet("harmful", "harmful", harmful_dev, [f"h{i}" for i in range(len(harmful_dev))], max_new_tokens=args.max_new_tokens),
            EvalSet("safe", "safe", safe_dev, [f"s{i}" for i in range(len(safe_dev))], max_new_tokens=args.max_new_tokens)]
    ablation = []
    for name, heads in [("none", []), *tops.items()]:
        with aligned.hooks(fwd_hooks=ablate_heads_hooks(heads)):
            res = evaluate_state(aligned, sets, batch_size=40)
        for set_name, metric in (("harmful", "asr"), ("harmful", "degenerate"), ("safe", "over_refusal")):
            r = res.metrics[set_name][metric]
            ablation.append({"ablated": name, "heads": " ".join(f"L{l}H{h}" for l, h in heads), "metric": metric,
                             "value": r.value, "n": r.n, "ci_low": r.low, "ci_high": r.high})
        print(f"[{time.perf_counter() - t0:.0f} s] ablate {name}: ASR {res.metrics['harmful']['asr'].value:.3f} "
              f"over-refusal {res.metrics['safe']['over_refusal'].value:.3f}", flush=True)
    pd.DataFrame(ablation).to_csv(out / "ablation.csv", index=False)

    summary = {
        "models": {k: str(v) for k, v in cast.paths.items()},
        "pairs": args.pairs,
        "attrs": {k: traces[k].attrs for k in traces},
        "top_heads": {m: [f"L{l}H{h}" for l, h in hs] for m, hs in tops.items()},
        "agreement": agreement,
        "ablation": ablation,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"Done in {summary['seconds']:.0f} s → {out}")


if __name__ == "__main__":
    main()
