"""Head tracing on the embedded SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads): exact DLA bookkeeping."""

from __future__ import annotations

import pytest
import torch

import sa_lens
from sa_lens import data
from sa_lens.analysis.capture import capture, post_instruction_length
from sa_lens.analysis.heads import dla_components
from sa_lens.analysis.logit_diff import token_sets

pytestmark = pytest.mark.slow


def test_dla_of_every_component_sums_to_the_logit_difference_within_1e_4():
    model = sa_lens.load_model()
    sets = token_sets(model.tokenizer)
    assert len(sets.refusal) == 4 and len(sets.compliance) == 6  # every default word is its own first token
    prompts = [r["prompt"] for r in data.load_bundled("harmful", "dev")[:3]] + [r["prompt"] for r in data.load_bundled("safe", "dev")[:3]]
    cap = capture(model, prompts, sets, post_instruction_length(model.tokenizer), grad=False, batch_size=6)
    labels, dla = dla_components(model, cap, sets)
    assert sum(label["component"].startswith("L") for label in labels) == 30 * 9
    torch.testing.assert_close(dla.sum(0), cap.logit_diff, atol=1e-4, rtol=0)
    assert cap.logit_diff.abs().min() > 0.01
