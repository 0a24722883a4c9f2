"""Inspect vs ``sa_lens.evaluate`` on a model where the states differ: the lab's SFT model, Original vs Safety Arithmetic.

The default model complies with nearly every bundled harmful request in every state, so a parity check there
compares 100 % with 100 %. The lab's SFT model (cached by ``sa-lens lab``) has ASR ≈ 44 % and the lab's Safety
Arithmetic (HDR λ 0.5, top-k 10 %, then Safe-Align α 0.12 from the lab's 30 ICV pairs) about halves it, so here
the numbers can disagree. Both paths: the bundled test split (54 harmful, 56 safe), greedy, chat template,
32 new tokens (the lab's), keyword judge. Compares each sample's reply and the ASR / over-refusal; writes
``analyses/results/inspect_parity.json``.

Usage: ``OMP_WAIT_POLICY=PASSIVE python analyses/inspect_parity.py``
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from inspect_ai import eval as inspect_eval
from inspect_ai.model import get_model

import sa_lens
from sa_lens.data.public import load_bundled_set
from sa_lens.evaluation.decoding import preset
from sa_lens.harm_vector import HarmVector
from sa_lens.inspect_tasks import harmful_asr, safe_over_refusal
from sa_lens.interventions import save
from sa_lens.lab import LabConfig, build_models, icv_pairs, lab_states
from sa_lens.models import load_hf_model
from sa_lens.provenance import portable_name

RESULTS = Path(__file__).parent / "results" / "inspect_parity.json"


def main() -> None:
    cfg = LabConfig()
    cast = build_models(cfg)
    hv = HarmVector.from_models(load_hf_model(cast.paths["aligned"])[0], load_hf_model(cast.paths["harmful"])[0])
    states = {k: v for k, v in lab_states(cfg, hv, hv.trim(cfg.top_k, scope="global"), icv_pairs(cfg, cast)).items()
              if k in ("Original", "Safety Arithmetic")}
    del hv
    sets = {"harmful": load_bundled_set("harmful", "test"), "safe": load_bundled_set("safe", "test")}
    model = sa_lens.load_model(cast.paths["sft"])
    t0 = time.perf_counter()
    report = sa_lens.evaluate(model, list(sets.values()), "keyword", states=states,
                              settings=preset("greedy", max_new_tokens=cfg.max_new_tokens), batch_size=16)
    t_evaluate = time.perf_counter() - t0
    ours = {(r["state"], r["id"]): r["response"] for r in report.records}
    rates = {(r["state"], r["dataset"]): r.get("asr", r.get("over_refusal")) for r in report.rows}
    out: dict = {"model": portable_name(cast.paths["sft"]), "max_new_tokens": cfg.max_new_tokens, "states": {},
                 "seconds": {"sa_lens.evaluate": round(t_evaluate, 1)}}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for name, state in states.items():
            path = save(state, Path(tmp) / "state.json")
            with get_model(f"sa_lens/{cast.paths['sft']}", memoize=False, interventions=str(path), batch_size=16) as m:
                row = {}
                for kind, task in (("harmful", harmful_asr()), ("safe", safe_over_refusal())):
                    log = inspect_eval(task, model=m, log_dir=str(Path(tmp) / "logs"), display="none",
                                       max_tokens=cfg.max_new_tokens)[0]
                    assert log.status == "success", log.error
                    same = sum(s.output.completion == ours[(name, s.id)] for s in log.samples)
                    score = log.results.scores[0].metrics["mean"].value
                    row[kind] = {"identical_replies": same, "n": len(log.samples), "inspect": round(score, 4),
                                 "sa_lens_evaluate": round(rates[(name, sets[kind].name)], 4)}
                out["states"][name] = row
                print(name, json.dumps(row))
        out["seconds"]["inspect eval"] = round(time.perf_counter() - t0, 1)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
