"""The inference agent: interactions in, replies out; fast-weight swaps and retractions.

Three Faust agents share one :class:`~streams.engine.Engine` (the model and each scope's
memory). All engine calls run in one dedicated thread, in arrival order: torch work never
blocks the event loop (heartbeats, fetches and produces go on meanwhile), and a scope's
memory is only ever touched by that thread. Consolidation never runs here (invariant 2):
the agent only reads what the sleep workers publish.

Per micro-batch (``take_events``: up to ``MAX_BATCH`` turns or ``BATCH_WINDOW`` seconds):
decode (bad input -> dead letters), answer the turns of scopes in memory while the others
load (their live fast weights and the events after its watermark, read back from the
topic; all installed in one batched wake), then answer those, and produce the replies
keyed by scope. Offsets are acked only after the replies are sent.
A turn the consumer skipped (Faust's recovery can drop records after a rebalance) is
noticed by its offset and read back from the topic before the next one (streams/gaps.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TypeVar

import faust

from infra.settings import Settings
from infra.topics import INTERACTIONS, REPLIES
from streams import metrics
from streams.app import Topics
from streams.dead_letters import DeadLetterPolicy
from streams.engine import Engine, Turn
from streams.gaps import SkipCheck
from streams.loader import ScopeLoader
from streams.records import FastWeightsPublished, Interaction, Retraction
from streams.swaps import Swapper

log = logging.getLogger(__name__)

MAX_BATCH = 128  # turns answered per engine call
BATCH_WINDOW = 0.005  # seconds a batch waits to fill: a bound on the latency it adds
SLOW_BATCH_SECONDS = 0.3  # a batch slower than this is logged with where its time went

T = TypeVar("T")


class EngineThread:
    """Runs engine calls one at a time on a thread of their own."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="somna-engine")

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def install(
    app: faust.App,
    topics: Topics,
    dlq: DeadLetterPolicy,
    skips: SkipCheck,
    settings: Settings,
    engine: Engine,
) -> None:
    """Register the agent's three Faust agents on ``app``."""
    thread = EngineThread()
    loader = ScopeLoader(settings)
    check = skips.role("agent", [INTERACTIONS])
    turns_dlq = dlq.claim(topics.interactions.get_topic_name())
    weights_dlq = dlq.claim(topics.fast_weights.get_topic_name())
    retractions_dlq = dlq.claim(topics.retractions.get_topic_name())

    consumed = metrics.EVENTS.labels(role="agent", topic=topics.interactions.get_topic_name())

    @app.agent(topics.interactions, name="somna-agent-interactions")
    async def answer(stream: faust.StreamT) -> None:
        async for events in stream.take_events(MAX_BATCH, within=BATCH_WINDOW):
            turns: list[Turn] = []
            consumed.inc(len(events))  # once a batch: a labelled inc costs ~2 us an event
            for ev in events:
                msg = ev.message
                for r in await check.skipped(msg.topic, msg.partition, msg.offset):
                    skipped = await turns_dlq.decode_record(r, Interaction)
                    _keep(turns, skipped, r.partition, r.offset, r.timestamp / 1000.0)
                event = await turns_dlq.decode_event(ev, Interaction)
                _keep(turns, event, msg.partition, msg.offset, msg.timestamp)
            if not turns:
                continue
            # Scopes in memory are answered first; the cold ones (read back from the
            # registry and the topic, which takes long) load meanwhile and follow.
            cold = {t.event.scope_id for t in turns if not engine.loaded(t.event.scope_id)}
            if not cold:
                await _answer(turns, time.time(), None)
                continue
            warm = [t for t in turns if t.event.scope_id not in cold]
            rest = [t for t in turns if t.event.scope_id in cold]
            t_taken = time.time()
            # The warm batch is queued on the engine thread before the cold scopes'
            # install, so loading cannot evict a scope it is about to answer.
            loading = asyncio.create_task(_load_missing(rest))
            try:
                if warm:
                    await _answer(warm, t_taken, None)
            finally:
                await loading
            await _answer(rest, t_taken, time.time())

    async def _answer(turns: list[Turn], t_taken: float, t_loaded: float | None) -> None:
        """Answer ``turns`` of scopes in memory and send the replies."""
        started: list[float] = []
        if engine.blocking:
            replies = await thread.call(_timed, started, engine.answer, turns)
        else:
            replies = engine.answer(turns)
        _log_if_slow(turns, t_taken, t_loaded or t_taken, started)
        for reply in replies:
            # Straight to the producer (Faust's topic.send adds per-message bookkeeping we
            # do not use); Faust flushes it before committing the offsets. The send only
            # enqueues: no reply waits for another's delivery.
            await app.producer.send(
                REPLIES, reply.scope_id.encode(), reply.to_bytes(), None, None, None
            )
            metrics.TURN_LATENCY.observe(reply.latency_ms / 1000.0)
        metrics.REPLIES.inc(len(replies))

    def _keep(
        turns: list[Turn], event: Interaction | None, partition: int, offset: int, ts: float
    ) -> None:
        if event is None:
            return
        turn = Turn(event, partition, offset, ts)
        # An old turn of a scope not in memory: nothing to do now; the loader reads it
        # back from the topic if the scope speaks again.
        if not (turn.stale and not engine.loaded(event.scope_id)):
            turns.append(turn)

    async def _load_missing(turns: list[Turn]) -> None:
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
            snapshots |= await loader.load(partition, upto, with_weights=engine.uses_fast_weights)
        await thread.call(engine.install, snapshots)

    def _timed(started: list[float], fn: Callable[..., T], *args: object) -> T:
        started.append(time.time())  # when the engine thread took it: queue wait before
        return fn(*args)

    last_slow_log = 0.0

    def _log_if_slow(turns: list[Turn], taken: float, loaded: float, started: list[float]) -> None:
        # Only turns someone waits for; at most once a second (a backlog is slow throughout).
        nonlocal last_slow_log
        done = time.time()
        asked = [t.produced_at for t in turns if t.wants_reply and t.produced_at]
        if not asked or done - min(asked) < SLOW_BATCH_SECONDS or done - last_slow_log < 1:
            return
        last_slow_log = done
        oldest = min(asked)
        start = started[0] if started else loaded
        # benchmarks/swap.py: where a slow reply's time went, on the agent's side.
        log.info(
            "slow batch of %d turns: %.0f ms record -> taken, load %.0f ms, "
            "engine queue %.0f ms, engine %.0f ms",
            len(turns), (taken - oldest) * 1000, (loaded - taken) * 1000,
            (start - loaded) * 1000, (done - start) * 1000,
        )  # fmt: skip

    swapper = Swapper(engine, thread, loader)

    @app.agent(topics.fast_weights, name="somna-agent-fast-weights")
    async def swap(stream: faust.StreamT) -> None:
        async for events in stream.take_events(256, within=0.005):
            burst: list[tuple[FastWeightsPublished, float | None]] = []
            for ev in events:
                published = await weights_dlq.decode_event(ev, FastWeightsPublished)
                # A scope not in memory loads its live weights when it next speaks.
                if (
                    published is not None
                    and engine.uses_fast_weights
                    and engine.loaded(published.scope_id)
                ):
                    burst.append((published, ev.message.timestamp))
            await swapper.submit(burst)

    @app.agent(topics.retractions, name="somna-agent-retractions")
    async def retract(stream: faust.StreamT) -> None:
        async for ev in stream.events():
            retraction = await retractions_dlq.decode_event(ev, Retraction)
            if retraction is not None and engine.loaded(retraction.scope_id):
                await thread.call(engine.retract, retraction)

    @app.on_partitions_assigned.connect
    async def keep_owned_scopes(sender: object, assigned: object = None, **kwargs: object) -> None:
        owned = {tp.partition for tp in app.consumer.assignment() if tp.topic == INTERACTIONS}
        dropped = await thread.call(engine.keep_partitions, owned)
        if dropped:
            log.info("rebalance: forgot %d scopes of partitions no longer ours", dropped)

    @app.timer(interval=5.0)
    async def report_live_scopes() -> None:
        metrics.LIVE_SCOPES.set(engine.live_scopes())

    if engine.uses_fast_weights:
        _watch_base_model(app, settings, engine, thread)


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
