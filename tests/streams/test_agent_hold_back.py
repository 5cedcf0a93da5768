"""Which turns of a batch the agent holds back (streams/agent.py ``hold_back``)."""

from __future__ import annotations

import time

from streams.agent import hold_back
from streams.engine import Turn
from tests.streams.conftest import turn


def _turns(*specs: tuple[str, str]) -> list[Turn]:
    return [
        Turn(turn(scope, "hi", role), 0, i, time.time()) for i, (scope, role) in enumerate(specs)
    ]


def test_a_question_waits_for_its_scopes_swap_and_cold_scopes_load() -> None:
    turns = _turns(("a", "user"), ("b", "user"), ("c", "user"))
    cold, swapping = hold_back(turns, loaded=lambda s: s != "c", swap_pending=lambda s: s == "a")
    assert (cold, swapping) == ({"c"}, {"a"})


def test_facts_alone_never_wait_for_a_swap() -> None:
    # System turns want no reply: holding them back for the fetch held the whole batch
    # (and every turn fetched after it) for nothing; they are re-woken over the new S.
    turns = _turns(("a", "system"), ("a", "system"), ("b", "system"), ("b", "user"))
    cold, swapping = hold_back(turns, loaded=lambda s: True, swap_pending=lambda s: True)
    assert (cold, swapping) == (set(), {"b"})


def test_an_old_turn_nobody_waits_for_does_not_wait_either() -> None:
    old = Turn(turn("a", "hi"), 0, 0, time.time() - 3600)
    assert hold_back([old], loaded=lambda s: True, swap_pending=lambda s: True) == (set(), set())
