"""The agent's engine thread (streams/engine_thread.py): one call at a time, most urgent
first, question calls queued together merged into one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest

from streams import engine_thread
from streams.engine import Turn, make_reply
from streams.engine_thread import EngineThread, Priority
from streams.records import Reply
from tests.streams.conftest import ROOT, turn


async def test_urgent_calls_overtake_queued_background_ones_and_order_holds_within() -> None:
    thread, ran = EngineThread(), []
    gate = threading.Event()
    busy = asyncio.ensure_future(thread.call(gate.wait, 5))  # holds the thread
    await asyncio.sleep(0.05)
    calls = [
        thread.call(ran.append, "fact 1", priority=Priority.BACKGROUND),
        thread.call(ran.append, "fact 2", priority=Priority.BACKGROUND),
        thread.call(ran.append, "question", priority=Priority.NORMAL),
        thread.call(ran.append, "held-back question", priority=Priority.URGENT),
    ]
    tasks = [asyncio.ensure_future(c) for c in calls]
    await asyncio.sleep(0.05)  # all queued behind the busy call
    gate.set()
    await asyncio.gather(busy, *tasks)
    assert ran == ["held-back question", "question", "fact 1", "fact 2"]


async def test_an_engine_error_reaches_its_caller_and_the_thread_goes_on() -> None:
    thread = EngineThread()

    def boom() -> None:
        raise ValueError("bad turn")

    with pytest.raises(ValueError, match="bad turn"):
        await thread.call(boom)
    assert await thread.call(sum, [1, 2]) == 3


class Answers:
    """An engine's ``answer`` that records each call's turns (by scope) and replies to
    every user turn; a call with a turn of ``hold`` waits for ``gate`` first."""

    def __init__(self, hold: str | None = None, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.hold, self.fail = hold, fail
        self.gate = threading.Event()

    def __call__(self, turns: list[Turn]) -> list[Reply]:
        scopes = [t.event.scope_id for t in turns]
        if self.hold in scopes:
            assert self.gate.wait(5)
        self.calls.append(scopes)
        if self.fail in scopes:
            raise ValueError(f"bad turn of {self.fail}")
        return [
            make_reply(t, f"re {t.event.scope_id}", "test", None) for t in turns if t.wants_reply
        ]


def _turns(scope: str, roles: tuple[str, ...] = ("system", "user")) -> list[Turn]:
    return [Turn(turn(scope, f"{role} {i}", role), 0, i, None) for i, role in enumerate(roles)]


async def _queued_behind_held(thread: EngineThread, answers: Answers, calls: list) -> list:
    """Runs ``calls`` (coroutines) queued behind a call of ``answers.hold``; their results."""
    held = asyncio.ensure_future(thread.answer(answers, _turns(answers.hold)))
    await asyncio.sleep(0.05)
    tasks = [asyncio.ensure_future(c) for c in calls]
    await asyncio.sleep(0.05)  # all queued behind the held call
    answers.gate.set()
    await held
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_question_calls_queued_together_are_answered_in_one_engine_call() -> None:
    thread, answers = EngineThread(), Answers(hold="h")
    a, b, c, facts = _turns("a"), _turns("b"), _turns("c"), _turns("f", ("system",))
    results = await _queued_behind_held(
        thread,
        answers,
        [
            thread.answer(answers, facts, Priority.BACKGROUND),
            thread.answer(answers, a, Priority.NORMAL),
            thread.answer(answers, b, Priority.URGENT),
            thread.call(len, "not an answer", priority=Priority.NORMAL),
            thread.answer(answers, c, Priority.NORMAL),
        ],
    )
    # One call for the questions queued together, most urgent first; a call queued between
    # them is not overtaken (c comes after it); the facts on their own, last.
    assert answers.calls == [["h", "h"], ["b", "b", "a", "a"], ["c", "c"], ["f"]]
    (fact_replies, _), (ra, t_a), (rb, t_b), n, (rc, _) = results
    assert fact_replies == [] and n == len("not an answer")
    for replies, turns in ((ra, a), (rb, b), (rc, c)):  # each caller gets its own replies
        assert [r.event_id for r in replies] == [turns[1].event.event_id]
    assert t_a == t_b  # one engine call, one start


async def test_a_merged_call_stops_at_the_turn_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_thread, "MAX_MERGED_TURNS", 4)
    thread, answers = EngineThread(), Answers(hold="h")
    calls = [thread.answer(answers, _turns(s), Priority.URGENT) for s in "abc"]
    await _queued_behind_held(thread, answers, calls)
    assert answers.calls == [["h", "h"], ["a", "a", "b", "b"], ["c", "c"]]


async def test_an_error_in_a_merged_call_reaches_each_of_its_callers() -> None:
    thread, answers = EngineThread(), Answers(hold="h", fail="b")
    calls = [thread.answer(answers, _turns(s), Priority.URGENT) for s in "ab"]
    results = await _queued_behind_held(thread, answers, calls)
    assert all(isinstance(r, ValueError) for r in results)
    assert (await thread.answer(answers, _turns("c")))[0][0].text == "re c"  # goes on


async def test_the_thread_runs_at_its_own_cpu_priority_and_goes_on_without_the_right() -> None:
    import os

    def nice_here() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = nice_here()
    if before == 19:
        pytest.skip("this process is at the lowest priority already")
    lower = EngineThread(nice=before + 1)  # raising a nice value needs no privilege
    assert await lower.call(nice_here) == before + 1
    assert nice_here() == before  # the caller's thread is left alone
    if os.geteuid() != 0:  # lowering it is refused without CAP_SYS_NICE: the thread goes on
        refused = EngineThread(nice=-20)
        assert await refused.call(nice_here) == before


def test_a_whole_process_can_run_at_the_agents_priority() -> None:
    # In a child process: the pytest process keeps its own priority.
    code = (
        "import os, threading, time\n"
        "from streams.engine_thread import set_process_nice\n"
        "def nice():\n"
        "    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())\n"
        "before = nice()\n"
        "got = []\n"
        "early = threading.Thread(target=lambda: (time.sleep(0.5), got.append(nice())))\n"
        "early.start()\n"
        "assert set_process_nice(min(19, before + 1))\n"
        "late = threading.Thread(target=lambda: got.append(nice()))\n"
        "late.start(); late.join(); early.join()\n"
        "print(before, nice(), *got)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    before, *after = (int(x) for x in out.stdout.split())
    # The caller, a thread already running and one started later: all moved.
    assert after == [min(19, before + 1)] * 3
