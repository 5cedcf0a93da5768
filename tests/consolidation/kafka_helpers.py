"""Small aiokafka helpers of the consolidation tests: send events, wait for publishes."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.topics import FAST_WEIGHTS, INTERACTIONS, SLEEP_JOBS
from streams.records import FastWeightsPublished, Interaction, SleepJob, decode


async def send_turns(bootstrap: str, scope: str, texts: list[str]) -> list[tuple[int, int, str]]:
    """Produce interactions of ``scope``; returns their (partition, offset, event_id)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        out = []
        for i, text in enumerate(texts):
            ev = Interaction(event_id=f"{scope}-{i}-{time.time_ns()}", scope_id=scope,
                             session_id="s1", role="user", text=text, ts=time.time())  # fmt: skip
            md = await producer.send_and_wait(INTERACTIONS, key=scope.encode(), value=ev.to_bytes())
            out.append((md.partition, md.offset, ev.event_id))
        return out
    finally:
        await producer.stop()


async def send_job(bootstrap: str, job: SleepJob) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        md = await producer.send_and_wait(
            SLEEP_JOBS, key=job.scope_id.encode(), value=job.to_bytes()
        )
        return md.partition
    finally:
        await producer.stop()


async def partitions_of(bootstrap: str, topic: str) -> set[int]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        return set(await producer.partitions_for(topic))
    finally:
        await producer.stop()


class PublishWatcher:
    """Reads somna.fast-weights from its current end; ``wait(scope)`` -> the next publish."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
        )
        self.seen: list[FastWeightsPublished] = []

    async def start(self) -> PublishWatcher:
        await self.consumer.start()
        parts = await partitions_of(self.bootstrap, FAST_WEIGHTS)
        tps = [TopicPartition(FAST_WEIGHTS, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        return self

    async def wait(
        self, scope: str, *, timeout: float = 180.0, min_watermark: int = -1
    ) -> FastWeightsPublished:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.seen:
                if p.scope_id == scope and p.watermark >= min_watermark:
                    self.seen.remove(p)
                    return p
            batch = await self.consumer.getmany(timeout_ms=500)
            for records in batch.values():
                self.seen += [decode(r.value, FastWeightsPublished) for r in records]
        raise TimeoutError(f"no FastWeightsPublished for {scope} within {timeout}s")

    async def stop(self) -> None:
        await self.consumer.stop()


async def wait_for(predicate, timeout: float = 120.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        await asyncio.sleep(interval)
    raise TimeoutError("condition not met in time")
