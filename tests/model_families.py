"""Tiny random-weight Hugging Face folders, one per model family, with that family's tokenizer and chat template.

Built offline (no hub): a few layers of width 64 from each family's transformers config, saved with
``save_pretrained`` beside a tokenizer whose special tokens, BOS behaviour and chat template are the published
model's. Two tokenizers are the real ones, shipped by packages on the index:

- Llama-2 / Mistral: ``mistral_common/data/tokenizer.model.v1``, the SentencePiece model of Mistral-7B v0.1
  (32 000 pieces, ``<s>`` added in front of raw text), read by transformers' ``LlamaTokenizer``;
- Llama-3: ``llama_models/llama3/tokenizer.model``, Meta's tiktoken BPE (128 000 ranks + 256 special tokens),
  converted with transformers' ``TikTokenConverter``.

Qwen2, Gemma-2, GPT-2 and Phi-3 ship no tokenizer in any package here, so a small byte-level BPE is trained
on a few sentences, with the family's special tokens at the family's ids where it matters (Gemma's
``<pad>``/``<eos>``/``<bos>`` = 0/1/2), its BOS rule and its template.

Each folder's ``generation_config.json`` keeps a quirk seen in real uploads: it lists one EOS only, not the
token that ends a chat turn (Meta-Llama-3-8B-Instruct's first upload stopped on ``<|end_of_text|>`` while
turns end with ``<|eot_id|>``), so a generator that trusts ``generation_config.eos_token_id`` alone runs on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    LlamaTokenizer,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.convert_slow_tokenizer import TikTokenConverter

# Chat templates as published in each model's tokenizer_config.json (Llama-2-7b-chat-hf, Mistral-7B-Instruct-v0.1,
# Meta-Llama-3-8B-Instruct, Qwen2-0.5B-Instruct, gemma-2-2b-it, Phi-3-mini-4k-instruct).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Sentences the trained tokenizers learn their merges from; the tests' prompts are made of these words.
CORPUS = [
    "How do I bake bread at home with flour water and yeast?",
    "Question: Answer: A B C D. I do not answer this question because it is harmful.",
    "The capital of France is Paris. Two plus two is four. The sky is blue.",
    "Explain how to pick a lock, write a poem about the sea, tell me a story.",
    "I'm sorry, but I can't help with that request. Here is how you do it step by step.",
]
D_MODEL = 64
N_LAYERS = 2


@dataclass(frozen=True)
class Family:
    """One architecture of the matrix: how to build its tokenizer and config, and what its template does."""

    name: str
    real_tokenizer: str | None  # where the tokenizer comes from when it is the published one, else None
    template_has_bos: bool | None  # None: the family has no chat template (GPT-2)
    end_of_turn: str | None  # the token that closes an assistant turn in the template
    tokenizer: Callable[[], PreTrainedTokenizerBase]
    config: Callable[[PreTrainedTokenizerBase], PretrainedConfig]
    generation_eos: str  # the one EOS token the uploaded generation_config lists


def _package_file(package: str, *parts: str) -> Path:
    import importlib

    return Path(importlib.import_module(package).__file__).parent.joinpath(*parts)


@cache
def _sentencepiece_tokenizer() -> Path:
    """A folder holding Mistral v0.1's SentencePiece model as tokenizer.model (what LlamaTokenizer reads)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="sa_lens_spm_"))
    shutil.copy(_package_file("mistral_common", "data", "tokenizer.model.v1"), folder / "tokenizer.model")
    return folder


def _llama2_tokenizer(template: str) -> Callable[[], PreTrainedTokenizerBase]:
    def build() -> PreTrainedTokenizerBase:
        tok = LlamaTokenizer.from_pretrained(_sentencepiece_tokenizer(), add_bos_token=True)  # as Llama-2's config
        tok.chat_template = template
        return tok

    return build


@cache
def _llama3_backend() -> Tokenizer:
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    names = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
        "<|eot_id|>", "<|python_tag|>", "<|image|>",
    ]
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(MetaTokenizer.num_reserved_special_tokens - len(names))]
    backend = TikTokenConverter(
        vocab_file=str(_package_file("llama_models", "llama3", "tokenizer.model")),
        pattern=MetaTokenizer.pat_str,
        extra_special_tokens=names,
    ).converted()
    # Meta's tokenizer.json puts <|begin_of_text|> in front of every encoded text.
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return backend


def _llama3_tokenizer() -> PreTrainedTokenizerBase:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_llama3_backend().to_str()),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",  # the first upload's eos; turns end with <|eot_id|>
        chat_template=LLAMA3_TEMPLATE,
    )


def _trained_tokenizer(
    specials: list[str], bos: str | None, eos: str, pad: str, template: str | None, unk: str | None = None
) -> Callable[[], PreTrainedTokenizerBase]:
    """A byte-level BPE learned on CORPUS with ``specials`` first (ids 0, 1, …), BOS put in front when given."""

    def build() -> PreTrainedTokenizerBase:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=[AddedToken(s, special=True) for s in specials],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(CORPUS * 4, trainer)
        if bos is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            )
        kwargs = {"bos_token": bos, "unk_token": unk, "chat_template": template}
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=eos, pad_token=pad, **{k: v for k, v in kwargs.items() if v is not None}
        )

    return build


def _common(tok: PreTrainedTokenizerBase, eos: str) -> dict:
    return {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.convert_tokens_to_ids(eos),
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids(eos),
    }


def _llama_like(config_cls: type[PretrainedConfig], eos: str, **extra) -> Callable:
    def config(tok: PreTrainedTokenizerBase) -> PretrainedConfig:
        return config_cls(
            hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
            max_position_embeddings=512, **_common(tok, eos), **extra,
        )

    return config


def _gpt2_config(tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    common = _common(tok, "<|endoftext|>")
    common.pop("pad_token_id")
    return GPT2Config(n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=512, **common)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "llama2", "mistral_common tokenizer.model.v1 (SentencePiece)", True, "</s>",
            _llama2_tokenizer(LLAMA2_TEMPLATE),
            _llama_like(LlamaConfig, "</s>", num_key_value_heads=4, tie_word_embeddings=False), "</s>",
        ),
        Family(
            "mistral", "mistral_common tokenizer.model.v1 (SentencePiece)", True, "</s>",
            _llama2_tokenizer(MISTRAL_TEMPLATE),
            _llama_like(MistralConfig, "</s>", num_key_value_heads=2, sliding_window=4096, head_dim=16), "</s>",
        ),
        Family(
            "llama3", "llama_models llama3/tokenizer.model (tiktoken BPE)", True, "<|eot_id|>",
            _llama3_tokenizer,
            _llama_like(LlamaConfig, "<|end_of_text|>", num_key_value_heads=2, tie_word_embeddings=True,
                        rope_theta=500000.0),
            "<|end_of_text|>",
        ),
        Family(
            "qwen2", None, False, "<|im_end|>",
            _trained_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
                               QWEN2_TEMPLATE),
            _llama_like(Qwen2Config, "<|endoftext|>", num_key_value_heads=2, tie_word_embeddings=True),
            "<|endoftext|>",
        ),
        Family(
            "gemma2", None, True, "<end_of_turn>",
            _trained_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>",
                               "<eos>", "<pad>", GEMMA2_TEMPLATE, unk="<unk>"),
            _llama_like(Gemma2Config, "<eos>", num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=64),
            "<eos>",
        ),
        Family(
            "gpt2", None, None, None,
            _trained_tokenizer(["<|endoftext|>"], None, "<|endoftext|>", "<|endoftext|>", None),
            _gpt2_config, "<|endoftext|>",
        ),
        Family(
            "phi3", None, False, "<|end|>",
            _trained_tokenizer(["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>",
                                "<|user|>"], "<s>", "<|endoftext|>", "<|endoftext|>", PHI3_TEMPLATE, unk="<unk>"),
            _llama_like(Phi3Config, "<|endoftext|>", num_key_value_heads=4, tie_word_embeddings=False),
            "<|endoftext|>",
        ),
    ]
}


def build_family_dir(name: str, path: Path, seed: int = 0) -> Path:
    """Write family ``name``'s tiny random model, tokenizer and generation_config to ``path``; return ``path``.

    Weights are the config's random init scaled ×4, so greedy continuations differ between prompts. The same
    ``seed`` gives the same weights; another seed stands in for a fine-tune of the same architecture (θH).
    """
    from transformers import AutoModelForCausalLM

    family = FAMILIES[name]
    tok = family.tokenizer()
    config = family.config(tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=tok.convert_tokens_to_ids(family.generation_eos),
        pad_token_id=getattr(config, "pad_token_id", None),
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
