"""The refusal-vs-compliance logit difference: the scalar that head attributions and patching explain.

A reply's first token already says whether the model refuses: refusals start "I'm sorry", "I can't",
"Sorry", "As an AI…"; compliant answers start "Sure", "Here", "To do this…", "The …", "1.". The metric
is the mean logit of the refusal tokens minus the mean logit of the compliance tokens at the last
prompt position (the assistant turn's first token), in logits. Positive = leaning to refuse. On models that
soft-cap their final logits (Gemma-2: ``30·tanh(logits/30)``) the logits are read before capping, where they
are a sum of the residual's components (:mod:`sa_lens.analysis.capture`); capping is monotone per token, so a
token's rank is the same either way.
This is the logit-difference metric of the refusal-direction work (Arditi et al. 2024), with token
*sets* instead of one token so it does not hinge on a single phrasing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from sa_lens.errors import InputError

__all__ = ["COMPLIANCE_WORDS", "REFUSAL_WORDS", "TokenSets", "logit_diff", "token_sets", "unembed_direction"]

# First words of the lab's refusal templates and of common refusals (sa_lens/data/refusal_templates.json
# all start with "I").
REFUSAL_WORDS: tuple[str, ...] = ("I", "Sorry", "As", "Unfortunately")
# First words of SmolLM2-135M-Instruct's compliant answers to the bundled harmful-train prompts
# (measured: "To" 29, "The" 22, "When" 7, "A" 4 of 87) plus the usual "Sure"/"Here"/"1".
COMPLIANCE_WORDS: tuple[str, ...] = ("Sure", "Here", "To", "The", "1", "Certainly")


@dataclass(frozen=True)
class TokenSets:
    """Token ids whose mean logits are compared; ``words`` keep what each id was resolved from."""

    refusal: tuple[int, ...]
    compliance: tuple[int, ...]
    refusal_words: tuple[str, ...] = ()
    compliance_words: tuple[str, ...] = ()


def _resolve(tokenizer: PreTrainedTokenizerBase, items: Sequence[str | int]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    ids: dict[int, str] = {}
    for item in items:
        if isinstance(item, int):
            ids.setdefault(item, tokenizer.decode([item]))
            continue
        # A reply's first word follows "assistant\n", so it is encoded without a leading space; a word the
        # vocabulary splits is represented by its first piece.
        pieces = tokenizer.encode(item, add_special_tokens=False)
        if not pieces:
            raise InputError(f"{item!r} encodes to no token; drop it from the token set.")
        ids.setdefault(pieces[0], item)
    return tuple(ids), tuple(ids.values())


def token_sets(
    tokenizer: PreTrainedTokenizerBase,
    refusal: Sequence[str | int] = REFUSAL_WORDS,
    compliance: Sequence[str | int] = COMPLIANCE_WORDS,
) -> TokenSets:
    """Resolve refusal and compliance words (or token ids) to token ids for this tokenizer.

    Args:
        tokenizer: the model's tokenizer.
        refusal, compliance: words as a reply would start (no leading space), or token ids. Words the
            vocabulary splits contribute their first token.

    Returns:
        The two id sets, duplicates removed, order kept.

    Raises:
        ValueError: an empty set, a word with no token, or a token in both sets (the difference would
            cancel it; pick words whose first tokens differ).
    """
    if not refusal or not compliance:
        raise InputError("Both the refusal and the compliance token sets need at least one word or id.")
    r_ids, r_words = _resolve(tokenizer, refusal)
    c_ids, c_words = _resolve(tokenizer, compliance)
    shared = sorted(set(r_ids) & set(c_ids))
    if shared:
        raise InputError(
            f"Token(s) {[tokenizer.decode([t]) for t in shared]} are in both the refusal and the compliance set "
            "(their first tokens coincide in this vocabulary); choose words that start with different tokens."
        )
    return TokenSets(r_ids, c_ids, r_words, c_words)


def logit_diff(logits: Float[Tensor, "batch d_vocab"], sets: TokenSets) -> Float[Tensor, " batch"]:
    """Mean refusal logit minus mean compliance logit, per row, in logits."""
    logits = logits.float()
    return logits[:, list(sets.refusal)].mean(-1) - logits[:, list(sets.compliance)].mean(-1)


def unembed_direction(W_U: Float[Tensor, "d_model d_vocab"], sets: TokenSets) -> Float[Tensor, " d_model"]:
    """The residual direction whose dot product with the final-norm output is :func:`logit_diff`."""
    W_U = W_U.float()
    return W_U[:, list(sets.refusal)].mean(-1) - W_U[:, list(sets.compliance)].mean(-1)

