"""The inference agent: interactions in, replies out; fast-weight swaps and retractions.

The agent's intake is its own consumer group (``streams/agent_consumer.py``: a plain
aiokafka consumer of interactions, fast weights and retractions, co-partitioned), hosted
in the stream worker's event loop beside the Faust App that runs the other roles and the
timers. One :class:`~streams.engine.Engine` holds the model and each scope's memory. All
engine calls run in one dedicated thread (``streams/engine_thread.py``), one at a time,
most urgent first, question calls queued together merged into one: torch work never
blocks the event loop (heartbeats, fetches and produces go on meanwhile), and a scope's
memory is only ever touched by that thread.
Consolidation never runs here (invariant 2): the agent only reads what the sleep workers
publish.

Per fetched batch (up to ``MAX_RECORDS`` records): decode (bad input -> dead letters);
answer the scopes in memory with a question first, then those that only state facts (in
small background calls); meanwhile the cold scopes load (their live fast weights and the
events after the watermark, read back from the topic; all installed in one batched wake)
and scopes asking with fast weights just published get them staged, and these held-back
questions overtake the facts still queued; produce the replies keyed by scope. Fast
weights go to the :class:`~streams.swaps.Swapper` first (so their fetch starts early);
retractions are applied on the engine thread after the turns. Offsets are committed
only after the replies are acked (at least once).

Batches overlap (``streams/agent_consumer.py``): ``handle`` returns once the calls are
queued. A scope's turns still keep their order: a turn of a scope with an earlier call
not yet done is held back until that call is, and a load never evicts such a scope.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from typing import Any

import faust
import mode
from aiokafka import ConsumerRecord

from infra.settings import Settings
from infra.topics import DEAD_LETTERS, FAST_WEIGHTS, INTERACTIONS, REPLIES, RETRACTIONS
from streams import metrics
from streams.agent_consumer import AgentConsumer, Batch, SendFn, agent_group_id
from streams.dead_letters import DeadLetterPolicy
from streams.engine import Engine, Turn
from streams.engine_thread import EngineThread, Priority
from streams.loader import ScopeLoader
from streams.records import FastWeightsPublished, Interaction, Retraction
from streams.swaps import Swapper

log = logging.getLogger(__name__)

# A batch slower than this is logged with where its time went (at most once a second);
# SOMNA_SLOW_BATCH_MS lowers it for a diagnosis (benchmarks/swap.py uses 100).
SLOW_BATCH_SECONDS = float(os.environ.get("SOMNA_SLOW_BATCH_MS", "300")) / 1000
# A turn of a scope whose new fast weights are being fetched waits for them this long at
# most: answered from the version just published rather than the one before (a fetch is
# ~40 ms; without the wait a third of the first replies after a publish were stale).
SWAP_WAIT_SECONDS = 0.2
# Fact turns per background engine call: the most a held-back question waits behind.
BACKGROUND_CALL_TURNS = 16


def install(
    app: faust.App, dlq: DeadLetterPolicy, settings: Settings, engine: Engine
) -> AgentConsumer:
    """Run the agent in ``app``'s worker: its consumer starts and stops with the App."""
    thread = EngineThread(nice=settings.agent_nice)
    intake = AgentConsumer(settings, agent_group_id(app.conf.id))
    agent = Agent(engine, thread, ScopeLoader(settings), dlq, intake.send, settings)

    @app.service
    class AgentService(mode.Service):
        """The agent's consumer as a service of the App: started and stopped with it."""

        async def on_start(self) -> None:
            await intake.start(agent)

        async def on_stop(self) -> None:
            await intake.stop()

        @mode.Service.task
        async def _watch(self) -> None:
            try:
                await intake.wait()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the loop died (a reply not delivered): stop the worker
                log.exception("agent intake stopped")
                await self.crash(e)

    @app.timer(interval=5.0)
    async def report_live_scopes() -> None:
        metrics.LIVE_SCOPES.set(engine.live_scopes())

    if engine.uses_fast_weights:
        _watch_base_model(app, settings, engine, thread)
    return intake


class Agent:
    """What the agent does with a fetched batch (driven by :class:`AgentConsumer`)."""

    def __init__(
        self,
        engine: Engine,
        thread: EngineThread,
        loader: ScopeLoader,
        dlq: DeadLetterPolicy,
        send: SendFn,
        settings: Settings,
    ) -> None:
        self.engine = engine
        self.thread = thread
        self.loader = loader
        self.send = send
        self.swapper = Swapper(engine, thread, loader)

        # Dead letters go through the agent's producer, so its commits wait for them too.
        async def send_dead_letter(key: bytes | None, value: bytes) -> None:
            await send(DEAD_LETTERS, key, value)

        def policy(topic: str) -> DeadLetterPolicy:
            claimed = dlq.claim(topic)  # the first role of the worker to claim reports
            return DeadLetterPolicy(
                send_dead_letter, max_text_bytes=settings.max_text_bytes, silent=claimed.silent
            )

        self.turns_dlq = policy(INTERACTIONS)
        self.weights_dlq = policy(FAST_WEIGHTS)
        self.retractions_dlq = policy(RETRACTIONS)
        self.consumed = metrics.EVENTS.labels(role="agent", topic=INTERACTIONS)
        self._last_slow_log = 0.0
        self._calls: dict[str, asyncio.Task] = {}  # scope -> its last call not yet done

    def busy(self, scope_id: str) -> bool:
        """Has ``scope_id`` turns in an engine call not yet done? (Never evicted then.)"""
        return scope_id in self._calls

    async def handle(self, batch: Batch) -> asyncio.Future | None:
        """Queue the batch's work; returns what finishes it (its replies sent)."""
        # Swaps first: submitting only queues them (streams/swaps.py), so a publish does
        # not wait for this batch's answers before its weights are fetched.
        if batch.get(FAST_WEIGHTS):
            await self._weights(batch[FAST_WEIGHTS])
        records = batch.get(INTERACTIONS)
        finishing = await self._turns(records) if records else None
        for r in batch.get(RETRACTIONS, ()):
            # After the scope's turns so far: a retraction of one of them finds it installed.
            retraction = await self.retractions_dlq.decode_record(r, Retraction)
            if retraction is None:
                continue
            before = self._calls.get(retraction.scope_id)
            if before is not None:
                await asyncio.wait([before])
            if self.engine.loaded(retraction.scope_id):
                await self.thread.call(self.engine.retract, retraction)
        return finishing

    async def assigned(self, partitions: set[int]) -> None:
        dropped = await self.thread.call(self.engine.keep_partitions, partitions)
        if dropped:
            log.info("rebalance: forgot %d scopes of partitions no longer ours", dropped)

    async def _turns(self, records: list[ConsumerRecord]) -> asyncio.Future | None:
        engine = self.engine
        self.consumed.inc(len(records))  # once a batch: a labelled inc costs ~2 us an event
        turns: list[Turn] = []
        for r in records:
            event = await self.turns_dlq.decode_record(r, Interaction)
            self._keep(turns, event, r.partition, r.offset, r.timestamp / 1000.0)
        if not turns:
            return None
        # A scope with a call of an earlier batch not yet done waits for it: order.
        before = {t.event.scope_id: self._calls[t.event.scope_id] for t in turns if self.busy(t.event.scope_id)}  # fmt: skip
        # Questions of scopes in memory first; facts nobody waits for behind them, in
        # small calls that a held-back question (its scope loaded or its new weights
        # staged meanwhile) overtakes: a batch of 50 fact turns is ~180 ms of engine time.
        cold, swapping = hold_back(turns, engine.loaded, self.swapper.pending)
        later = cold | swapping | set(before)
        asking = {t.event.scope_id for t in turns if t.wants_reply}
        t_taken = time.time()
        now = [t for t in turns if t.event.scope_id not in later]
        questions = [t for t in now if t.event.scope_id in asking]
        calls = [self._start(questions, self._answer(questions, t_taken, None))]
        calls += [
            self._start(chunk, self._answer(chunk, t_taken, None, Priority.BACKGROUND))
            for chunk in _chunks([t for t in now if t.event.scope_id not in asking])
        ]
        rest = [t for t in turns if t.event.scope_id in later]
        if rest:
            waits = list(before.values())
            calls.append(self._start(rest, self._held_back(rest, swapping, waits, t_taken)))
        # The tasks queue their engine calls in this order, before any cold scope's install
        # (queued behind them); an install never evicts a busy scope either.
        return asyncio.gather(*calls)

    def _start(self, turns: list[Turn], answering: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run the call answering ``turns``; until it is done their scopes are busy."""
        task = asyncio.ensure_future(answering)
        for scope in {t.event.scope_id for t in turns}:
            self._calls[scope] = task
            task.add_done_callback(lambda t, s=scope: self._idle(s, t))
        return task

    def _idle(self, scope: str, task: asyncio.Task) -> None:
        if self._calls.get(scope) is task:
            del self._calls[scope]

    async def _held_back(
        self, rest: list[Turn], swapping: set[str], before: list[asyncio.Task], t_taken: float
    ) -> None:
        if before:
            await asyncio.wait(before)  # their own batch reports a failure
        await asyncio.gather(
            self._load_missing(rest),
            self.swapper.wait_for(swapping, SWAP_WAIT_SECONDS),
        )
        await self._answer(rest, t_taken, time.time(), Priority.URGENT)

    async def _weights(self, records: list[ConsumerRecord]) -> None:
        burst: list[tuple[FastWeightsPublished, float | None]] = []
        for r in records:
            published = await self.weights_dlq.decode_record(r, FastWeightsPublished)
            # A scope not in memory loads its live weights when it next speaks.
            if (
                published is not None
                and self.engine.uses_fast_weights
                and self.engine.loaded(published.scope_id)
            ):
                burst.append((published, r.timestamp / 1000.0))
        await self.swapper.submit(burst)  # queued, not done: see streams/swaps.py

    async def _answer(
        self,
        turns: list[Turn],
        t_taken: float,
        t_loaded: float | None,
        priority: Priority = Priority.NORMAL,
    ) -> None:
        """Answer ``turns`` of scopes in memory and send the replies."""
        if not turns:
            return
        if self.engine.blocking:
            replies, started = await self.thread.answer(self.engine.answer, turns, priority)
        else:
            replies, started = self.engine.answer(turns), None
        self._log_if_slow(turns, t_taken, t_loaded or t_taken, started)
        for reply in replies:
            # The send only enqueues: no reply waits for another's delivery; the offsets
            # wait for all of them (streams/agent_consumer.py).
            await self.send(REPLIES, reply.scope_id.encode(), reply.to_bytes())
            metrics.TURN_LATENCY.observe(reply.latency_ms / 1000.0)
        metrics.REPLIES.inc(len(replies))

    def _keep(
        self, turns: list[Turn], event: Interaction | None, partition: int, offset: int, ts: float
    ) -> None:
        if event is None:
            return
        turn = Turn(event, partition, offset, ts)
        # An old turn of a scope not in memory: nothing to do now; the loader reads it
        # back from the topic if the scope speaks again.
        if not (turn.stale and not self.engine.loaded(event.scope_id)):
            turns.append(turn)

    async def _load_missing(self, turns: list[Turn]) -> None:
        engine = self.engine
        # The first offset of each scope in this batch: memory is rebuilt up to just before.
        first: dict[str, tuple[int, int]] = {}
        for t in turns:
            first.setdefault(t.event.scope_id, (t.partition, t.offset))
        missing = [s for s in first if not engine.loaded(s)]
        if not missing:
            return
        by_partition: dict[int, dict[str, int]] = defaultdict(dict)
        for scope in missing:
            partition, offset = first[scope]
            by_partition[partition][scope] = offset
        snapshots = {}
        for partition, upto in by_partition.items():
            snapshots |= await self.loader.load(
                partition, upto, with_weights=engine.uses_fast_weights
            )
        await self.thread.call(engine.install, snapshots, self.busy, priority=Priority.BACKGROUND)

    def _log_if_slow(
        self, turns: list[Turn], taken: float, loaded: float, started: float | None
    ) -> None:
        # Only turns someone waits for; at most once a second (a backlog is slow throughout).
        done = time.time()
        asked = [t.produced_at for t in turns if t.wants_reply and t.produced_at]
        if not asked or done - min(asked) < SLOW_BATCH_SECONDS or done - self._last_slow_log < 1:
            return
        self._last_slow_log = done
        oldest = min(asked)
        start = started or loaded
        # benchmarks/swap.py: where a slow reply's time went, on the agent's side.
        log.info(
            "slow batch of %d turns: %.0f ms record -> taken, load %.0f ms, "
            "engine queue %.0f ms, engine %.0f ms",
            len(turns), (taken - oldest) * 1000, (loaded - taken) * 1000,
            (start - loaded) * 1000, (done - start) * 1000,
        )  # fmt: skip


def hold_back(
    turns: list[Turn], loaded: Callable[[str], bool], swap_pending: Callable[[str], bool]
) -> tuple[set[str], set[str]]:
    """The scopes whose turns wait while the others are answered: (cold, swapping).

    Cold scopes are not in memory (read back from the registry and the topic, which takes
    long). Swapping scopes have new fast weights being fetched and a turn that wants a
    reply, so the reply comes from the version just published. A scope that only states
    facts (system turns) never waits for its swap: its turns are woken now and re-woken
    over the new weights when the swap is applied (events after the watermark stay), and
    holding them held the whole batch, and every turn fetched after it, for the fetch.
    """
    cold = {t.event.scope_id for t in turns if not loaded(t.event.scope_id)}
    swapping = {
        t.event.scope_id
        for t in turns
        if t.wants_reply and t.event.scope_id not in cold and swap_pending(t.event.scope_id)
    }
    return cold, swapping


def _chunks(turns: list[Turn]) -> list[list[Turn]]:
    return [
        turns[i : i + BACKGROUND_CALL_TURNS] for i in range(0, len(turns), BACKGROUND_CALL_TURNS)
    ]


def _watch_base_model(
    app: faust.App, settings: Settings, engine: Engine, thread: EngineThread
) -> None:
    """Serve a new ``production`` base model without a restart (polls the registry)."""
    from consolidation.base_model_watch import BaseModelWatch

    async def serve(base) -> None:
        dropped = await thread.call(engine.set_base_model, base.lm, base.version)
        log.info("base model v%s: dropped %d scopes' memory, they reload", base.version, dropped)

    watch = BaseModelWatch(settings.tracking_uri, engine.base_model_version, serve)

    @app.timer(interval=watch.interval)
    async def watch_base_model() -> None:
        await watch.poll()
