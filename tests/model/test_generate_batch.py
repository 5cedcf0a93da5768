"""Batched greedy decoding over scopes with different histories equals one scope at a time."""

from __future__ import annotations

import pytest
import torch

from model import HybridLM, MemoryState, render_turn
from model.exceptions import InputError
from model.tokenizer import ASSISTANT, EOT

TEXTS = [
    "alice reports to bob.",
    "the blue box is in the kitchen.",
    "carol lives in oslo. dave lives in rome.",
    "who does alice report to?",
]


def greedy_by_wake(
    lm: HybridLM, prompt: list[int], state: MemoryState, n: int, stops: tuple[int, ...]
) -> list[int]:
    """The reference: wake the prompt, then one token at a time, B = 1."""
    logits, state = lm.wake(prompt, state.clone())
    out: list[int] = []
    for _ in range(n):
        nxt = int(logits[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
        logits, state = lm.wake([nxt], state)
    return out


def scopes(lm: HybridLM) -> list[MemoryState]:
    """States that differ in position, KV length, conv cache and S."""
    W = lm.config.window
    empty = lm.init_state(1)  # no KV, no conv cache, pos 0
    one = lm.wake([ASSISTANT], lm.init_state(1))[1]  # a 1-token KV
    short = lm.init_state(1)
    for off, text in enumerate(TEXTS[:2]):
        _, short = lm.wake(render_turn("user", text), short, offset=off)
    long = lm.init_state(1)  # past the window: the KV is full (W - 1) and pos >> W
    for off in range(4):
        _, long = lm.wake(render_turn("system", " ".join(TEXTS) * 2), long, offset=off)
    assert long.pos > 2 * W and long.kv[-1][0].shape[2] == W - 1
    slept = lm.sleep([render_turn("system", TEXTS[2])], lm.init_state(1), passes=2, watermarks=0)
    rebuilt = lm.rebuild_state(slept, 0, [(1, render_turn("user", TEXTS[3]))])  # fast weights
    bare = lm.rebuild_state(slept, 0)  # fast weights, no KV, pos 0
    return [empty, short, long, one, rebuilt, bare]


def prompts_for(n: int) -> list[list[int]]:
    """Mostly ``<assistant>``; some longer (a redelivered turn asked again)."""
    longer = [render_turn("user", TEXTS[3]) + [ASSISTANT], render_turn("user", "hi") + [ASSISTANT]]
    return [longer[i // 2 % 2] if i % 2 else [ASSISTANT] for i in range(n)]


@pytest.mark.parametrize("which", ["random", "shipped"])
def test_batch_equals_one_scope_at_a_time(which: str, loud_lm: HybridLM, request):
    lm = loud_lm if which == "random" else request.getfixturevalue("trained")
    states = scopes(lm)
    prompts = prompts_for(len(states))
    stops = () if which == "random" else (EOT,)  # random init: all rows run to the end
    expected = [greedy_by_wake(lm, p, s, 20, stops) for p, s in zip(prompts, states, strict=True)]
    before = [s.clone() for s in states]
    got = lm.generate_batch(prompts, states, max_new_tokens=20, stop_ids=stops)
    assert got == expected
    assert got == [lm.generate(p, s, 20, stops) for p, s in zip(prompts, states, strict=True)]
    if which == "shipped":
        assert any(0 < len(r) < 20 for r in got)  # someone stopped early on EOT
    # Replies are not remembered: the states are as they were.
    for s, b in zip(states, before, strict=True):
        assert s.pos == b.pos and all(torch.equal(x, y) for x, y in zip(s.S, b.S, strict=True))
        for c, d in zip(s.kv, b.kv, strict=True):
            assert (c is None and d is None) or all(map(torch.equal, c, d))
        assert all(
            map(
                torch.equal,
                [c for c in s.conv if c is not None],
                [d for d in b.conv if d is not None],
            )
        )


def test_a_row_that_stops_early_does_not_change_the_others(loud_lm: HybridLM):
    tiny_lm = loud_lm
    states = scopes(tiny_lm)
    prompts = prompts_for(len(states))
    full = tiny_lm.generate_batch(prompts, states, max_new_tokens=12, stop_ids=())
    # Stop on row 2's 4th token: row 2 leaves the batch after 3 tokens; other rows stop
    # where that token first shows up in theirs, and are otherwise unchanged.
    stop = full[2][3]
    got = tiny_lm.generate_batch(prompts, states, max_new_tokens=12, stop_ids=(stop,))
    for reply, ref in zip(got, full, strict=True):
        cut = ref.index(stop) if stop in ref else len(ref)
        assert reply == ref[:cut]
    assert len(got[2]) <= 3
    # One row alone gives what it gave in the batch.
    for i in (0, 2, 5):
        alone = tiny_lm.generate_batch([prompts[i]], [states[i]], 12, stop_ids=(stop,))
        assert alone == [got[i]]


def test_replies_longer_than_the_cache_capacity(loud_lm: HybridLM):
    # 90 steps: the KV buffers fill their spare columns and are compacted mid-decode.
    states = scopes(loud_lm)[:3]
    prompts = prompts_for(3)
    expected = [greedy_by_wake(loud_lm, p, s, 90, ()) for p, s in zip(prompts, states, strict=True)]
    assert loud_lm.generate_batch(prompts, states, max_new_tokens=90, stop_ids=()) == expected


def test_bad_batches_raise(tiny_lm: HybridLM):
    with pytest.raises(InputError, match="prompts for"):
        tiny_lm.generate_batch([[ASSISTANT]], [])
    with pytest.raises(InputError, match="B=2|batch 2|2 scopes"):
        tiny_lm.generate_batch([[ASSISTANT]], [tiny_lm.init_state(2)])
    assert tiny_lm.generate_batch([], []) == []
    assert tiny_lm.generate_batch([[ASSISTANT]], [None], max_new_tokens=0) == [[]]
