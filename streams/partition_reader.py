"""Reading a range of one partition back from Kafka, outside the consumer group.

The agent rebuilds a cold scope from the events after its watermark, and every role
re-reads records its consumer skipped (``streams/gaps.py``): both are "the records of
partition p with start <= offset < end", read with a plain consumer that has no group,
so it never moves the group's offsets or takes part in its rebalances.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


class PartitionReader:
    """One unassigned consumer, started on first use; reads run one at a time."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def records(
        self,
        topic: str,
        partition: int,
        start: int,
        end: int | None,
        *,
        keys: set[str] | None = None,
    ) -> list[ConsumerRecord]:
        """The records with ``start <= offset < end`` (None: the end now), only those keyed
        by one of ``keys`` when given (the others are never kept in memory)."""
        tp = TopicPartition(topic, partition)
        out: list[ConsumerRecord] = []
        async with self._lock:
            consumer = await self._get_consumer()
            consumer.assign([tp])
            if end is None:
                end = (await consumer.end_offsets([tp]))[tp]
            consumer.seek(tp, start)
            while await consumer.position(tp) < end:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                for record in batch.get(tp, []):
                    if record.offset >= end:
                        break
                    if keys is not None:
                        key = record.key.decode("utf-8", "replace") if record.key else None
                        if key not in keys:
                            continue
                    out.append(record)
        return out

    async def _get_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",  # below the log start (retention): from there
            )
            await self._consumer.start()
        return self._consumer

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
