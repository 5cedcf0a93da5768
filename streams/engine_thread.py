"""The agent's engine thread: engine calls one at a time, most urgent first.

All model work of the agent runs on one thread (``streams/agent.py``): torch never blocks
the event loop, and a scope's memory is only ever touched by that thread. Calls run most
urgent first (:class:`Priority`), in arrival order within a priority.

Questions waiting together are answered together. When the thread takes a question call
(``answer`` at URGENT or NORMAL), it also takes every question call queued right behind
it and runs them as one ``Engine.answer``: the engine batches across scopes (one wake per
round, one decode for all replies), so N waiting calls cost about one, not N in a row.
Right after a burst of publishes or a cold start, 20 calls of 1-7 questions each queued
up and the last one waited ~3 s (``somna bench swap``'s warm-up, 2-core Intel box).
Merging is safe because the agent never queues two calls with a turn of the same scope (a
scope's next turns wait for its call in progress), so each scope's turns keep their order.
Fact calls (BACKGROUND) are never merged: they are kept small on purpose, so that a
question queued behind one waits little.

Calls that apply fresh fast weights merge too. They were kept apart while a swap re-woke
the hundreds of tokens after its new watermark on the engine thread; since pre-waking
(consolidation/prewake.py) applying one takes ~1 ms, and unmerged, the questions of a burst's
probed scopes answered one 32-token reply after another: in `somna bench swap` the 4th of
a row waited 200 ms of engine time for the 3 before it (the agent's side up to 272 ms;
merged, at most 183 ms in the next run; 2-core Intel box).
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from streams.engine import Turn
from streams.records import Reply

T = TypeVar("T")
log = logging.getLogger(__name__)

# The most turns one merged answer call takes (one fetched batch: MAX_RECORDS): a larger
# call would hold the thread longer than the questions behind it gain.
MAX_MERGED_TURNS = 128


class Priority(enum.IntEnum):
    """Engine calls run most urgent first, in arrival order within a priority."""

    URGENT = 0  # questions that already waited for their scope's swap or load
    NORMAL = 1
    BACKGROUND = 2  # facts nobody waits for, and cold loads queued behind them


@dataclass
class _Call:
    fn: Callable[..., Any]
    args: tuple
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    turns: list[Turn] | None = None  # an answer call: may take those queued behind it


class EngineThread:
    """Runs engine calls one at a time on a thread of their own (see the module doc)."""

    def __init__(self, nice: int = 0) -> None:
        self._nice = nice  # the thread's CPU priority (settings.agent_nice)
        self._heap: list[tuple[int, int, _Call]] = []
        self._ready = threading.Condition()
        self._arrival = itertools.count()
        # A daemon: it ends with the worker's process; queued calls die with their loop.
        self._thread = threading.Thread(target=self._work, name="somna-engine", daemon=True)
        self._thread.start()

    async def call(
        self, fn: Callable[..., T], *args: object, priority: Priority = Priority.NORMAL
    ) -> T:
        return await self._submit(_Call(fn, args, *self._future()), priority)

    async def answer(
        self,
        answer: Callable[[list[Turn]], list[Reply]],
        turns: list[Turn],
        priority: Priority = Priority.NORMAL,
    ) -> tuple[list[Reply], float]:
        """``answer(turns)`` on the thread, merged with the question calls queued with it
        (URGENT and NORMAL); returns the replies to ``turns`` and when the call started.
        An error of a merged call reaches every caller in it."""
        call = _Call(answer, (), *self._future(), turns=turns)
        return await self._submit(call, priority)

    def _future(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Future]:
        loop = asyncio.get_running_loop()
        return loop, loop.create_future()

    async def _submit(self, call: _Call, priority: Priority) -> Any:
        with self._ready:
            heapq.heappush(self._heap, (int(priority), next(self._arrival), call))
            self._ready.notify()
        return await call.done

    def _take(self) -> list[_Call]:
        """The next call, and the question calls merged into it."""
        with self._ready:
            while not self._heap:
                self._ready.wait()
            priority, _, first = heapq.heappop(self._heap)
            taken = [first]
            if first.turns is None or priority > Priority.NORMAL:
                return taken
            n = len(first.turns)
            while self._heap:
                p, _, nxt = self._heap[0]
                if p > Priority.NORMAL or nxt.turns is None or nxt.fn != first.fn:
                    break
                if n + len(nxt.turns) > MAX_MERGED_TURNS:
                    break
                heapq.heappop(self._heap)
                taken.append(nxt)
                n += len(nxt.turns)
            return taken

    def _work(self) -> None:
        _set_nice(self._nice)
        while True:
            calls = self._take()
            try:
                results = _run(calls)
            except BaseException as e:  # noqa: BLE001 (handed to the callers)
                for c in calls:
                    c.loop.call_soon_threadsafe(_settle, c.done, None, e)
            else:
                for c, result in zip(calls, results, strict=True):
                    c.loop.call_soon_threadsafe(_settle, c.done, result, None)


def _set_nice(nice: int) -> None:
    """The calling thread's nice value (Linux: per thread)."""
    if nice:
        _renice([threading.get_native_id()], nice, "engine thread")


def set_process_nice(nice: int) -> bool:
    """Every thread of this process at ``nice``; threads started later inherit it from
    the caller's. Linux keeps a nice value per thread, so each is set (``/proc/self/task``).
    False when refused or not supported."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [threading.get_native_id()]
    return _renice(tids, nice, "the agent's worker")


def _renice(tids: list[int], nice: int, what: str) -> bool:
    """Best effort: lowering a nice value needs CAP_SYS_NICE, and an agent without it
    still answers, at the priority it was given."""
    try:
        for tid in tids:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (OSError, AttributeError) as e:
        log.warning("%s keeps its CPU priority (nice %d refused: %s)", what, nice, e)
        return False
    return True


def _run(calls: list[_Call]) -> list[Any]:
    first = calls[0]
    if first.turns is None:
        return [first.fn(*first.args)]
    started = time.time()
    replies = first.fn([t for c in calls for t in c.turns])
    # Hand each caller the replies to its own turns.
    caller = {t.event.event_id: i for i, c in enumerate(calls) for t in c.turns}
    out: list[list[Reply]] = [[] for _ in calls]
    for reply in replies:
        out[caller[reply.event_id]].append(reply)
    return [(r, started) for r in out]


def _settle(done: asyncio.Future, result: object, error: BaseException | None) -> None:
    if done.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)
