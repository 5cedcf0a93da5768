"""A scope's remembered turns in an offset range: the input of every sleep.

Memory content (contract 2) is a scope's interaction events, rendered with
``model.tokenizer.render_turn``, in offset order. They come from the Parquet history
(``streams.history.read_history``) and, for the tail that the history aggregator has not
flushed yet, from ``somna.interactions`` itself, read by offset. Retracted events are left
out wherever they come from (the Kafka log still holds their text).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from infra.topics import INTERACTIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    event_id: str
    role: str
    text: str
    offset: int
    partition: int

    def tokens(self) -> list[int]:
        from model.tokenizer import render_turn

        return render_turn(self.role, self.text)


def from_history(history_dir: Path, scope_id: str, lo: int, hi: int) -> list[Turn]:
    """Interactions of ``scope_id`` with ``lo <= offset <= hi`` from the Parquet history."""
    from streams.history import read_history

    table = read_history(history_dir, scope_id)
    out = []
    for row in table.to_pylist():
        if row["kind"] == "interaction" and row["source_topic"] == INTERACTIONS:
            if lo <= row["offset"] <= hi:
                out.append(
                    Turn(row["event_id"], row["role"], row["text"], row["offset"], row["partition"])
                )
    return sorted(out, key=lambda t: t.offset)


class TopicReader:
    """Reads ``somna.interactions`` by offset with one consumer (no group), reused across
    jobs: starting a consumer per job would cost more than reading the events."""

    def __init__(self, bootstrap: str, *, timeout_s: float = 10.0) -> None:
        self.bootstrap = bootstrap
        self.timeout_s = timeout_s
        self._consumer = None
        self._lock = asyncio.Lock()  # one assignment at a time: jobs are planned concurrently

    async def start(self) -> TopicReader:
        from aiokafka import AIOKafkaConsumer

        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None
        )
        await self._consumer.start()
        return self

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def read(self, scope_id: str, partition: int, lo: int, hi: int) -> list[Turn]:
        """Interactions of ``scope_id`` at ``lo <= offset <= hi`` of the partition."""
        async with self._lock:
            by_scope, _ = await self._read({scope_id}, partition, lo, hi)
        return by_scope.get(scope_id, [])

    async def read_tail(
        self, scopes: set[str], partition: int, lo: int
    ) -> tuple[dict[str, list[Turn]], int]:
        """Interactions of ``scopes`` from offset ``lo`` to the partition's end, in one
        pass; returns them by scope and the last offset of the partition read."""
        async with self._lock:
            return await self._read(scopes, partition, lo, None)

    async def _read(
        self, scopes: set[str], partition: int, lo: int, hi: int | None
    ) -> tuple[dict[str, list[Turn]], int]:
        from aiokafka import TopicPartition

        from streams.records import Interaction, InvalidEvent, decode

        out: dict[str, list[Turn]] = {}
        if hi is not None and hi < lo:
            return out, hi
        if self._consumer is None:
            await self.start()
        consumer = self._consumer
        tp = TopicPartition(INTERACTIONS, partition)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        stop = end if hi is None else min(hi + 1, end)
        if lo >= stop:
            return out, stop - 1
        consumer.seek(tp, lo)
        position = lo
        while position < stop:
            batch = await consumer.getmany(
                tp, timeout_ms=int(self.timeout_s * 1000), max_records=500
            )
            records = batch.get(tp, [])
            if not records:
                log.warning("no records from %s[%d] at %d (want up to %d)",
                            INTERACTIONS, partition, position, stop - 1)  # fmt: skip
                break
            for rec in records:
                if rec.offset >= stop:
                    break
                position = rec.offset + 1
                try:
                    event = decode(rec.value, Interaction)
                except InvalidEvent:
                    continue  # the stream worker dead-letters it; it is not memory
                if event.scope_id in scopes:
                    turn = Turn(event.event_id, event.role, event.text, rec.offset, partition)
                    out.setdefault(event.scope_id, []).append(turn)
            if records[-1].offset >= stop - 1:
                break
        return out, position - 1


async def scope_turns(
    *,
    history_dir: Path,
    reader: TopicReader | None,
    scope_id: str,
    partition: int | None,
    lo: int,
    hi: int,
    retracted: Iterable[str] = (),
    tail_floor: int | None = None,
) -> list[Turn]:
    """The scope's turns in ``[lo, hi]``: Parquet first, then the unflushed tail from Kafka.

    The tail is read from after the last flushed turn, but not before ``tail_floor`` (a
    scope's first job need not scan its partition from offset 0).
    """
    # In a thread: a wave's plans read their histories concurrently (pyarrow lets go of the
    # GIL), and the worker's event loop is never held (~80 ms a scope in `somna bench swap`).
    turns = await asyncio.to_thread(from_history, history_dir, scope_id, lo, hi)
    if partition is None and turns:
        partition = turns[-1].partition
    tail_from = max(
        turns[-1].offset + 1 if turns else lo, tail_floor if tail_floor is not None else lo
    )
    if reader is not None and partition is not None and tail_from <= hi:
        turns += await reader.read(scope_id, partition, tail_from, hi)
    dropped = set(retracted)
    return [t for t in turns if t.event_id not in dropped]


def partition_for(scope_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2 of the raw key, as Java, aiokafka
    and so Faust use) gives the scope, for when no event of the scope says it."""
    from aiokafka.partitioner import DefaultPartitioner

    ids = list(range(partitions))
    return DefaultPartitioner()(scope_id.encode("utf-8"), ids, ids)


def chunk_turns(turns: list[Turn], chunk_tokens: int) -> list[list[Turn]]:
    """Deterministic chunking for replays (invariant 3): whole turns, greedily, in order,
    a chunk closing once it holds ``chunk_tokens`` tokens or more."""
    chunks: list[list[Turn]] = []
    current: list[Turn] = []
    size = 0
    for t in turns:
        current.append(t)
        size += len(t.tokens())
        if size >= chunk_tokens:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    return chunks
