"""Why the gain does not transfer where it does not: does each harm source share the directions the methods act on?

Reads the lab's SFT model and the sources of ``analyses/transfer.py`` (dev and held out alike: nothing is chosen
here). Per source s and layer l, the source's *harm direction* d_s[l] is the difference of means of last-token
residuals (chat template, generation prompt; :meth:`SafetyVector.from_prompts`), s's harmful requests − one fixed
harmless pool (bundled safe dev + XSTest dev, 97 requests). Three measures per source:

1. **ICV alignment**: cos(ICV[l], d_s[l]), the ICV being the one Safe-Align reads from the lab's 30 bundled pairs
   on the SFT model. Safe-Align pushes along −ICV at every position; a source whose harmful requests sit along
   another direction is pushed less along its own.
2. **Shared harm direction**: cos(d_bundled[l], d_s[l]): do the off-distribution requests differ from harmless
   ones along the same direction as the bundled requests do?
3. **HDR's shift**: how far HDR moves s's harm direction along the SFT model's unit bundled direction r̂[l]
   (the refusal-direction recipe): (d_s^HDR[l] − d_s^Orig[l])·r̂[l], in residual units and as a fraction of
   d_s^Orig[l]·r̂[l], for the lab's λ 0.5 and the paper's λ 3 (top-k 10 %). A source that HDR does not move
   toward the refusal side keeps its ASR.
4. **The decision itself**: the refusal − compliance logit difference at the reply's first token (refusal tokens
   I / Sorry / As / Unfortunately …, compliance Sure / Here / To …; :func:`sa_lens.analysis.logit_diff.token_sets`),
   mean over s's requests and over the harmless pool, under Original and each HDR λ: how far HDR moves each
   source's decision toward refusal, and how far it moves harmless requests (over-refusal).

Layers are summarised as the mean over the last third (layers 20–29 of 30, where the lab's tracing put the
refusal decision) and over all layers. Writes ``--out``/why.json; joins the held-out ASRs of
``transfer.json`` when present.

Usage: ``OMP_WAIT_POLICY=PASSIVE python analyses/transfer_why.py [--data-dir ../shared/data]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transfer import DEV_HARM, HELD_OUT_HARM, load_sources  # noqa: I001 - a sibling script

from sa_lens.analysis.capture import capture
from sa_lens.analysis.logit_diff import token_sets
from sa_lens.data import load_bundled
from sa_lens.harm_vector import HarmVector
from sa_lens.interventions import HarmRemoval
from sa_lens.lab import LabConfig, build_models, icv_pairs
from sa_lens.models import load_hf_model, load_model
from sa_lens.safety_vector import SafetyVector


def _summary(per_layer: torch.Tensor, n_layers: int) -> dict:
    late = per_layer[n_layers - n_layers // 3:]
    return {"late_layers_mean": round(float(late.mean()), 4), "all_layers_mean": round(float(per_layer.mean()), 4),
            "per_layer": [round(float(x), 4) for x in per_layer]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--out", default=str(Path(__file__).parent / "results" / "transfer"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sets, _, _ = load_sources(Path(args.data_dir))
    harmless = list(sets["xstest-dev"].prompts)
    harmless += [r["prompt"] for r in load_bundled("safe", "dev")]
    cfg = LabConfig()
    cast = build_models(cfg)
    hv = HarmVector.from_models(load_hf_model(cast.paths["aligned"])[0], load_hf_model(cast.paths["harmful"])[0])
    trimmed = hv.trim(cfg.top_k, scope="global")
    del hv
    model = load_model(cast.paths["sft"])
    n_layers = model.cfg.n_layers
    sources = (*DEV_HARM, *HELD_OUT_HARM)

    refusal_sets = token_sets(model.tokenizer)

    def directions() -> dict[str, torch.Tensor]:
        return {s: SafetyVector.from_prompts(model, list(sets[s].prompts), harmless).directions for s in sources}

    def decisions() -> dict[str, float]:
        """Mean refusal − compliance logit difference at the first reply token (logits), per source and harmless."""
        groups = {s: list(sets[s].prompts) for s in sources} | {"harmless": harmless}
        return {s: round(float(capture(model, p, refusal_sets, 1, grad=False, batch_size=16).logit_diff.mean()), 3)
                for s, p in groups.items()}

    original = directions()
    decision = {"Original": decisions()}
    icv = SafetyVector.from_pairs(model, icv_pairs(cfg, cast)).directions
    r_hat = F.normalize(original["bundled-dev"], dim=-1)
    shifted = {}
    for lam in (cfg.lam, 3.0):
        with HarmRemoval(trimmed, lam).apply(model):
            shifted[lam] = directions()
            decision[f"HDR λ={lam:g}"] = decisions()
    held = {}
    transfer_file = Path(args.out) / "transfer.json"
    if transfer_file.exists():
        held = json.loads(transfer_file.read_text())
    out: dict[str, dict] = {}
    for s in sources:
        d = original[s]
        along = (d * r_hat).sum(-1)
        row = {
            "n": len(sets[s]),
            "role": "dev" if s in DEV_HARM else "held out",
            "cos_icv": _summary(F.cosine_similarity(icv, d, dim=-1), n_layers),
            "cos_bundled_direction": _summary(F.cosine_similarity(original["bundled-dev"], d, dim=-1), n_layers),
            "along_bundled_direction": _summary(along, n_layers),
        }
        for lam, dirs in shifted.items():
            shift = ((dirs[s] - d) * r_hat).sum(-1)
            row[f"hdr_shift_lam{lam:g}"] = _summary(shift, n_layers)
            row[f"hdr_shift_lam{lam:g}_relative"] = _summary(shift / along.abs().clamp_min(1e-6), n_layers)
        for key in ("dev_sa", "held_out"):  # the ASRs transfer.py measured on this source, per state
            table = held.get(key, {})
            if f"asr_{s}" in table.get("Original", {}):
                row["asr"] = {state: table[state][f"asr_{s}"] for state in table}
        out[s] = row
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "why.json").write_text(json.dumps({
        "target": "lab SFT model", "harmless_pool": len(harmless), "n_layers": n_layers,
        "late_layers": [n_layers - n_layers // 3, n_layers - 1], "hdr": {"top_k": cfg.top_k, "lams": [cfg.lam, 3.0]},
        "sources": out, "first_token_logit_diff": decision, "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    print(json.dumps(decision, indent=1))
    for s, row in out.items():
        print(f"{s:<15} {row['role']:<9} cos(ICV) {row['cos_icv']['late_layers_mean']:+.3f}  "
              f"cos(bundled) {row['cos_bundled_direction']['late_layers_mean']:+.3f}  "
              f"along {row['along_bundled_direction']['late_layers_mean']:8.2f}  "
              + "  ".join(f"HDR λ{lam:g} shift {row[f'hdr_shift_lam{lam:g}_relative']['late_layers_mean']:+.3f}"
                          for lam in shifted))


if __name__ == "__main__":
    main()
