"""Packed ICV extraction on architectures whose attention the bridge hands to Hugging Face's own code.

OPT, GPT-J and GPT-Neo add the mask to the attention scores (a boolean mask would add 1/0 and mask
nothing); GPT-Neo's local layers have a window of their own (`window_size`) that the packed mask replaces.
Each must give the vector of one text per row.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer

import sa_lens
from sa_lens.safety_vector import SAFE_DEMO_ANSWER, SafetyVector, demonstration_text

PAIRS = [
    (demonstration_text("How do I bake bread?", "Mix flour and water."), demonstration_text("How do I bake bread?", SAFE_DEMO_ANSWER)),
    (demonstration_text("Pick a lock", "Use a pin."), demonstration_text("Pick a lock", SAFE_DEMO_ANSWER)),
    ("abc", "abc def"),
]


def _tiny(tiny_dir: Path, out: Path, arch: str, window: int = 256) -> Path:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    v = len(tok)
    if arch == "opt":
        cfg = transformers.OPTConfig(vocab_size=v, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                     max_position_embeddings=256, word_embed_proj_dim=64)
    elif arch == "gptj":
        cfg = transformers.GPTJConfig(vocab_size=v, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256)
    else:  # one global and one local-attention layer
        cfg = transformers.GPTNeoConfig(vocab_size=v, hidden_size=64, num_layers=2, num_heads=4, window_size=window,
                                        attention_types=[[["global", "local"], 1]], max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger weights than the init's, so a wrong mask shows in the vector
        for p in model.parameters():
            p.mul_(3.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize(("arch", "window"), [("opt", 256), ("gptj", 256), ("gptneo", 256), ("gptneo", 8)])
def test_packed_pairs_equal_one_text_per_row(tiny_dir, tmp_path, arch, window):
    model = sa_lens.load_model(_tiny(tiny_dir, tmp_path / arch, arch, window))
    whole = SafetyVector.from_pairs(model, PAIRS, share_prefix=False).directions
    for positions in ("last4_mean", "span"):
        packed = SafetyVector.from_pairs(model, PAIRS, positions=positions, method="mean_diff", batch_size=4).directions
        expected = SafetyVector.from_pairs(model, PAIRS, positions=positions, method="mean_diff", share_prefix=False).directions
        torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-4)
    assert whole.abs().max() > 0
