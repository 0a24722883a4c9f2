"""``sa-lens evaluate`` (one model, data sets, a judge → report folder) and ``sa-lens run`` (Safety Arithmetic
on your own target/base/harmful models: Original vs HDR vs Safe-Align vs both, same report; ``--scenario edit``
restricts both stages to the layers a knowledge edit changed, recorded under ``config.scenario`` in results.json)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sa_lens.defaults import DEFAULT_ALPHA, DEFAULT_LAM, DEFAULT_TOP_K
from sa_lens.edit_area import VARIANTS
from sa_lens.errors import InputError
from sa_lens.evaluation.backends import BACKENDS, get_backend
from sa_lens.evaluation.judge_registry import JUDGES


def _common(p: argparse.ArgumentParser) -> None:
    """Options both commands share: data, judge, decoding, report folder."""
    p.add_argument("--data", required=True, help="comma-separated sets: advbench, harmbench, jbb (harmful+benign), "
                   "xstest, mmlu, truthfulqa, … or name=PATH for a local copy")
    p.add_argument("--data-dir", help="folder laid out like shared/data (advbench/, jbb-behaviors/, xstest/ …) for "
                   "names without =PATH; omitted: read them from the Hugging Face hub")
    p.add_argument("--judge", choices=JUDGES, default="keyword", help="harm judge (default: %(default)s)")
    p.add_argument("--judge-model", help="llm judge: model name at the endpoint (default gpt-4); classifiers: hub id or folder")
    p.add_argument("--judge-url", help="llm judge: OpenAI-compatible base URL (default $OPENAI_BASE_URL or api.openai.com)")
    p.add_argument("--preset", choices=("greedy", "paper"), default="greedy",
                   help="decoding: greedy (chat template, 64 tokens) or paper (raw prefix, T=0.45, top-k 10, 200 tokens)")
    p.add_argument("--prompt-format", choices=("chat", "raw"), help="override the preset's prompt format")
    p.add_argument("--system-prompt", help="system message (chat format only)")
    p.add_argument("--max-new-tokens", type=int, help="override the preset's generation budget")
    p.add_argument("--seed", type=int, default=0, help="sampling and subsample seed (default: %(default)s)")
    p.add_argument("--limit", type=int, help="fixed random subset of N items per set")
    p.add_argument("--mmlu-dev", help="MMLU's dev split (a folder of *_dev.csv or a file): score mmlu 5-shot as the "
                   "paper and lm-eval do; omitted: zero-shot")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default: %(default)s)")
    p.add_argument("-o", "--out", default="sa_lens_eval", help="report folder; rerunning resumes (default: %(default)s)")
    p.add_argument("--device", help="where the model runs (default: cuda:$LOCAL_RANK when a GPU is present, so each "
                                    "torchrun process takes its own, else cpu)")
    p.add_argument("--backend", choices=BACKENDS, default="hf",
                   help="what generates: sa_lens's own loop (hf) or vLLM engines (vllm; pip install 'sa_lens[vllm]') "
                        "(default: %(default)s). Data parallel: run the command under torchrun --nproc_per_node N")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a VLLMBackend / vllm.LLM option, repeatable: tensor_parallel_size=2, dtype=bfloat16, "
                        "gpu_memory_utilization=0.85, fallback=true (serve states vLLM cannot run with hf)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``evaluate`` and ``run`` to the ``sa-lens`` subcommands."""
    p = sub.add_parser("evaluate", help="ASR / over-refusal / utility of one model on public or own data sets.")
    p.add_argument("--model", help="hub id or local HF folder (default: the embedded SmolLM2-135M-Instruct)")
    _common(p)
    p.set_defaults(run=_run_evaluate)

    p = sub.add_parser("run", help="Safety Arithmetic on your models: Original vs HDR vs Safe-Align vs both.")
    p.add_argument("--target", required=True, help="θt: the model to make safe (hub id or folder)")
    p.add_argument("--base", required=True, help="θb: the base θH was fine-tuned from")
    p.add_argument("--harmful", required=True, help="θH: θb fine-tuned on harmful QA")
    p.add_argument("--pairs", help="ICV demonstrations, the file `sa-lens safety-vector --pairs` reads: CSV/JSON/JSONL "
                   "with columns question, unsafe_answer and optionally safe_answer; without it, θH's answers to the "
                   "bundled harmful-train requests")
    p.add_argument("--lam", type=float, default=DEFAULT_LAM, help="λ of HDR (default: %(default)s, the paper's)")
    p.add_argument("--top-k", type=float, default=DEFAULT_TOP_K, help="fraction of τH kept (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="Safe-Align α (default: %(default)s)")
    p.add_argument("--scenario", choices=("base", "sft", "edit"), default="base",
                   help="base / sft (run alike): θt is θb or a fine-tune of it, HDR and Safe-Align over the whole model; "
                   "edit: θt is θb after a knowledge edit (`sa-lens edit`), both restricted to the edit area, the layers "
                   "where --target differs from --base, ±1 (paper Eqs. 11–13) (default: %(default)s)")
    p.add_argument("--edit-variant", choices=VARIANTS,
                   help="edit: paper (default; τH zero outside the area, top-k within it) or official (the official "
                   "code: the untrimmed τH kept outside the area)")
    p.add_argument("--safe-align-layers", choices=("area", "all"),
                   help="edit: extract and inject the ICV in the edit area's layers (default, as the official code) or "
                   "in every layer")
    _common(p)
    p.set_defaults(run=_run_safety_arithmetic)


def _device(args: argparse.Namespace) -> str:
    if args.device:
        return args.device
    import torch

    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def engine_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings as keyword arguments; values read as JSON where they parse (2, 0.85, true), else text.

    Raises:
        ValueError: an item without ``=`` or with an empty key.
    """
    options = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--engine-option takes KEY=VALUE (e.g. tensor_parallel_size=2); got {item!r}.")
        words = {"true": True, "false": False, "none": None, "null": None}
        if value.strip().lower() in words:  # True / false / None as Python or JSON spells them
            options[key.strip()] = words[value.strip().lower()]
            continue
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _judge(args: argparse.Namespace):
    from sa_lens.evaluation.judge_registry import get_judge

    options = {}
    if args.judge == "llm":
        options = {k: v for k, v in (("model", args.judge_model), ("base_url", args.judge_url)) if v}
    elif args.judge != "keyword" and args.judge_model:
        options = {"model": args.judge_model}
    return get_judge(args.judge, **options)


def _evaluate(model, args: argparse.Namespace, states=None, scenario: dict | None = None) -> int:
    from sa_lens.data.public import load_public
    from sa_lens.evaluation.decoding import preset
    from sa_lens.evaluation.harness import evaluate

    overrides = {k: v for k, v in (("prompt_format", args.prompt_format), ("system_prompt", args.system_prompt),
                                    ("max_new_tokens", args.max_new_tokens)) if v is not None}
    if "system_prompt" in overrides and args.prompt_format is None:
        overrides["prompt_format"] = "chat"
    settings = preset(args.preset, seed=args.seed, **overrides)
    mmlu_dev = load_public("mmlu", args.mmlu_dev, split="dev") if args.mmlu_dev else None
    backend = get_backend(args.backend, **engine_options(args.engine_option))
    try:
        report = evaluate(
            model, [d for d in args.data.split(",") if d], _judge(args), states=states, settings=settings,
            out_dir=args.out, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size, seed=args.seed,
            mmlu_dev=mmlu_dev, backend=backend,
        )
    finally:
        backend.close()
    if os.environ.get("RANK", "0") != "0":  # a data-parallel job: rank 0 reports
        return 0
    if scenario is not None:  # beside the harness's own config in results.json, so the report says where HDR acted
        report.config["scenario"] = scenario
        saved = json.loads((Path(args.out) / "results.json").read_text())
        saved["config"]["scenario"] = scenario
        (Path(args.out) / "results.json").write_text(json.dumps(saved, indent=2, default=str))
    print(report.summary, "", report.comparison, "", f"Report in {Path(args.out).resolve()} ({report.seconds:.0f} s).", sep="\n")
    return 0


def _run_evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sa_lens.models import load_model

    return _evaluate(load_model(args.model, device=_device(args)), args)


def _pairs(args: argparse.Namespace, harmful_path: str) -> list[tuple[str, str]]:
    from sa_lens.data import load_bundled
    from sa_lens.demonstrations import Demonstration, demonstration_pairs, load_demonstrations
    from sa_lens.evaluation.judges import KeywordJudge, Verdict
    from sa_lens.generation import generate
    from sa_lens.models import load_hf_model

    if args.pairs:
        return demonstration_pairs(load_demonstrations(args.pairs))
    # Default: θH's own answers where it complied (the first 30, file order), against the official safe answer.
    model, tok = load_hf_model(harmful_path)
    questions = [r["prompt"] for r in load_bundled("harmful", "train")]
    answers = generate(model, questions, 64, tokenizer=tok, progress="θH answers for the ICV")
    judge = KeywordJudge()
    pairs = demonstration_pairs(Demonstration(q, a) for q, a in zip(questions, answers)
                                if judge.judge(a) is Verdict.NOT_REFUSED)[:30]
    if not pairs:
        raise InputError("θH refused every bundled harmful request, so no ICV pairs; pass --pairs.")
    return pairs


def _run_safety_arithmetic(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sa_lens.evaluation.states import safety_arithmetic_states
    from sa_lens.harm_vector import HarmVector
    from sa_lens.models import load_hf_model, load_model

    if not 0.0 < args.top_k <= 1.0:
        parser.error(f"--top-k must be in (0, 1], got {args.top_k}")
    if args.scenario != "edit" and (args.edit_variant or args.safe_align_layers):
        parser.error("--edit-variant and --safe-align-layers belong to --scenario edit.")
    if args.scenario == "edit":
        return _run_edit_scenario(args)
    base, _ = load_hf_model(args.base)
    harmful, _ = load_hf_model(args.harmful)
    hv = HarmVector.from_models(base, harmful).trim(args.top_k)
    del base, harmful
    # Each state's resume key holds its intervention's fingerprint (λ, α, the pairs' texts, τH′'s contents), so a
    # rerun into the same folder with another --alpha redoes the Safe-Align states and reuses Original and HDR.
    states = safety_arithmetic_states(hv, _pairs(args, args.harmful), args.lam, args.alpha)
    return _evaluate(load_model(args.target, device=_device(args)), args, states)


def _layer_summary(hv) -> dict:
    """Where τH′ is non-zero: its decoder layers, and its tensors outside every layer (embeddings, final norm)."""
    from sa_lens.parameter_names import layer_index
    from sa_lens.sparse_delta import SparseDelta

    nonzero = [n for n, t in hv.deltas.items() if bool((t.values if isinstance(t, SparseDelta) else t).any())]
    return {"nnz": hv.nnz, "numel": hv.numel,
            "layers": sorted({i for i in map(layer_index, nonzero) if i is not None}),
            "outside_layers": sorted(n for n in nonzero if layer_index(n) is None)}


def _run_edit_scenario(args: argparse.Namespace) -> int:
    """EDIT (paper §4, paper-notes.md §2.4, §7 items 6–7): θb → θedit = --target; θH fine-tuned from θb."""
    import dataclasses

    from sa_lens.commands.model_args import edit_area_between, local_or_hub, streamable
    from sa_lens.edit_area import edit_area_vector
    from sa_lens.evaluation.states import safety_arithmetic_states
    from sa_lens.harm_vector import HarmVector
    from sa_lens.interventions import Compose
    from sa_lens.models import load_hf_model, load_model
    from sa_lens.provenance import portable_name

    variant, where = args.edit_variant or "paper", args.safe_align_layers or "area"
    area = edit_area_between(args.base, args.target)
    shown = ", ".join(area.tensors[:4]) + (f" and {len(area.tensors) - 4} more" if len(area.tensors) > 4 else "")
    print(f"Edit area: layers {list(area.layers)} (changed: layers {list(area.changed_layers)}; "
          f"{len(area.tensors)} tensor(s): {shown}).")
    local_or_hub(args.harmful)
    if streamable(args.base) and streamable(args.harmful):
        # The paper variant needs τH in the area only: stream those layers (a 7B model's τH is 27 GB in full).
        tau = HarmVector.from_checkpoints(args.base, args.harmful, layers=area.layers if variant == "paper" else None)
    else:
        tau = HarmVector.from_models(load_hf_model(args.base)[0], load_hf_model(args.harmful)[0])
    hv = edit_area_vector(tau, area.layers, args.top_k, variant=variant)
    del tau
    states = safety_arithmetic_states(hv, _pairs(args, args.harmful), args.lam, args.alpha)
    if where == "area":  # the official code's EDIT setting: ICV read and injected in the area's layers only
        safe_align = dataclasses.replace(states["Safe-Align"], layers=area.layers, icv_layers=area.layers)
        states |= {"Safe-Align": safe_align, "Safety Arithmetic": Compose((states["HDR"], safe_align))}
    scenario = {
        "scenario": "edit",
        "base": portable_name(args.base),
        "edit_area": {"tensors": list(area.tensors), "changed_layers": list(area.changed_layers),
                      "layers": list(area.layers)},
        "edit_variant": variant,
        "safe_align_layers": list(area.layers) if where == "area" else "all",
        "harm_vector": _layer_summary(hv),
    }
    return _evaluate(load_model(args.target, device=_device(args)), args, states, scenario)
