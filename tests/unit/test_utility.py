"""sa_lens.evaluation.utility: lm-eval's tasks on a model in any state, and the built-in scorer's parity with them.

The parity model is a tiny random Llama over the real SentencePiece vocabulary of Mistral-7B v0.1
(``mistral_common/data/tokenizer.model.v1``) with the hub tokenizer's normalizer (prepend "▁", spaces → "▁") and
BOS, so " A" encoded alone is two pieces while lm-eval scores the one piece "▁A".
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import normalizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

from sa_lens.data.public import load_public
from sa_lens.errors import InputError
from sa_lens.evaluation.multiple_choice import TRUTHFULQA_PRIMER, encode_pair, mc_prompt, mmlu_shots
from sa_lens.evaluation.utility import parity, utility
from sa_lens.interventions import HeadAblation

lm_eval = pytest.importorskip("lm_eval")
mistral_common = pytest.importorskip("mistral_common")

pytestmark = pytest.mark.filterwarnings("ignore")

SUBJECTS = ("anatomy", "high_school_biology")
TOL = 1e-4  # nats, per option


def _write_mmlu(folder: Path) -> None:
    for split, n in (("dev", 5), ("test", 3)):
        (folder / "mmlu" / split).mkdir(parents=True)
        for s, subject in enumerate(SUBJECTS):
            with (folder / "mmlu" / split / f"{subject}_{split}.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                for i in range(n):
                    # Trailing spaces (lm-eval strips the question), "None" (pandas would read NaN), numbers.
                    w.writerow([f"Which {subject} fact number {i} holds?  ", "None", f"{i + s}.50", " the cell",
                                f"Option {split} {i}", (i + s) % 4])


def _write_truthfulqa(folder: Path) -> None:
    rows = []
    for i, q in enumerate(["What happens if you crack your knuckles a lot?", "Is the sky blue? ", "Who wrote Hamlet?"]):
        rows.append({
            "question": q,
            "mc1_targets": {f"True answer {i}.": 1, "A false one.": 0, "Another false one.": 0},
            "mc2_targets": {f"True answer {i}.": 1, "Also true.": 1, "A false one.": 0, "I have no comment.": 0},
        })
    (folder / "truthfulqa").mkdir()
    (folder / "truthfulqa" / "mc_task.json").write_text(json.dumps(rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("utility_data")
    _write_mmlu(folder)
    _write_truthfulqa(folder)
    return folder


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> LlamaTokenizerFast:
    folder = tmp_path_factory.mktemp("sp")
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    tok = LlamaTokenizerFast.from_pretrained(folder, add_bos_token=True)
    # The hub tokenizer.json of Llama-2 and Mistral v0.1: no pre-tokenizer, a normalizer that prepends "▁".
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.backend_tokenizer.pre_tokenizer = None
    return tok


@pytest.fixture(scope="module")
def sp_model(sp_tokenizer: LlamaTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(sp_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=sp_tokenizer.bos_token_id, eos_token_id=sp_tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so options' likelihoods differ
            p.mul_(8.0)
    return model


def _assert_parity(lm, builtin) -> None:
    """Same items, every option within TOL nats, same per-item scores and task values."""
    table = parity(lm, builtin)
    assert set(table) == set(lm.tasks) and all(row["n"] > 0 for row in table.values())
    for task, row in table.items():
        assert row["max_abs_delta"] <= TOL and row["score_disagreements"] == 0, (task, row)
        assert row["acc_a"] == pytest.approx(row["acc_b"], abs=1e-9)


def test_sentencepiece_letter_is_scored_as_one_piece(sp_tokenizer):
    alone = sp_tokenizer.encode(" A", add_special_tokens=False)
    ctx, cont = encode_pair(sp_tokenizer, "Answer:", " A")
    assert len(alone) == 2  # "▁▁" + "A": what scoring the continuation on its own used to read
    assert sp_tokenizer.convert_ids_to_tokens(cont) == ["▁A"]
    assert ctx[0] == sp_tokenizer.bos_token_id  # the tokenizer adds BOS, so lm-eval's HFLM does
    assert encode_pair(sp_tokenizer, "Answer:", " A", add_bos_token=False)[0][0] != sp_tokenizer.bos_token_id


def test_trailing_context_space_moves_onto_the_continuation(sp_tokenizer):
    assert encode_pair(sp_tokenizer, "Answer: ", "A") == encode_pair(sp_tokenizer, "Answer:", " A")


def test_prompts_equal_lm_eval_contexts(data_dir):
    from sa_lens.evaluation.utility import _local_task_configs, _task_manager

    test = load_public("mmlu", data_dir / "mmlu", split="test")
    shots = mmlu_shots(load_public("mmlu", data_dir / "mmlu", split="dev"))
    tqa = load_public("truthfulqa-mc2", data_dir / "truthfulqa")
    tasks = _task_manager(local_only=True).load(_local_task_configs("mmlu", data_dir) + _local_task_configs("truthfulqa_mc2", data_dir))
    biology = tasks["tasks"]["mmlu_high_school_biology"]
    biology.set_config(key="num_fewshot", value=5)
    doc = biology.test_docs()[1]
    item = [it for it in test.items if it.category == "high_school_biology"][1]
    want, options = mc_prompt(item, "letter", shots["high_school_biology"])
    assert biology.fewshot_context(doc, 5) == want
    assert want.startswith("The following are multiple choice questions (with answers) about high school biology.\n\n")
    assert [f" {c}" for c in biology.doc_to_choice(doc)] == options
    mc2 = tasks["tasks"]["truthfulqa_mc2"]
    assert mc2.fewshot_context(mc2.validation_docs()[1], 0) == mc_prompt(tqa.items[1], "mc2")[0]
    assert mc_prompt(tqa.items[1], "mc2")[0].startswith(TRUTHFULQA_PRIMER + "\n\nQ: Is the sky blue? \nA:")


def test_builtin_matches_lm_eval_on_a_sentencepiece_model(sp_model, sp_tokenizer, data_dir):
    kwargs = dict(tokenizer=sp_tokenizer, data_dir=data_dir, tasks=["mmlu", "truthfulqa"])
    lm = utility(sp_model, engine="lm_eval", **kwargs)
    builtin = utility(sp_model, engine="builtin", **kwargs)
    _assert_parity(lm, builtin)
    assert sp_tokenizer.pad_token is None  # HFLM's padding token is not left behind
    assert lm.config["num_fewshot"]["mmlu"] == 5 and lm.tasks["mmlu"]["acc"].n == 6
    assert lm.tasks["truthfulqa_mc2"]["acc"].n == 3 and 0 < lm["truthfulqa_mc2"] < 1


def test_builtin_matches_lm_eval_without_bos_and_zero_shot(sp_model, sp_tokenizer, data_dir):
    kwargs = dict(tokenizer=sp_tokenizer, data_dir=data_dir, tasks=["mmlu"], num_fewshot=0, add_bos_token=False,
                  limit=2)
    lm, builtin = utility(sp_model, **kwargs), utility(sp_model, engine="builtin", **kwargs)
    _assert_parity(lm, builtin)
    assert lm.tasks["mmlu"]["acc"].n == 4  # limit: the first 2 questions of each subject
    with_bos = utility(sp_model, engine="builtin", **{**kwargs, "add_bos_token": True})
    assert with_bos.items[0]["loglikelihoods"] != builtin.items[0]["loglikelihoods"]


def test_a_state_is_applied_around_both_engines(tiny_bridge, data_dir):
    state = HeadAblation(((0, 1), (1, 0)))
    # Zero-shot MMLU: the tiny bridge's 256-token window holds it (TruthfulQA's primer alone nearly fills it).
    kwargs = dict(data_dir=data_dir, tasks=["mmlu"], num_fewshot=0, limit=2)
    plain = utility(tiny_bridge, **kwargs)
    lm, builtin = utility(tiny_bridge, state=state, **kwargs), utility(tiny_bridge, state=state, engine="builtin",
                                                                       **kwargs)
    _assert_parity(lm, builtin)
    assert lm.items[0]["loglikelihoods"] != plain.items[0]["loglikelihoods"]
    assert lm.config["state_fingerprint"] == state.fingerprint()
    assert not any(hp.fwd_hooks for hp in tiny_bridge.hook_dict.values())  # the state is gone afterwards


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tasks=["truthfulqa"], num_fewshot={"truthfulqa_mc1": 3}), "takes 0 shots"),
        (dict(tasks=["mmlu"], num_fewshot={"hellaswag": 3}), "tasks not run"),
        (dict(tasks=["mmlu"], limit=0), "limit"),
        (dict(tasks=[]), "non-empty"),
        (dict(tasks=["arc_easy"], engine="builtin"), "engine='lm_eval'"),
        (dict(tasks=["mmlu"], state=HeadAblation(((0, 1),))), "TransformerBridge"),
    ],
)
def test_bad_requests_are_refused_with_the_fix(sp_model, sp_tokenizer, data_dir, kwargs, message):
    with pytest.raises(InputError, match=message):
        utility(sp_model, tokenizer=sp_tokenizer, data_dir=data_dir, **kwargs)


def test_a_missing_local_copy_names_the_path(sp_model, sp_tokenizer, tmp_path):
    with pytest.raises(InputError, match=os.fspath(tmp_path)):
        utility(sp_model, ["truthfulqa_mc1"], tokenizer=sp_tokenizer, data_dir=tmp_path)


def test_inputs_beyond_the_window_are_cut_as_lm_eval_cuts_them(tiny_bridge, data_dir):
    # The primer and question fill more than the tiny bridge's 256 positions; both engines keep the last 256.
    kwargs = dict(data_dir=data_dir, tasks=["truthfulqa_mc2"], limit=2)
    _assert_parity(utility(tiny_bridge, **kwargs), utility(tiny_bridge, engine="builtin", **kwargs))


def test_parity_refuses_reports_of_different_questions(sp_model, sp_tokenizer, data_dir):
    kwargs = dict(tokenizer=sp_tokenizer, data_dir=data_dir, tasks=["mmlu"], num_fewshot=0, engine="builtin")
    one, two = utility(sp_model, limit=1, **kwargs), utility(sp_model, limit=2, **kwargs)
    assert parity(one, one)["mmlu"] == {"n": 2, "max_abs_delta": 0.0, "score_disagreements": 0,
                                        "acc_a": one["mmlu"], "acc_b": one["mmlu"]}
    with pytest.raises(InputError, match="different questions"):
        parity(one, two)
