"""The agent's own consumer group on the real broker: co-partitioned members, commits.

Two members of one group split the partitions so that partition p of interactions, fast
weights and retractions is one member's: a scope's fast weights and retractions reach the
member that answers its turns. Offsets are committed once the replies are acked.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from infra.settings import Settings
from infra.topics import FAST_WEIGHTS, INTERACTIONS, REPLIES, RETRACTIONS
from streams.agent_consumer import TOPICS, AgentConsumer, Batch, agent_group_id

from .conftest import PARTITIONS, produce, unique

pytestmark = [pytest.mark.kafka]


class Recorder:
    """A handler that remembers what it got and replies to each turn."""

    def __init__(self, name: str, consumer: AgentConsumer) -> None:
        self.name = name
        self.consumer = consumer
        self.seen: dict[str, set[bytes]] = {t: set() for t in TOPICS}
        self.owned: set[int] = set()

    async def handle(self, batch: Batch) -> None:
        for topic, records in batch.items():
            for r in records:
                self.seen[topic].add(r.key)
                if topic == INTERACTIONS:
                    await self.consumer.send(REPLIES, r.key, b"reply to " + r.value)

    async def assigned(self, partitions: set[int]) -> None:
        self.owned = partitions


async def _start_at_end(bootstrap: str, group: str) -> None:
    """The new group starts after what other tests left on the topics."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(t, p) for t in TOPICS for p in range(PARTITIONS)]
        c.assign(tps)
        await c.commit(await c.end_offsets(tps))
    finally:
        await c.stop()


async def _committed(bootstrap: str, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        got = await admin.list_consumer_group_offsets(group)
        return {tp: meta.offset for tp, meta in got.items()}
    finally:
        await admin.close()


async def _until(pred, timeout: float = 120.0) -> None:
    for _ in range(int(timeout / 0.2)):
        if pred():
            return
        await asyncio.sleep(0.2)
    raise AssertionError("condition never held")


async def test_two_members_split_co_partitioned_and_commit_what_they_answered(kafka_bootstrap):
    settings = Settings(kafka_bootstrap=kafka_bootstrap, partitions=PARTITIONS)
    group = agent_group_id(unique("g"))
    await _start_at_end(kafka_bootstrap, group)
    members = []
    for name in ("a", "b"):
        consumer = AgentConsumer(settings, group)
        members.append(Recorder(name, consumer))
    try:
        for m in members:
            await m.consumer.start(m)
        everything = {TopicPartition(t, p) for t in TOPICS for p in range(PARTITIONS)}

        def split() -> bool:
            owned = [m.consumer.consumer.assignment() for m in members]
            # aiokafka sets the assignment before it calls the listener: wait for both.
            told = all(
                m.owned == {tp.partition for tp in a if tp.topic == INTERACTIONS}
                for m, a in zip(members, owned, strict=True)
            )
            return all(owned) and set().union(*owned) == everything and told

        await _until(split)
        for m in members:
            by_topic = {
                t: {tp.partition for tp in m.consumer.consumer.assignment() if tp.topic == t}
                for t in TOPICS
            }
            # Range assignment: the same partitions of each of the three topics.
            assert by_topic[INTERACTIONS] == by_topic[FAST_WEIGHTS] == by_topic[RETRACTIONS]
            assert m.owned == by_topic[INTERACTIONS]

        scopes = [unique(f"s{i}").encode() for i in range(12)]  # spread over the partitions
        for topic in TOPICS:
            await produce(kafka_bootstrap, topic, [(s, b"{}") for s in scopes])

        def all_seen() -> bool:
            return all(set(scopes) <= set().union(*(m.seen[t] for m in members)) for t in TOPICS)

        await _until(all_seen)
        for m in members:
            mine = m.seen[INTERACTIONS] & set(scopes)
            assert mine, f"member {m.name} answered no scope"
            # Its scopes' fast weights and retractions came to it, and only those.
            assert m.seen[FAST_WEIGHTS] & set(scopes) == mine
            assert m.seen[RETRACTIONS] & set(scopes) == mine

        for m in members:
            await m.consumer.stop()
        committed = await _committed(kafka_bootstrap, group)
        probe = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None)
        await probe.start()
        try:
            ends = await probe.end_offsets(list(everything))
        finally:
            await probe.stop()
        # Stopped members commit everything they answered (nothing else was produced).
        assert {tp: committed.get(tp) for tp in everything} == ends
    finally:
        for m in members:
            if m.consumer.consumer is not None and not m.consumer._stopping:
                await m.consumer.stop()
