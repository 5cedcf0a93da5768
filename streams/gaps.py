"""No skipped offsets: a role's check that it saw every record of the partitions it owns.

Why a stream processor needs this: Faust 0.15's rebalance recovery resumes the stream
partitions, *awaits* the seek to the committed offsets, and only then empties the streams'
queues. Records fetched during that await are dropped from the queue of a role that was
still busy (first seen with the inference agent), their re-fetched copies are discarded
as already read, and the next commit moves past them: after a kill -9 of a stream worker,
14-31 of 120 turns got no reply. A seek-first reordering of Faust's recovery fixed that
but made a restarted consolidator miss records (see the issue-7 notes), so the check sits
in our code, where it also catches any other way a record could be skipped.

The Faust roles use it: history and consolidator. The inference agent no longer runs on
Faust (streams/agent_consumer.py: a plain aiokafka consumer, whose positions have no such
recovery step), so it has no check.

:class:`OffsetGuard` knows, for each owned partition, the next offset the role has to
see: the group's committed offset when the partition was assigned (taken before Faust
resumes the partitions, so nothing has moved it yet), then one past every offset seen.
A record beyond that means the ones in between were skipped: the role reads them back
from the topic and handles them first, before its own offset is acked. Offsets of
``somna.interactions`` are contiguous (no compaction, no transactional producers), so a
jump is never legitimate there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams import metrics
from streams.partition_reader import PartitionReader

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 15.0  # seconds; the rebalance waits for it


class OffsetGuard:
    """The next expected offset of each owned partition of one topic."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._next: dict[int, int] = {}

    def reset(self, next_offsets: dict[int, int]) -> None:
        """A new assignment: ``next_offsets`` maps each owned partition to the offset the
        group resumes from; partitions not in it are not checked until first seen."""
        self._next = dict(next_offsets)

    def expected(self, partition: int) -> int | None:
        return self._next.get(partition)

    def skipped(self, partition: int, offset: int) -> tuple[int, int] | None:
        """Record that ``offset`` was taken; the range ``[start, offset)`` if records
        before it were skipped. A redelivery (an offset already seen) is not a gap."""
        expected = self._next.get(partition)
        self._next[partition] = offset + 1 if expected is None else max(expected, offset + 1)
        if expected is not None and offset > expected:
            return expected, offset
        return None


async def resume_offsets(
    bootstrap: str, group_id: str, tps: Iterable[TopicPartition]
) -> dict[TopicPartition, int]:
    """Where ``group_id`` resumes each partition: its committed offset, or the log start
    where it has none (the workers consume from the earliest offset)."""
    tps = sorted(set(tps))
    if not tps:
        return {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group_id, partitions=tps)
    finally:
        await admin.close()
    out = {tp: meta.offset for tp, meta in committed.items() if meta.offset >= 0}
    fresh = [tp for tp in tps if tp not in out]
    if fresh:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
        await consumer.start()
        try:
            out.update(await consumer.beginning_offsets(fresh))
        finally:
            await consumer.stop()
    return out


class SkipCheck:
    """The skipped-offsets check of a worker's roles: after every rebalance of ``app``'s
    group, one query of its committed offsets resets the guards of every role (each role
    sees its own records, so each keeps its own guards), and one reader reads back.

    Faust sends ``on_rebalance_complete`` after the assignment and the table restore and
    before it resumes the stream partitions, so the committed offsets read then are the
    ones the streams are about to resume from."""

    def __init__(self, app: faust.App, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.reader = PartitionReader(bootstrap)
        self._roles: list[RoleCheck] = []

        @app.on_rebalance_complete.connect
        async def expect_committed(sender: object, **kwargs: object) -> None:
            topics = {topic for role in self._roles for topic in role.guards}
            owned = [
                TopicPartition(tp.topic, tp.partition)
                for tp in app.consumer.assignment()
                if tp.topic in topics
            ]
            offsets = await self._committed(app.conf.id, owned)
            for role in self._roles:
                role.reset(offsets)

    def role(self, name: str, topics: Iterable[str]) -> RoleCheck:
        """The check of one role, over the topics it consumes."""
        check = RoleCheck(name, topics, self.reader)
        self._roles.append(check)
        return check

    async def _committed(
        self, group_id: str, owned: list[TopicPartition]
    ) -> dict[TopicPartition, int]:
        try:
            return await asyncio.wait_for(
                resume_offsets(self.bootstrap, group_id, owned), QUERY_TIMEOUT
            )
        except Exception as e:  # noqa: BLE001 (never fail a rebalance over a safety check)
            # The broker is down during the rebalance: check from each first record on.
            log.warning("committed offsets not available (%s): gaps checked from each "
                        "partition's first record on", e)  # fmt: skip
            return {}


class RoleCheck:
    """One role's :class:`OffsetGuard` per topic it consumes (see :class:`SkipCheck`)."""

    def __init__(self, role: str, topics: Iterable[str], reader: PartitionReader) -> None:
        self.role = role
        self.guards = {topic: OffsetGuard(topic) for topic in topics}
        self.reader = reader

    def reset(self, offsets: dict[TopicPartition, int]) -> None:
        for topic, guard in self.guards.items():
            guard.reset({tp.partition: o for tp, o in offsets.items() if tp.topic == topic})

    async def skipped(self, topic: str, partition: int, offset: int) -> list[ConsumerRecord]:
        """Take ``offset``; the records before it that were skipped, read back (usually
        none). Handle them first, in order, then the record at ``offset``."""
        span = self.guards[topic].skipped(partition, offset)
        if span is None:
            return []
        start, end = span
        log.warning(
            "%s: %s[%d] offsets %d..%d were skipped by the consumer: read back",
            self.role, topic, partition, start, end - 1,
        )  # fmt: skip
        metrics.READ_BACK.labels(role=self.role, topic=topic).inc(end - start)
        return await self.reader.records(topic, partition, start, end)
