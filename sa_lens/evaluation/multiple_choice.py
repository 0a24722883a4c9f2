"""Utility by multiple-choice log-likelihood, scored exactly as lm-eval-harness scores it: MMLU, TruthfulQA MC1/MC2.

The paper reports MMLU (5-shot) and TruthfulQA for BASE models with numbers matching lm-eval-harness conventions
(paper-notes.md §4.5). This module is the light path: no lm-eval install or task machinery, one forward pass per
distinct input (the same passes lm-eval makes, so about its time: 1.06× on 200 MMLU questions), and the same
numbers as lm-eval 0.4's ``HFLM`` (per-option log-likelihoods within 1e-4 nats, identical accuracy;
``tests/unit/test_utility.py`` and ``analyses/utility_parity.py`` check it). What it copies from lm-eval:

- the prompts of lm-eval's ``mmlu`` tasks (subject header, ``first_n`` dev shots, "Answer:" then " A" … " D")
  and of ``truthfulqa_mc1``/``truthfulqa_mc2`` (the six-pair QA primer, then "Q: …\\nA:" and " option");
- ``_encode_pair``: trailing whitespace of the context moves onto the continuation, context + continuation are
  encoded together and split at the context's length, so a SentencePiece tokenizer reads " A" after "Answer:" as
  the one piece "▁A" (encoded alone it is "▁" + "A", several nats lower);
- ``HFLM.tok_encode``'s special tokens: the tokenizer's own default (``add_bos_token=None``) or as forced, and none
  when the text already starts with the BOS string.

Runs through a bridge's underlying HF module, so HDR edits and Safe-Align hooks active around the call apply; bridge
components no hook needs run as the modules they wrap (:func:`sa_lens.bypass.bypass_unhooked`). The full harness
(ARC, HellaSwag, any lm-eval task) is :func:`sa_lens.evaluation.utility.utility`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sa_lens.bridge import is_bridge
from sa_lens.bypass import bypass_unhooked, hooked
from sa_lens.data.public import MCItem, MCSet
from sa_lens.errors import InputError
from sa_lens.eval_mode import eval_mode
from sa_lens.generation import hf_and_tokenizer

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = [
    "MMLU_SHOTS",
    "TRUTHFULQA_PRIMER",
    "continuation_logprobs",
    "encode_pair",
    "item_logprobs",
    "mc_prompt",
    "mmlu_shots",
    "score_items",
    "score_of",
]

LETTERS = "ABCD"
MMLU_SHOTS = 5
"""Solved dev questions before each MMLU question (the paper's 5-shot; lm-eval's ``first_n`` sampler)."""

TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)
"""The six fixed Q/A pairs lm-eval's truthfulqa_mc1/mc2 put before every question (Lin et al. 2022's QA prompt)."""


def _mmlu_block(item: MCItem) -> str:
    if len(item.choices) != len(LETTERS):
        raise InputError(f"MMLU item {item.id!r} has {len(item.choices)} options; the MMLU prompt lists exactly 4.")
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices))
    return f"{item.question.strip()}{options}\nAnswer:"


def mc_prompt(item: MCItem, scoring: str, shots: Sequence[MCItem] = ()) -> tuple[str, list[str]]:
    """The context and the continuations lm-eval scores for one question.

    MMLU (``letter``), lm-eval's ``mmlu_<subject>``: "The following are multiple choice questions (with answers)
    about {subject}.\\n\\n" (subject with spaces for underscores; left out when the item has no category), each
    shot as "question\\nA. …\\nD. …\\nAnswer: X\\n\\n", then the question ending "Answer:"; continuations " A" … " D".
    TruthfulQA (``mc1``/``mc2``): :data:`TRUTHFULQA_PRIMER` + "\\n\\nQ: question\\nA:" (question unstripped, as
    lm-eval) and " option" per option.

    Args:
        item: the question.
        scoring: ``letter``, ``mc1`` or ``mc2``.
        shots: solved examples before an MMLU question, in order (see :func:`mmlu_shots`); none for TruthfulQA,
            whose primer is its few-shot prompt.

    Returns:
        ``(context, continuations)``, one continuation per option.

    Raises:
        InputError: an unknown scoring, shots for TruthfulQA, or an MMLU item without exactly 4 options.
    """
    if scoring == "letter":
        header = (f"The following are multiple choice questions (with answers) about {item.category.replace('_', ' ')}."
                  "\n\n" if item.category else "")
        solved = "".join(f"{_mmlu_block(s)} {LETTERS[s.labels.index(1)]}\n\n" for s in shots)
        return header + solved + _mmlu_block(item), [f" {letter}" for letter in LETTERS]
    if scoring not in ("mc1", "mc2"):
        raise InputError(f"scoring must be 'letter', 'mc1' or 'mc2'; got {scoring!r}.")
    if shots:
        raise InputError("TruthfulQA takes no shots: its six-pair primer is its few-shot prompt (lm-eval pins 0).")
    return f"{TRUTHFULQA_PRIMER}\n\nQ: {item.question}\nA:", [f" {c}" for c in item.choices]


def mmlu_shots(dev: MCSet | Sequence[MCItem], k: int = MMLU_SHOTS) -> dict[str, tuple[MCItem, ...]]:
    """The first ``k`` dev questions of every subject, in file order (lm-eval's ``first_n`` sampler on ``dev``).

    Args:
        dev: MMLU's dev split (``load_public("mmlu", path, split="dev")``), 5 questions per subject.
        k: shots per subject, 0 … 5.

    Returns:
        subject → its ``k`` shots.

    Raises:
        InputError: ``k`` negative, or a subject with fewer than ``k`` dev questions.
    """
    if k < 0:
        raise InputError(f"k (shots per subject) must be ≥ 0, got {k}.")
    by_subject: dict[str, list[MCItem]] = {}
    for item in dev.items if isinstance(dev, MCSet) else dev:
        by_subject.setdefault(item.category, []).append(item)
    short = sorted(s for s, items in by_subject.items() if len(items) < k)
    if short:
        raise InputError(f"{k}-shot MMLU needs {k} dev questions per subject; {', '.join(short)} have fewer.")
    return {subject: tuple(items[:k]) for subject, items in by_subject.items()}


def _max_length(config: object, tok: PreTrainedTokenizerBase) -> int:
    # lm-eval's resolve_max_length: the (text) config's length, else the tokenizer's, else 2048.
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    limit = getattr(tok, "model_max_length", None)
    return int(limit) if limit is not None and limit < 1e29 else 2048


def _tok_encode(tok: PreTrainedTokenizerBase, text: str, add_bos_token: bool | None) -> list[int]:
    # HFLM.tok_encode: the tokenizer's own special tokens unless forced; none when the text carries BOS already.
    kwargs = {} if add_bos_token is None else {"add_special_tokens": add_bos_token}
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if add_bos_token is None and prefix is not None and text.startswith(tok.decode(prefix)):
        kwargs = {"add_special_tokens": False}
    return tok.encode(text, **kwargs)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, add_bos_token: bool | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation as lm-eval's causal ``_encode_pair`` makes them.

    Trailing whitespace of the context is moved onto the continuation; context + continuation are encoded
    together and the continuation is what follows the context's own encoding. An empty context is lm-eval's
    case too: the BOS (else EOS) token stands for it.

    Args:
        tokenizer: the tokenizer the model is scored with.
        context: the conditioning text.
        continuation: the text to score.
        add_bos_token: None = the tokenizer's own special tokens (lm-eval's default); True/False forces them.

    Returns:
        ``(context_ids, continuation_ids)``.

    Raises:
        InputError: a continuation that encodes to no tokens, or a non-empty context that does.
    """
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx_ids, cont_ids = ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    else:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = _tok_encode(tokenizer, context + continuation, add_bos_token)
        ctx_ids = _tok_encode(tokenizer, context, add_bos_token)
        cont_ids = whole[len(ctx_ids):]
    if not cont_ids:
        raise InputError(f"the continuation {continuation!r} has no tokens to score after its context.")
    if not ctx_ids:  # a whitespace-only context with a tokenizer that adds no BOS: nothing predicts the first token
        raise InputError(f"the context {context!r} encodes to no tokens, so nothing predicts the continuation's first "
                         "token; pass '' (lm-eval's empty context: the BOS/EOS token) or add_bos_token=True.")
    return ctx_ids, cont_ids


@torch.inference_mode()
def continuation_logprobs(
    model: TransformerBridge | PreTrainedModel,
    contexts: Sequence[str],
    continuations: Sequence[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 32,
    add_bos_token: bool | None = None,
) -> Float[Tensor, " n"]:
    """Summed log-probability (nats) of each continuation's tokens given its context, as lm-eval's ``HFLM``.

    Tokens come from :func:`encode_pair`; rows sharing context + continuation minus its last token share one
    forward pass (MMLU's four letters cost one pass, not four), longest first, right-padded (padding sits after
    the last scored token, so it cannot change a score). Inputs longer than the model's context lose tokens on their
    left, as in lm-eval. Only each batch's last positions, from the first one that predicts a continuation token,
    are unembedded (``logits_to_keep``), unless a hook sits on the unembedding: then every position is.

    Args:
        model: a bridge (by default its checkpoint's own tokenizer, not TransformerLens's always-BOS copy;
            hooks and edits active around the call apply) or a plain HF model.
        contexts: one context per row.
        continuations: one continuation per row.
        tokenizer: required for plain HF models; overrides a bridge's.
        batch_size: distinct inputs per forward pass.
        add_bos_token: None = the tokenizer's own special tokens; True/False forces them (lm-eval's argument).

    Returns:
        ``[n]`` float32 log-probabilities in nats, in input order.

    Raises:
        InputError: misaligned inputs, or a continuation with no tokens or longer than the model's context.
    """
    if len(contexts) != len(continuations):
        raise InputError(f"{len(contexts)} contexts for {len(continuations)} continuations.")
    hf, tok = hf_and_tokenizer(model, tokenizer)
    pairs = [encode_pair(tok, c, x, add_bos_token) for c, x in zip(contexts, continuations)]
    window = _max_length(hf.config, tok)
    if any(len(cont) > window for _, cont in pairs):
        raise InputError(f"a continuation is longer than the model's {window}-token context; shorten it.")
    # The input is context + continuation minus its last token (that token is only predicted), cut from the left
    # to the model's window as lm-eval does.
    inputs = [tuple((ctx + cont)[-(window + 1) :][:-1]) for ctx, cont in pairs]
    rows_of: dict[tuple[int, ...], list[int]] = {}
    for i, seq in enumerate(inputs):
        rows_of.setdefault(seq, []).append(i)
    # Longest first: the first batch shows an out-of-memory error at once, not at the end.
    unique = sorted(rows_of, key=len, reverse=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out = torch.empty(len(contexts))
    # Bridge components no hook needs run as the modules they wrap (sa_lens.bypass): a 5-shot MMLU prompt is
    # ~600 tokens, where the bridge's step-by-step eager attention costs most; hooks present now still fire.
    bypass = bypass_unhooked(model) if is_bridge(model) else contextlib.nullcontext()
    keep_logits = _keeps_logits(hf)
    with eval_mode(hf), bypass:  # eval: a model left in train() would score through dropout
        for start in range(0, len(unique), batch_size):
            _score_batch(hf, unique[start : start + batch_size], rows_of, pairs, pad, out, keep_logits)
    return out


def _score_batch(hf: PreTrainedModel, batch: list[tuple[int, ...]], rows_of: dict[tuple[int, ...], list[int]],
                 pairs: list[tuple[list[int], list[int]]], pad: int, out: Tensor, keep_logits: bool) -> None:
    """One forward pass over ``batch`` (right-padded, longest first); writes each row's continuation
    log-probability into ``out``."""
    width = len(batch[0])
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    for r, seq in enumerate(batch):
        ids[r, : len(seq)] = torch.tensor(seq)
    # Only the last positions, from the first one that predicts a continuation token, go through the unembedding: a
    # 5-shot MMLU row is ~600 tokens and scores one, and [rows, tokens, vocab] logits are most of the pass's cost
    # (and memory) otherwise. An int, not an index tensor: it has no device (a model split over GPUs ends on another
    # one) and every model that takes logits_to_keep takes an int.
    first = min(len(seq) - len(pairs[i][1]) for seq in batch for i in rows_of[seq])
    kwargs = {"logits_to_keep": width - first} if keep_logits else {}
    # No attention mask, as lm-eval: right padding is never attended to by the causal positions before it, and
    # without a padding mask attention takes its plain causal path.
    logits = hf(input_ids=ids.to(hf.device), **kwargs).logits
    offset = width - logits.shape[1]  # 0 when the model gave every position (it ignored logits_to_keep)
    for r, seq in enumerate(batch):
        for i in rows_of[seq]:
            cont = pairs[i][1]
            # Token t is predicted at position t-1: the continuation's n tokens at the input's last n positions.
            start = len(seq) - len(cont) - offset
            logp = torch.log_softmax(logits[r, start : start + len(cont)].float(), dim=-1).cpu()
            out[i] = logp[torch.arange(len(cont)), torch.tensor(cont)].sum()


def _keeps_logits(hf: PreTrainedModel) -> bool:
    """Whether to pass ``logits_to_keep``: the model's forward takes it (transformers' causal LMs do; a custom one
    may not), and no hook on the unembedding (its hook points on a bridge, or a PyTorch hook) expects every
    position (:func:`sa_lens.bypass.hooked`, the rule the bypass keeps components by)."""
    if "logits_to_keep" not in inspect.signature(type(hf).forward).parameters:
        return False
    head = hf.get_output_embeddings()
    return head is None or not any(hooked(m) for m in head.modules())


def item_logprobs(
    model: TransformerBridge | PreTrainedModel,
    scoring: str,
    items: Sequence[MCItem],
    tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 32,
    shots: Mapping[str, Sequence[MCItem]] | None = None,
    add_bos_token: bool | None = None,
) -> list[Float[Tensor, " options"]]:
    """Per question, the log-likelihood (nats) of each option under lm-eval's prompt for ``scoring``.

    Args:
        model: bridge or HF model.
        scoring: ``letter`` (MMLU), ``mc1`` or ``mc2`` (TruthfulQA).
        items: the questions.
        tokenizer: required for plain HF models.
        batch_size: distinct inputs per forward pass.
        shots: MMLU only: subject → solved dev questions (:func:`mmlu_shots`); None is zero-shot.
        add_bos_token: see :func:`continuation_logprobs`.

    Returns:
        One ``[options]`` float32 tensor per item, options in the item's order.

    Raises:
        InputError: see :func:`mc_prompt`; a subject missing from ``shots``.
    """
    contexts, conts, sizes = [], [], []
    for item in items:
        if shots is not None and scoring == "letter" and item.category not in shots:
            raise InputError(f"no MMLU shots for subject {item.category!r}; shots cover {', '.join(sorted(shots))}.")
        ctx, options = mc_prompt(item, scoring, shots[item.category] if shots is not None else ())
        contexts += [ctx] * len(options)
        conts += options
        sizes.append(len(options))
    ll = continuation_logprobs(model, contexts, conts, tokenizer, batch_size, add_bos_token)
    return list(torch.split(ll, sizes))


def score_of(scoring: str, logprobs: Float[Tensor, " options"], labels: Sequence[int]) -> float:
    """One question's score in [0, 1] as lm-eval's metric: 1/0 for the arg-max option (MMLU, MC1; the first
    maximum on ties, as ``np.argmax``) or the MC2 true-probability mass Σ_true p_i / Σ_all p_i, p_i = exp(ll_i)."""
    truth = torch.tensor(labels, dtype=torch.bool)
    if scoring == "mc2":
        return float(torch.softmax(logprobs.double(), dim=0)[truth].sum())
    return float(truth[int(torch.argmax(logprobs))])


def score_items(
    model: TransformerBridge | PreTrainedModel,
    mcset: MCSet,
    items: Sequence[MCItem],
    tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 32,
    shots: Mapping[str, Sequence[MCItem]] | None = None,
    add_bos_token: bool | None = None,
) -> list[float]:
    """Per-question score in [0, 1]: 1/0 correctness (MMLU, MC1) or the MC2 true-probability mass (Lin et al. 2022).

    Args:
        model: bridge or HF model.
        mcset: the set (for its scoring rule).
        items: the questions to score (a batch of ``mcset.items``).
        tokenizer: required for plain HF models.
        batch_size: distinct inputs per forward pass.
        shots: MMLU only: subject → solved dev questions (:func:`mmlu_shots`); None is zero-shot.
        add_bos_token: see :func:`continuation_logprobs`.

    Returns:
        One score per item.
    """
    lls = item_logprobs(model, mcset.scoring, items, tokenizer, batch_size, shots, add_bos_token)
    return [score_of(mcset.scoring, ll, item.labels) for ll, item in zip(lls, items)]
