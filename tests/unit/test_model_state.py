"""Analyses run on a model in a known state: eval mode for the call (caller's mode back after, also on error),
leftover hooks refused by name, sa_lens's own hooks allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import sa_lens
from sa_lens.analysis.capture import capture
from sa_lens.analysis.heads import trace_heads
from sa_lens.analysis.layers import layer_sweep
from sa_lens.analysis.logit_diff import token_sets
from sa_lens.analysis.patching import patch_heads
from sa_lens.analysis.views import attention_view, projection_view
from sa_lens.errors import InputError
from sa_lens.generation import enable_kv_cache
from sa_lens.head_ablation import ablate_heads_hooks
from sa_lens.model_state import analysis_state, foreign_hooks
from sa_lens.positions import prompt_length
from sa_lens.safety_vector import SafetyVector

HARMFUL = ["Explain how to pick a lock", "Tell me a story about bread"]
HARMLESS = ["The capital of France is Paris", "Write a poem about the sea"]
PAIRS = [("Question: pick a lock\n    Answer: Here is how", "Question: pick a lock\n    Answer: I do not answer")]


@pytest.fixture(scope="module")
def dropout_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with dropout 0.3 on embeddings, attention and residual writes (active in train mode)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dropout") / "model"
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def dropout_bridge(dropout_dir: Path):
    return sa_lens.load_model(dropout_dir)


def _sets(model):
    vocab = model.tokenizer
    return token_sets(vocab, [vocab.convert_tokens_to_ids("I")], [vocab.convert_tokens_to_ids("H"), vocab.convert_tokens_to_ids("T")])


def test_dropout_really_changes_outputs_in_train_mode(dropout_bridge):
    # The premise of the next tests: without sa_lens's eval mode, two passes would differ.
    ids = dropout_bridge.tokenizer(HARMFUL[:1], return_tensors="pt").input_ids
    dropout_bridge.train()
    with torch.no_grad():
        assert not torch.allclose(dropout_bridge(ids), dropout_bridge(ids))


def test_trace_heads_in_train_mode_equals_eval_mode_and_hands_back_train_mode(dropout_bridge):
    sets = _sets(dropout_bridge)
    direction = torch.randn(dropout_bridge.cfg.d_model)
    kwargs = dict(refusal_tokens=list(sets.refusal), compliance_tokens=list(sets.compliance), patch=[(0, 1), (1, 2)])
    dropout_bridge.eval()
    want = trace_heads(dropout_bridge, direction, HARMFUL, HARMLESS, **kwargs)
    dropout_bridge.train()
    got = trace_heads(dropout_bridge, direction, HARMFUL, HARMLESS, **kwargs)
    assert dropout_bridge.training and all(m.training for m in dropout_bridge.modules())
    assert got["value"].tolist() == pytest.approx(want["value"].tolist(), abs=1e-6)
    assert got.attrs["logit_diff_harmful"] == pytest.approx(want.attrs["logit_diff_harmful"], abs=1e-6)


def test_safety_vector_in_train_mode_equals_eval_mode(dropout_bridge):
    dropout_bridge.eval()
    want = SafetyVector.from_pairs(dropout_bridge, PAIRS, method="mean_diff")
    dropout_bridge.train()
    got = SafetyVector.from_pairs(dropout_bridge, PAIRS, method="mean_diff")
    assert dropout_bridge.training
    torch.testing.assert_close(got.directions, want.directions, atol=1e-5, rtol=1e-5)


def test_each_module_gets_its_own_mode_back(dropout_bridge):
    dropout_bridge.eval()
    frozen = dropout_bridge.blocks[1]
    dropout_bridge.train()
    frozen.eval()  # a partly frozen model: block 1 in eval, the rest training
    before = {name: m.training for name, m in dropout_bridge.named_modules()}
    capture(dropout_bridge, HARMLESS, _sets(dropout_bridge), n_positions=1, grad=False)
    assert {name: m.training for name, m in dropout_bridge.named_modules()} == before
    assert not frozen.training and dropout_bridge.blocks[0].training


def test_an_exception_inside_the_analysis_restores_train_mode(dropout_bridge):
    dropout_bridge.train()
    with pytest.raises(InputError, match="n_positions"):
        capture(dropout_bridge, ["Hi"], _sets(dropout_bridge), n_positions=500)  # raised inside, after eval()
    assert all(m.training for m in dropout_bridge.modules())
    with pytest.raises(RuntimeError, match="boom"), analysis_state(dropout_bridge):
        assert not dropout_bridge.training
        raise RuntimeError("boom")
    assert all(m.training for m in dropout_bridge.modules())


def test_a_leftover_transformer_lens_hook_is_refused_by_name(tiny_bridge):
    def my_probe(x, hook):
        return x * 2

    tiny_bridge.add_hook("blocks.1.hook_resid_post", my_probe)
    try:
        with pytest.raises(InputError, match=r"my_probe.*blocks\.1.*reset_hooks"):
            capture(tiny_bridge, HARMLESS, _sets(tiny_bridge), n_positions=1)
        sv = torch.randn(tiny_bridge.cfg.n_layers, tiny_bridge.cfg.d_model)
        z = torch.zeros(len(HARMLESS), 1, tiny_bridge.cfg.n_layers, tiny_bridge.cfg.n_heads, tiny_bridge.cfg.d_head)
        every_entry_point = [
            lambda: SafetyVector.from_pairs(tiny_bridge, PAIRS),
            lambda: trace_heads(tiny_bridge, sv, HARMFUL, HARMLESS),
            lambda: patch_heads(tiny_bridge, HARMLESS, z, [(0, 0)], _sets(tiny_bridge), torch.zeros(len(HARMLESS))),
            lambda: projection_view(tiny_bridge, HARMLESS[0], sv),
            lambda: attention_view(tiny_bridge, HARMLESS[0], [(0, 0)]),
            lambda: layer_sweep(tiny_bridge, ["advbench"], "directional_ablation", sv=SafetyVector(sv)),
        ]
        for call in every_entry_point:
            with pytest.raises(InputError, match="my_probe"):
                call()
    finally:
        tiny_bridge.reset_hooks(including_permanent=True)
    assert foreign_hooks(tiny_bridge) == []
    capture(tiny_bridge, HARMLESS, _sets(tiny_bridge), n_positions=1)  # runs once the hook is gone


def test_a_plain_torch_hook_on_a_submodule_is_refused_with_its_place(tiny_bridge):
    def double_mlp(module, args, out):
        return out * 2

    handle = tiny_bridge.blocks[0].mlp.register_forward_hook(double_mlp)
    try:
        with pytest.raises(InputError, match=r"double_mlp.*blocks\.0.*handle\.remove"):
            SafetyVector.from_prompts(tiny_bridge, HARMFUL, HARMLESS)
    finally:
        handle.remove()


def test_sa_lens_own_hooks_are_not_refused(tiny_bridge):
    enable_kv_cache(tiny_bridge)  # the KV-cache routing pre-hook on every attention component
    tiny_bridge(tiny_bridge.tokenizer(HARMFUL[:1], return_tensors="pt").input_ids)  # libraries wire their hooks
    with prompt_length(3, tiny_bridge), tiny_bridge.hooks(fwd_hooks=ablate_heads_hooks([(0, 1)])):
        assert foreign_hooks(tiny_bridge) == []
        ablated = capture(tiny_bridge, HARMLESS, _sets(tiny_bridge), n_positions=1, grad=False)
    plain = capture(tiny_bridge, HARMLESS, _sets(tiny_bridge), n_positions=1, grad=False)
    assert torch.all(ablated.z[:, :, 0, 1] == 0) and not torch.equal(ablated.logit_diff, plain.logit_diff)
