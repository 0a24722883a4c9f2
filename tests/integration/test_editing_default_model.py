"""ROME on the embedded SmolLM2-135M-Instruct with the first three bundled CounterFact-style edits and default
options at layer 4: each edit makes the new answer win over the true one, and every parameter is bit-equal after
each block. 65 s on one thread of a 2-core machine shared with other jobs (50 s CPU): the key statistics on the
bundled text ~15 s once, then 5–11 Adam steps per edit."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import sa_lens
from sa_lens import edit_stats
from sa_lens.data import load_bundled
from sa_lens.edit_requests import load_edits
from sa_lens.editing import edit_scores, knowledge_edit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return sa_lens.load_model()


def test_three_bundled_counterfact_edits_at_layer_4_win_and_leave_every_parameter_bit_equal(
    model, tmp_path, monkeypatch
):
    # A fresh statistics cache (after the model is loaded): the first edit estimates C on the bundled text, the
    # next two reuse it, as sequential edits at one layer do.
    monkeypatch.setenv("SA_LENS_CACHE", str(tmp_path))
    monkeypatch.setattr(edit_stats, "_MEMO", {})
    before = {n: p.detach().clone() for n, p in sa_lens.checkpoint_parameters(model).items()}
    for request in load_edits(load_bundled("edits"))[:3]:
        prompt_only = [replace(request, paraphrases=(), neighbours=())]  # efficacy: the edit prompt alone
        assert edit_scores(model, prompt_only)[0]["efficacy"] == 0.0, request.id  # the true answer wins before
        with knowledge_edit(model, [request], 4) as results:
            assert edit_scores(model, prompt_only)[0]["efficacy"] == 1.0, (request.id, results[0])
        after = sa_lens.checkpoint_parameters(model)
        assert all(torch.equal(after[n], before[n]) for n in before), request.id
