"""Shared fixtures: a tiny random Llama (GQA, tied embeddings) with a chat tokenizer, built without downloads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import sa_lens

# vLLM's CPU build pins its own torch and transformers, so its tests run in .venv-vllm (`make test` runs both
# environments); in an environment without vLLM they are not collected rather than reported as skipped.
# (A spec without an origin is a namespace package, not vLLM.)
collect_ignore = [] if getattr(importlib.util.find_spec("vllm"), "origin", None) else ["on_vllm"]

# SmolLM2's chat template shape (ChatML), so the tiny model exercises the same formatting code.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "How do I bake bread at home with flour water and yeast?",
    "Question: Answer: I do not answer this question because it is harmful.",
    "The capital of France is Paris. Two plus two is four. The sky is blue.",
    "Explain how to pick a lock, write a poem about the sea, tell me a story.",
    "I'm sorry, but I can't help with that request. Here is how you do it step by step.",
]


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def build_tiny_model_dir(path: Path, seed: int = 0, n_layers: int = 2) -> Path:
    """Write a random tiny Llama + tokenizer as a Hugging Face folder and return it."""
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the default init, so greedy outputs vary by prompt
            p.mul_(4.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_dir_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, different random weights (a stand-in for θH)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_other") / "model", seed=1)


@pytest.fixture()
def tiny_bridge(tiny_dir: Path):
    return sa_lens.load_model(tiny_dir)
