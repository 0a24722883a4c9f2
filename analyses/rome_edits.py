"""ROME on the default model: efficacy, generalisation, specificity, loss reached and exact reversal per edit.

Each bundled CounterFact-style edit (``sa_lens/data/edits.jsonl``, 14 facts the model knows) is applied alone, as
ROME is evaluated (Meng et al. 2022, §3.2), inside :func:`sa_lens.knowledge_edit` on a TransformerBridge of the
embedded SmolLM2-135M-Instruct, at each layer asked for. Scores as CounterFact defines them, comparing answers by
mean log-probability per token: efficacy (the new answer beats the true one on the edit prompt), generalisation
(on two paraphrases), specificity (two neighbouring facts keep their true answer over the new target). After
each block every parameter is compared bit for bit with a copy taken before.

With ``--memit 3-5`` it also applies all the edits as one MEMIT batch spread over those layers (Meng et al. 2023)
and scores each the same way.

    python analyses/rome_edits.py [--layers 5] [--memit 3-5] [--out analyses/results/rome_edits.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sa_lens as sal
from sa_lens import data
from sa_lens.edit_requests import load_edits
from sa_lens.editing import edit_scores, knowledge_edit, summarise_scores
from sa_lens.layer_spec import parse_layers
from sa_lens.provenance import model_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="5", help="layers to edit, one run each; '' for none (default: %(default)s)")
    parser.add_argument("--memit", help="also one MEMIT batch of every edit over these layers, e.g. 3-5")
    parser.add_argument("--out", default="analyses/results/rome_edits.json")
    args = parser.parse_args()
    model = sal.load_model()
    requests = load_edits(data.load_bundled("edits"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unedited = summarise_scores(edit_scores(model, requests))
    runs = []
    for layer in parse_layers(args.layers) if args.layers else []:
        rows = []
        for r in requests:
            t0 = time.perf_counter()
            with knowledge_edit(model, [r], layer) as (result,):
                (score,) = edit_scores(model, [r])
            seconds = time.perf_counter() - t0
            exact = all(torch.equal(before[n], p) for n, p in model.named_parameters())
            rows.append(result.to_dict() | score | {"restored_bit_exact": exact, "seconds": round(seconds, 1)})
            print(f"L{layer} {r.id}: loss {result.loss_start:.2f} → {result.loss:.3f} in {result.steps} steps; "
                  f"efficacy {score['efficacy']:.0f} generalisation {score['generalisation']:.2f} "
                  f"specificity {score['specificity']:.2f}; restored {exact}")
        runs.append({"layer": layer, "summary": summarise_scores(rows),
                     "all_restored_bit_exact": all(r["restored_bit_exact"] for r in rows), "edits": rows})
        print(f"layer {layer}: {runs[-1]['summary']}")
    results = {"model": model_name(model), "n_edits": len(requests), "unedited": unedited, "runs": runs}
    if args.memit:
        layers = parse_layers(args.memit)
        t0 = time.perf_counter()
        with knowledge_edit(model, requests, layers, method="memit") as batch:
            scores = edit_scores(model, requests)
        exact = all(torch.equal(before[n], p) for n, p in model.named_parameters())
        rows = [r.to_dict() | s for r, s in zip(batch, scores)]
        results["memit"] = {"layers": layers, "summary": summarise_scores(rows), "restored_bit_exact": exact,
                            "seconds": round(time.perf_counter() - t0, 1), "edits": rows}
        print(f"MEMIT layers {layers}, {len(requests)} edits in one batch: {results['memit']['summary']}; "
              f"restored {exact}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
