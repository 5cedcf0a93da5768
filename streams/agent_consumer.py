"""The inference agent's intake: its own aiokafka consumer group, not a Faust stream.

Faust's stream machinery (iteration, acks, per-event bookkeeping) cost the agent more CPU
per event than its own work did (``somna bench pipeline``), and Faust 0.15's rebalance
recovery can drop fetched records (streams/gaps.py). A plain consumer has neither cost:
``getmany`` batches straight from the fetcher, positions are aiokafka's own.

One group member consumes ``somna.interactions``, ``somna.fast-weights`` and
``somna.retractions`` with the range assignor: partition p of all three (co-partitioned,
keyed by scope) goes to the same member, so a scope's turns, fast weights and retractions
land on the one worker that holds its memory. (aiokafka's default, round robin, would
spread them.)

At least once: offsets are committed only after the outputs of their records (replies,
dead letters) are acked by the broker, about once a second and on revoke or stop, not
per batch (a commit is a round trip).

Batches overlap: ``handle`` returns once a batch's work is queued, with what finishes it,
and the loop fetches the next batch at once. Waiting for the whole batch (facts queued
behind the questions, turns held for a swap) kept a question of the next batch in the
fetcher for 100-570 ms (``somna bench swap``). A batch's offsets are committed once it
and every batch before it have finished; a commit runs beside the loop, not in it.
Outputs are idempotent (reply_id from event_id), so a redelivery repeats a reply, never
loses one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError

from infra.settings import Settings
from infra.topics import FAST_WEIGHTS, INTERACTIONS, RETRACTIONS

log = logging.getLogger(__name__)

TOPICS = (INTERACTIONS, FAST_WEIGHTS, RETRACTIONS)
GROUP_SUFFIX = "-agent"  # the agent's group beside the Faust App's (history, consolidator)
MAX_RECORDS = 128  # records per getmany: streams/agent.py answers them in one engine call
# How long getmany waits when nothing is fetched (it returns as soon as records are):
# how late a due commit or a stop can be, not latency added to a turn.
POLL_MS = 100
COMMIT_INTERVAL = 1.0  # seconds between offset commits
# Records handed to the handler and not finished: back pressure. Counted in records, not
# batches: under load getmany returns many small batches, and a cap of 8 batches stalled
# the intake while the engine worked through them.
MAX_RECORDS_IN_FLIGHT = 8 * MAX_RECORDS
# How long the broker may hold a fetch with no new data (Kafka's default: 500 ms). aiokafka
# keeps one fetch in flight per broker, without the partitions whose records are still
# buffered: a turn arriving on such a partition waited for that fetch to time out (replies
# 300-600 ms late under the swap bench's load). Short, it costs idle fetches, not latency.
FETCH_MAX_WAIT_MS = 20
# The Faust App's producer settings (streams/app.py): every reply acked by all replicas,
# sent at once (no linger), retried through a broker outage rather than dropped.
PRODUCER_REQUEST_TIMEOUT_MS = 1_200_000
SESSION_TIMEOUT_MS = 20_000
HEARTBEAT_MS = 3_000

Batch = dict[str, list[ConsumerRecord]]  # topic -> its records, in offset order per partition


def agent_group_id(app_group: str) -> str:
    """The agent's consumer group: the Faust App's group id (roles, or SOMNA_STREAM_GROUP)
    with a suffix. Its own group, because a group's members must share an assignor."""
    return app_group + GROUP_SUFFIX


def agent_instance_id(stream_instance_id: str | None) -> str | None:
    """The agent's static member name, distinct from the Faust member's own."""
    return stream_instance_id + GROUP_SUFFIX if stream_instance_id else None


class Handler(Protocol):
    """What the consumer drives (streams/agent.py)."""

    async def handle(self, batch: Batch) -> Awaitable[None] | None:
        """Start one batch; return what finishes it (None: finished on return). Outputs go
        through :meth:`AgentConsumer.send` before it finishes."""

    async def assigned(self, partitions: set[int]) -> None:
        """The ``somna.interactions`` partitions this member owns now."""


SendFn = Callable[[str, bytes | None, bytes], Awaitable[None]]


class AgentConsumer:
    """The agent's consumer group member and producer; :meth:`start` runs the loop."""

    def __init__(self, settings: Settings, group_id: str, *, producer_linger_ms: int = 0) -> None:
        self.group_id = group_id
        self.handler: Handler | None = None
        self._settings = settings
        self._linger_ms = producer_linger_ms
        self.consumer: AIOKafkaConsumer | None = None  # made in start(): they need the loop
        self.producer: AIOKafkaProducer | None = None
        self._unacked: list[asyncio.Future] = []  # outputs sent since the last commit
        # Batches handed to the handler since the last commit, in order: (what finishes
        # it, the next offset of each of its partitions).
        self._handed: list[tuple[asyncio.Future, dict[TopicPartition, int]]] = []
        self._in_flight: dict[asyncio.Future, int] = {}  # handed, not finished -> records
        self._committing: asyncio.Task | None = None
        self._done: dict[TopicPartition, int] = {}  # next offset, once those are acked
        self._last_commit = time.monotonic()
        self._busy = asyncio.Lock()  # held while a batch is handed over, and on revoke and stop
        self._stopping = False
        self._failed: BaseException | None = None  # a batch or delivery failed: never commit again
        self._task: asyncio.Task | None = None

    # --- life cycle ------------------------------------------------------------------

    async def start(self, handler: Handler) -> None:
        self.handler = handler
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self._settings.bootstrap,
            group_id=self.group_id,
            group_instance_id=agent_instance_id(self._settings.stream_instance_id),
            partition_assignment_strategy=(RangePartitionAssignor,),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_MS,
        )
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self._settings.bootstrap,
            acks="all",
            linger_ms=self._linger_ms,
            request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
        )
        await self.producer.start()
        self.consumer.subscribe(list(TOPICS), listener=_Listener(self))
        await self.consumer.start()
        self._task = asyncio.create_task(self._run(), name="somna-agent-intake")

    async def wait(self) -> None:
        """Until the loop ends: raises what stopped it, if anything did."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Finish the batch in hand, commit what was answered, leave the group."""
        self._stopping = True
        if self.consumer is None or self.producer is None:
            return
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=30)
            except Exception:  # noqa: BLE001 (stopping: the loop's error was reported)
                self._task.cancel()
        try:
            async with self._busy:
                # Bounded: a broker away at shutdown must not hold the worker; what is
                # not committed is delivered again.
                await asyncio.wait_for(self._commit_all(), timeout=30)
        except Exception as e:  # noqa: BLE001
            log.warning("agent: last commit at stop failed (%s)", e)
        finally:
            await self.consumer.stop()
            await self.producer.stop()

    async def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Enqueue one output; the offsets of the current batch wait for its ack."""
        self._unacked.append(await self.producer.send(topic, value, key=key))

    # --- the loop --------------------------------------------------------------------

    async def _run(self) -> None:
        assert self.handler is not None
        while not self._stopping:
            if self._failed is not None:
                raise self._failed
            # getmany may span a whole rebalance: it waits out the reassignment and returns
            # records of the new assignment, whose positions it has already moved past. So
            # every record it returns of a partition still ours is answered; dropping one
            # would let a later commit skip it (a lost turn). Records of a partition revoked
            # since are not ours: its new owner starts from the committed offset.
            fetched = await self.consumer.getmany(timeout_ms=POLL_MS, max_records=MAX_RECORDS)
            async with self._busy:
                owned = self.consumer.assignment()
                fetched = {tp: rs for tp, rs in fetched.items() if tp in owned}
                if fetched:
                    finishing = await self.handler.handle(_by_topic(fetched))
                    self._hand(finishing, {tp: rs[-1].offset + 1 for tp, rs in fetched.items()},
                               sum(len(rs) for rs in fetched.values()))  # fmt: skip
                    while sum(self._in_flight.values()) >= MAX_RECORDS_IN_FLIGHT:
                        await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                due = time.monotonic() - self._last_commit >= COMMIT_INTERVAL
                if due and (self._committing is None or self._committing.done()):
                    if self._committing is not None:
                        self._committing.result()  # a failed commit stops the loop
                    self._committing = asyncio.create_task(self._commit())

    def _hand(
        self, finishing: Awaitable[None] | None, offsets: dict[TopicPartition, int], records: int
    ) -> None:
        if finishing is None:  # finished already
            future = asyncio.get_running_loop().create_future()
            future.set_result(None)
        else:
            future = asyncio.ensure_future(finishing)
            self._in_flight[future] = records
            future.add_done_callback(self._finished)
        self._handed.append((future, offsets))

    def _finished(self, future: asyncio.Future) -> None:
        self._in_flight.pop(future, None)
        if not future.cancelled() and future.exception() is not None and self._failed is None:
            self._failed = future.exception()  # the loop stops at its next turn

    async def _commit_all(self) -> None:
        """Every batch handed over finished and its offsets committed (revoke, stop)."""
        if self._committing is not None:
            with contextlib.suppress(Exception):  # its offsets are in the next commit
                await self._committing
        await self._commit()

    async def _commit(self) -> None:
        """Wait for the batches handed over so far and the outputs they sent, then commit
        their offsets."""
        self._last_commit = time.monotonic()
        if self._failed is not None:
            raise self._failed
        handed, self._handed = self._handed, []
        try:
            await asyncio.gather(*(f for f, _ in handed))
        except Exception as e:
            # A batch failed: nothing is committed from now on (the loop stops, the
            # worker with it); its turns are delivered again to the next owner.
            self._failed = e
            self._done.clear()
            raise
        for _, offsets in handed:
            self._done.update(offsets)
        if self._unacked:
            unacked, self._unacked = self._unacked, []
            try:
                await asyncio.gather(*unacked)
            except Exception as e:
                # A reply not delivered: nothing is committed from now on (the loop stops,
                # the worker with it); its turns are delivered again to the next owner.
                self._failed = e
                self._done.clear()
                raise
        if not self._done:
            return
        done, self._done = self._done, {}
        owned = self.consumer.assignment()
        offsets = {tp: o for tp, o in done.items() if tp in owned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as e:
            # The broker is away or a rebalance is under way: committed later, or the
            # records are delivered again (their replies are idempotent).
            log.warning("agent: offset commit failed (%s), retried", e)
            for tp, o in offsets.items():
                self._done.setdefault(tp, o)

    async def _revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self._busy:  # the batches in hand finish first
            await self._commit_all()
            self._done.clear()

    async def _assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assert self.handler is not None
        await self.handler.assigned({tp.partition for tp in assigned if tp.topic == INTERACTIONS})


class _Listener(ConsumerRebalanceListener):
    def __init__(self, consumer: AgentConsumer) -> None:
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.consumer._revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.consumer._assigned(assigned)


def _by_topic(fetched: dict[TopicPartition, list[ConsumerRecord]]) -> Batch:
    batch: Batch = {}
    for tp, records in fetched.items():
        batch.setdefault(tp.topic, []).extend(records)
    return batch
