"""A batched ragged wake over scopes with different histories equals one wake per scope."""

from __future__ import annotations

import pytest
import torch

import model.hybrid
from model import HybridLM, MemoryState, render_turn
from model.exceptions import DuplicateEventError, EmptyChunkError, InputError
from model.tokenizer import ASSISTANT, EOT
from tests.model.test_generate_batch import TEXTS, scopes


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def assert_same_state(got: MemoryState, ref: MemoryState) -> None:
    assert got.pos == ref.pos
    assert got.pending == ref.pending and got.watermarks == ref.watermarks
    for a, b in zip(got.S, ref.S, strict=True):
        close(a, b)
    for a, b in zip(got.base_S, ref.base_S, strict=True):
        close(a, b)
    for a, b in zip(got.conv, ref.conv, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            close(a, b)
    for a, b in zip(got.kv, ref.kv, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a[0].shape == b[0].shape  # only the valid tokens, trimmed to window - 1
            close(a[0], b[0])
            close(a[1], b[1])


def rows_for(lm: HybridLM, states: list[MemoryState]) -> tuple[list[list[int]], list]:
    """Token counts from 1 to past twice the window; offsets recorded for some rows."""
    W = lm.config.window
    g = torch.Generator().manual_seed(3)
    lengths = [1, 2 * W + 5, 3, W, len(render_turn("user", TEXTS[0])), W - 1]
    tokens = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    tokens[4] = render_turn("user", TEXTS[0])
    offsets = []
    for i, s in enumerate(states):
        last = s.pending[0][-1].offset if s.pending[0] else s.watermarks[0]
        offsets.append(None if i % 3 == 2 else last + 1 + i)
    return tokens[: len(states)], offsets


@pytest.mark.parametrize("budget", ["one piece", "pieces"])
@pytest.mark.parametrize("which", ["random", "shipped"])
def test_batch_equals_one_wake_per_scope(which: str, budget: str, loud_lm, request, monkeypatch):
    lm = loud_lm if which == "random" else request.getfixturevalue("trained")
    if budget == "pieces":  # rows longer than the window go in several pieces
        monkeypatch.setattr(model.hybrid, "WAKE_BUDGET", 1)
    states = scopes(lm)
    tokens, offsets = rows_for(lm, states)
    before = [s.clone() for s in states]
    refs = [lm.wake(t, s, offset=o) for t, s, o in zip(tokens, states, offsets, strict=True)]
    logits, got = lm.wake_batch(tokens, states, offsets)
    assert logits.shape == (len(states), lm.config.vocab_size)
    for i, (ref_logits, ref) in enumerate(refs):
        close(logits[i], ref_logits[0, -1])
        assert_same_state(got[i], ref)
    # The given states are left alone.
    for s, b in zip(states, before, strict=True):
        assert_same_state(s, b)
    # What each scope says next is the same.
    stops = () if which == "random" else (EOT,)
    prompt = [ASSISTANT]
    expected = [lm.generate(prompt, ref, 16, stops) for _, ref in refs]
    assert [lm.generate(prompt, s, 16, stops) for s in got] == expected
    assert lm.generate_batch([prompt] * len(got), got, 16, stops) == expected


def test_one_row_and_a_row_in_a_batch_agree(loud_lm: HybridLM):
    states = scopes(loud_lm)
    tokens, offsets = rows_for(loud_lm, states)
    _, together = loud_lm.wake_batch(tokens, states, offsets)
    for t, s, o, g in zip(tokens, states, offsets, together, strict=True):
        _, (alone,) = loud_lm.wake_batch([t], [s], [o])
        assert_same_state(alone, g)


@pytest.mark.parametrize("which", ["random", "shipped"])
def test_rebuild_and_swap_in_batched_equal_one_scope_at_a_time(which: str, loud_lm, request):
    lm = loud_lm if which == "random" else request.getfixturevalue("trained")
    chunk = render_turn("system", TEXTS[2])
    slept = lm.sleep([chunk], lm.init_state(1), passes=2, watermarks=0)
    events = [(k, render_turn("user" if k % 2 else "system", TEXTS[k % 4])) for k in range(1, 8)]
    scopes_ = [
        (slept, 0, events),
        (lm.init_state(1), -1, events[:2]),
        (slept, 0, []),  # nothing after the watermark: the fast weights alone
        (slept.fast_weights(), 3, events),  # events at or below 3 are dropped
    ]
    for got, args in zip(lm.rebuild_states(scopes_), scopes_, strict=True):
        assert_same_state(got, lm.rebuild_state(*args))
    # swap_in of several live scopes at once.
    live = []
    for n in (1, 4, 7):
        s = lm.init_state(1)
        for o, t in events[:n]:
            _, s = lm.wake(t, s, offset=o)
        live.append(s)
    swaps = [(live[0], slept, 0), (live[1], slept, 2), (live[2], slept, 7)]
    for got, args in zip(lm.swap_in_batch(swaps), swaps, strict=True):
        assert_same_state(got, lm.swap_in(*args))
    assert lm.rebuild_states([]) == [] and lm.swap_in_batch([]) == []


def test_bad_rows_raise_before_anything_is_woken(tiny_lm: HybridLM):
    a = tiny_lm.wake([1, 2], tiny_lm.init_state(1), offset=4)[1]
    b = tiny_lm.init_state(1)
    with pytest.raises(DuplicateEventError, match="offset 4"):
        tiny_lm.wake_batch([[3], [3]], [b, a], [0, 4])
    assert a.pos == 2 and [e.offset for e in a.pending_events] == [4]
    with pytest.raises(InputError, match="token rows"):
        tiny_lm.wake_batch([[3]], [a, b])
    with pytest.raises(InputError, match="B=2|batch 2|2 scopes"):
        tiny_lm.wake_batch([[3]], [tiny_lm.init_state(2)])
    with pytest.raises(InputError, match="one sequence"):
        tiny_lm.wake_batch([[[3], [4]]], [b])
    with pytest.raises(EmptyChunkError):
        tiny_lm.wake_batch([[3], []], [a, b])
    logits, states = tiny_lm.wake_batch([], [])
    assert logits.shape == (0, tiny_lm.config.vocab_size) and states == []
