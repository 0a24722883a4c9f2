"""Position policies against their specification, for every prompt length, with and without the KV cache.

A watch hook wraps the steering hook and records, per forward pass, which (row, column) it changed. Columns are
mapped to absolute positions by the test itself (pass p of a padded prompt of n tokens computes columns 0…n+p−1
without the cache, and only column n+p−1 as a cached decode step), independently of ``sa_lens.positions``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sa_lens import SafetyVector, safety_hooks
from sa_lens.generation import generate_tokens
from sa_lens.positions import generated_mask, prompt_length
from sa_lens.prompts import tokenize_left_padded
from sa_lens.steering import POSITIONS

MAX_PROMPT = 6
Cell = tuple[int, int]  # (row, absolute column)


@pytest.fixture()
def words(tiny_bridge) -> list[str]:
    """Words that are one token each after a space, so a prompt's length in tokens is chosen exactly."""
    tok = tiny_bridge.tokenizer
    found = [w for w in ("bread", "the", "sea", "blue", "story", "yeast", "flour", "poem")
             if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(found) >= 3
    return found


def _texts(tok, words: list[str], lengths: list[int]) -> list[str]:
    # A special token first (atomic in any tokenizer), then one-token words; row i varies its words with i.
    texts = [tok.bos_token + "".join(" " + words[(i + k) % len(words)] for k in range(n - 1)) for i, n in enumerate(lengths)]
    assert [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts] == lengths
    return texts


def _steered_cells(model, hooks, texts, lengths, new_tokens, use_cache):
    """Generate under one steering hook wrapped by a watch; return (tokens, passes, the cells it changed).

    Raises AssertionError if a column is steered in one pass and not in another that recomputes it.
    """
    name, steer = hooks[0]
    n = max(lengths)
    seen: dict[Cell, set[bool]] = {}
    passes = 0

    def watch(x, hook):
        nonlocal passes
        out = steer(x, hook)
        changed = (out != x).any(-1)  # [batch, pos]
        if x.shape[1] == n + passes:  # the prompt pass, or any pass without the cache: columns 0 … n+p−1
            columns = range(x.shape[1])
        else:  # a cached decode step: only the newest column
            assert use_cache and passes >= 1 and x.shape[1] == 1, (use_cache, passes, x.shape)
            columns = range(n + passes - 1, n + passes)
        for row, length in enumerate(lengths):
            for j, col in enumerate(columns):
                if col >= n - length:  # padding columns are masked: never read, so not part of the policy
                    seen.setdefault((row, col), set()).add(bool(changed[row, j]))
        passes += 1
        return out

    with model.hooks(fwd_hooks=[(name, watch)]):
        tokens = generate_tokens(model, texts, new_tokens, use_cache=use_cache)
    inconsistent = {cell: s for cell, s in seen.items() if len(s) != 1}
    assert not inconsistent, f"steered in some passes and not in others: {inconsistent}"
    return tokens, passes, {cell for cell, s in seen.items() if s == {True}}


def _specified_cells(policy: str, lengths: list[int], passes: int) -> set[Cell]:
    n = max(lengths)
    prompt = {(r, c) for r, length in enumerate(lengths) for c in range(n - length, n)}
    # The last generated token is never fed back, so passes p = 1 … passes−1 each add column n+p−1.
    generated = {(r, c) for r in range(len(lengths)) for c in range(n, n + passes - 1)}
    return {"all": prompt | generated, "prompt": prompt, "generated": generated}[policy]


@settings(max_examples=20, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, MAX_PROMPT), min_size=1, max_size=3), new_tokens=st.integers(1, 4))
def test_each_policy_steers_its_specified_positions_with_and_without_the_cache(tiny_bridge, words, lengths, new_tokens):
    g = torch.Generator().manual_seed(0)
    sv = SafetyVector(torch.randn(tiny_bridge.cfg.n_layers, tiny_bridge.cfg.d_model, generator=g) * 3)
    texts = _texts(tiny_bridge.tokenizer, words, lengths)
    assert tokenize_left_padded(tiny_bridge.tokenizer, texts)["input_ids"].shape[1] == max(lengths)
    for policy in POSITIONS:
        hooks = safety_hooks(sv, alpha=1.0, layers=[0], site="resid_post", formula="add", positions=policy)
        cached, cached_passes, cached_cells = _steered_cells(tiny_bridge, hooks, texts, lengths, new_tokens, True)
        plain, plain_passes, plain_cells = _steered_cells(tiny_bridge, hooks, texts, lengths, new_tokens, False)
        assert cached == plain, f"{policy}: greedy tokens differ with and without the cache"
        assert cached_passes == plain_passes
        expected = _specified_cells(policy, lengths, cached_passes)
        assert cached_cells == expected, f"{policy}, cache: wrong cells {sorted(cached_cells ^ expected)}"
        assert plain_cells == expected, f"{policy}, no cache: wrong cells {sorted(plain_cells ^ expected)}"


def test_generated_mask_labels_full_and_cached_passes():
    assert not generated_mask(5).any()  # plain forward: all prompt
    with prompt_length(4):
        assert generated_mask(4).tolist() == [False] * 4
        assert generated_mask(6).tolist() == [False] * 4 + [True] * 2
        assert generated_mask(1).tolist() == [True]


def test_generated_mask_counts_passes_so_a_one_token_prompt_is_told_from_its_decode_steps():
    with prompt_length(1) as state:
        state.start_pass()
        assert generated_mask(1).tolist() == [False]  # pass 0: the one-token prompt
        state.start_pass()
        assert generated_mask(1).tolist() == [True]  # pass 1, cached: the first generated token
        assert generated_mask(2).tolist() == [False, True]  # pass 1 without the cache
