"""Batches overlap in the agent (streams/agent.py): ``handle`` returns once a batch's calls
are queued, a question of the next batch does not wait for the facts queued before it,
and a scope's turns are still answered in order."""

from __future__ import annotations

import asyncio
import threading
import time

from aiokafka import ConsumerRecord

from infra.settings import Settings
from infra.topics import INTERACTIONS
from streams.agent import Agent
from streams.dead_letters import DeadLetterPolicy
from streams.engine import ScopeSnapshot, Turn, make_reply
from streams.engine_thread import EngineThread
from streams.loader import ScopeLoader
from streams.records import Reply
from tests.streams.conftest import turn


class GatedEngine:
    """Scopes all in memory; a call with a turn of ``gated_scope`` waits for ``gate``."""

    uses_fast_weights = False
    blocking = True
    base_model_version = "test"

    def __init__(self, gated_scope: str) -> None:
        self.gated_scope = gated_scope
        self.gate = threading.Event()
        self.held = threading.Event()  # the gated call is on the engine thread
        self.woken: list[tuple[str, int]] = []  # (scope, offset), in the order woken

    def loaded(self, scope_id: str) -> bool:
        return True

    def install(self, snapshots: dict[str, ScopeSnapshot], busy=None) -> None:
        pass

    def answer(self, turns: list[Turn]) -> list[Reply]:
        if any(t.event.scope_id == self.gated_scope for t in turns):
            self.held.set()
            assert self.gate.wait(10)
        self.woken += [(t.event.scope_id, t.offset) for t in turns]
        return [make_reply(t, "ok", "test", None) for t in turns if t.wants_reply]


def _records(specs: list[tuple[str, str, int]]) -> list[ConsumerRecord]:
    out = []
    for scope, role, offset in specs:
        value = turn(scope, f"turn {offset}", role).to_bytes()
        out.append(
            ConsumerRecord(
                topic=INTERACTIONS,
                partition=0,
                offset=offset,
                timestamp=int(time.time() * 1000),
                timestamp_type=0,
                key=scope.encode(),
                value=value,
                checksum=None,
                serialized_key_size=len(scope),
                serialized_value_size=len(value),
                headers=(),
            )  # fmt: skip
        )
    return out


async def test_a_later_question_overtakes_queued_facts_and_each_scope_keeps_its_order() -> None:
    engine, thread, sent = GatedEngine("x"), EngineThread(), []

    async def send(topic: str, key: bytes | None, value: bytes) -> None:
        sent.append(Reply.model_validate_json(value))

    settings = Settings()
    dlq = DeadLetterPolicy(send, max_text_bytes=settings.max_text_bytes)
    agent = Agent(engine, thread, ScopeLoader(settings), dlq, send, settings)

    # Each handle returns once its calls are queued: x's fact holds the engine thread,
    # a's facts queue behind it.
    batches = [
        [("x", "system", 0)],
        [("a", "system", 1), ("a", "system", 2)],
        [("b", "user", 3), ("a", "user", 4)],
    ]
    finishing = []
    for batch in batches:
        done = await asyncio.wait_for(agent.handle({INTERACTIONS: _records(batch)}), 2)
        finishing.append(done)
        if batch[0][0] == "x":  # x's call holds the thread before the others queue
            assert await asyncio.to_thread(engine.held.wait, 5)
    await asyncio.sleep(0.1)  # the calls reach the engine thread's queue
    assert not any(f.done() for f in finishing)
    assert agent.busy("a") and agent.busy("b")
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(*finishing), 5)
    # b's question overtook a's queued facts; a's question came after a's facts.
    assert engine.woken == [("x", 0), ("b", 3), ("a", 1), ("a", 2), ("a", 4)]
    assert [r.scope_id for r in sent] == ["b", "a"]
    assert not agent.busy("a") and not agent.busy("b")
