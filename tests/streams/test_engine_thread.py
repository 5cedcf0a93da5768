"""The agent's engine thread: one call at a time, most urgent first (streams/agent.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from streams.agent import EngineThread, Priority


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
