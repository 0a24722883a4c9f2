"""Public-benchmark table for the lab's SFT model: Original vs HDR vs Safe-Align vs Safety Arithmetic.

The SFT scenario is where the lab's target has lost part of its safety (design.md §4), so it is the state in
which the methods have something to restore. Target: the lab's cached SFT model; harm vector, λ, α and ICV
pairs: the lab's defaults (LabConfig, chosen on dev). Data: fixed seeded subsamples (``--limit`` per set) of
AdvBench, HarmBench val (standard + contextual), JBB harmful and benign, XSTest safe prompts and MMLU test,
read from a local copy of the public sets (``--data-dir``, default ../shared/data). HarmBench keeps its
*standard* behaviours only: a contextual one carries a context of up to thousands of tokens, which costs
more CPU than the rest of the table together (a 2-core box). Greedy, chat template,
48 new tokens, keyword judge. Resumable: rerunning continues where it stopped, and adding a state to
``--states`` runs only that state.

Usage:
    SA_LENS_CACHE=/tmp/salens_cache python analyses/eval_public.py [--limit 50] [--states Original,"Safety Arithmetic"]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sa_lens.data.public import PromptSet
from sa_lens.evaluation import STATE_NAMES, safety_arithmetic_states
from sa_lens.evaluation.decoding import preset
from sa_lens.evaluation.harness import evaluate, load_sets
from sa_lens.harm_vector import HarmVector
from sa_lens.lab import LabConfig, build_models, icv_pairs
from sa_lens.models import load_hf_model, load_model

DATA = {
    "advbench": "advbench",
    "harmbench": "harmbench",
    "jbb-harmful": "jbb-behaviors",
    "jbb-benign": "jbb-behaviors",
    "xstest": "xstest",
    "mmlu": "mmlu",
}


def standard_only(s: PromptSet) -> PromptSet:
    keep = [i for i, p in enumerate(s.prompts) if "\n\n---\n\n" not in p]  # contextual prompts hold the separator
    return PromptSet(s.name, s.kind, tuple(s.prompts[i] for i in keep), tuple(s.ids[i] for i in keep),
                     tuple(s.categories[i] for i in keep), s.source + " (standard behaviours)", s.macro)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--states", default=",".join(STATE_NAMES))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("-o", "--out", default=str(Path(__file__).parent / "results" / "eval_public"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    cfg = LabConfig()
    cast = build_models(cfg)
    hv = HarmVector.from_models(load_hf_model(cast.paths["aligned"])[0], load_hf_model(cast.paths["harmful"])[0])
    # The lab's states as interventions: HDR with the TIES top-k vector, Safe-Align from the lab's ICV pairs (read
    # from the SFT model, or from θ̂ for Safety Arithmetic, when each state is applied).
    states = safety_arithmetic_states(hv.trim(cfg.top_k, scope="global"), icv_pairs(cfg, cast), cfg.lam, cfg.alpha,
                                      which=args.states.split(","))
    del hv
    model = load_model(cast.paths["sft"])
    paths = {name: str(Path(args.data_dir) / folder) for name, folder in DATA.items()}
    sets = load_sets(list(DATA), paths)
    sets = [standard_only(s) if s.name == "harmbench" else s for s in sets]
    report = evaluate(
        model,
        sets,
        "keyword",
        states=states,
        settings=preset("greedy", max_new_tokens=args.max_new_tokens),
        out_dir=args.out,
        limit=args.limit,
        batch_size=25,
    )
    meta = {
        "target": "lab SFT model (SFT scenario)",
        "lab_config": {k: getattr(cfg, k) for k in ("lam", "top_k", "alpha", "n_icv_pairs")},
        "limit_per_set": args.limit,
        "max_new_tokens": args.max_new_tokens,
        # A rerun that finds every record done only re-summarises, so this is the time of this call only.
        "seconds_this_call": round(time.perf_counter() - t0, 1),
        "items_generated_this_call": report.config["items_run"],
    }
    run_file = Path(args.out) / "run.json"
    earlier = json.loads(run_file.read_text()) if run_file.exists() else {}
    meta = {"first_full_run": earlier["first_full_run"]} | meta if "first_full_run" in earlier else meta
    run_file.write_text(json.dumps(meta, indent=2))
    print(report.summary, "\n", report.comparison, f"\n{meta['seconds_this_call']} s")


if __name__ == "__main__":
    main()
