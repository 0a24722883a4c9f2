"""``sa-lens export-vector``: a saved safety vector as a llama.cpp control vector (GGUF)."""

from __future__ import annotations

import argparse

from sa_lens.layer_spec import layers_argument
from sa_lens.steering import FORMULAS, POSITIONS, SITES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-vector",
        help="Write a safety vector as a llama.cpp control vector (llama-cli --control-vector out.gguf).",
        description="One direction.N = −α·v[l] per block, the vectors Safe-Align's additive formula adds: "
        "llama.cpp adds direction.N to the output of block N (counted from 0, N ≥ 1) at every position. "
        "Refused, with the reason: the official and ablate formulas (they depend on the activation), "
        "attn_out, prompt/generated positions, and non-zero rows at block 0 or the embeddings.",
    )
    p.add_argument("--vector", required=True, help="a .safetensors file written by `sa-lens safety-vector`")
    p.add_argument("--format", choices=("gguf",), default="gguf", help="output format (default: %(default)s)")
    p.add_argument("--alpha", type=float, required=True,
                   help="α of the additive formula x − α·v, in activation units (not the official formula's α)")
    p.add_argument("--site", choices=sorted(SITES), default="resid_post",
                   help="where Safe-Align adds: resid_post (layer l → direction.l), resid_pre (→ direction.l−1) or "
                        "mlp_out (→ direction.l; needs --model-type) (default: %(default)s)")
    p.add_argument("--formula", choices=sorted(FORMULAS), default="add",
                   help="only 'add' is a fixed vector llama.cpp can add (default: %(default)s)")
    p.add_argument("--positions", choices=POSITIONS, default="all", help="only 'all': llama.cpp steers every position")
    p.add_argument("--layers", type=layers_argument,
                   help="layers of the vector to export, counted from 0: 1-29, 4,5,6 or 4-6,10 (default: all)")
    p.add_argument("--model-type", help="the model's config.model_type (llama, qwen2, …), written as "
                   "controlvector.model_hint; needed for --site mlp_out")
    p.add_argument("--assume-additive-mlp", action="store_true",
                   help="with --site mlp_out: trust that this model type adds its MLP output to the residual "
                        "stream unchanged (for types sa_lens does not list)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("-o", "--out", required=True, help="output .gguf path (refused if it exists, unless --overwrite)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sa_lens.control_vector import from_gguf
    from sa_lens.safety_vector import SafetyVector

    sv = SafetyVector.load(args.vector)
    path = sv.to_gguf(args.out, args.alpha, site=args.site, formula=args.formula, positions=args.positions,
                      layers=args.layers, model_type=args.model_type, assume_additive_mlp=args.assume_additive_mlp,
                      overwrite=args.overwrite)
    vectors = from_gguf(path)  # read back: what llama.cpp will load
    blocks = sorted(vectors)
    peak = max(blocks, key=lambda n: float(vectors[n].norm()))
    print(f"{path}: llama.cpp control vector, {len(blocks)} direction tensors (blocks {blocks[0]}..{blocks[-1]}), "
          f"largest ‖α·v‖ at block {peak} ({float(vectors[peak].norm()):.3g}).\n"
          f"Use: llama-cli -m MODEL.gguf --control-vector {path}   (or --control-vector-scaled {path}:S for α·S)")
    return 0
