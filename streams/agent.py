"""The inference agent: interactions in, replies out; fast-weight swaps and retractions.

Three Faust agents share one :class:`~streams.engine.Engine` (the model and each scope's
memory). All engine calls run in one dedicated thread, in arrival order: torch work never
blocks the event loop (heartbeats, fetches and produces go on meanwhile), and a scope's
memory is only ever touched by that thread. Consolidation never runs here (invariant 2):
the agent only reads what the sleep workers publish.

Per micro-batch (``take_events``: up to ``MAX_BATCH`` turns or ``BATCH_WINDOW`` seconds):
decode (bad input -> dead letters), load the scopes that are not in memory (their live
fast weights and the events after its watermark, read back from the topic), answer, and
produce the replies keyed by scope. Offsets are acked only after the replies are sent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
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
from streams.loader import ScopeLoader
from streams.records import FastWeightsPublished, Interaction, Retraction

log = logging.getLogger(__name__)

MAX_BATCH = 128  # turns answered per engine call
BATCH_WINDOW = 0.005  # seconds a batch waits to fill: a bound on the latency it adds

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
    app: faust.App, topics: Topics, dlq: DeadLetterPolicy, settings: Settings, engine: Engine
) -> None:
    """Register the agent's three Faust agents on ``app``."""
    thread = EngineThread()
    loader = ScopeLoader(settings)
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
                event = await turns_dlq.decode_event(ev, Interaction)
                if event is None:
                    continue
                turn = Turn(event, msg.partition, msg.offset, msg.timestamp)
                # An old turn of a scope not in memory: nothing to do now; the loader
                # reads it back from the topic if the scope speaks again.
                if not (turn.stale and not engine.loaded(event.scope_id)):
                    turns.append(turn)
            if not turns:
                continue
            await _load_missing(turns)
            if engine.blocking:
                replies = await thread.call(engine.answer, turns)
            else:
                replies = engine.answer(turns)
            for reply in replies:
                # Straight to the producer (Faust's topic.send adds per-message bookkeeping
                # we do not use); Faust flushes it before committing the offsets.
                # The send only enqueues: no reply waits for another's delivery.
                await app.producer.send(
                    REPLIES, reply.scope_id.encode(), reply.to_bytes(), None, None, None
                )
                metrics.TURN_LATENCY.observe(reply.latency_ms / 1000.0)
            metrics.REPLIES.inc(len(replies))

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
        for partition, upto in by_partition.items():
            snapshots = await loader.load(partition, upto, with_weights=engine.uses_fast_weights)
            for scope, snapshot in snapshots.items():
                await thread.call(engine.install, scope, snapshot)

    @app.agent(topics.fast_weights, name="somna-agent-fast-weights")
    async def swap(stream: faust.StreamT) -> None:
        # A sleep batch publishes one version per scope at once. Taken one at a time, the
        # last scope of a burst of 100 waited for 99 registry round trips, downloads and
        # engine calls. Now a burst is verified with one registry lookup (its bytes read
        # from the sleep worker's local copy), each swap goes to the engine thread as soon
        # as its weights are ready, and the next burst does not wait for this one. A
        # scope's publishes still swap in order (a rollback must land after the version it
        # undoes). Offsets are acked before the swaps end: a crash loses the memory anyway,
        # and a restarted worker loads each scope's live version from the registry.
        import time
        from collections.abc import Coroutine

        chains: dict[str, asyncio.Task] = {}  # scope -> its last swap not yet done
        running: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        room = asyncio.Semaphore(1024)  # swaps in flight: back pressure on the topic
        # Swaps queued on the engine thread at once: an answer batch waits behind a few
        # swaps at most, not behind a whole burst (no added online latency).
        engine_turns = asyncio.Semaphore(4)

        def start(coro: Coroutine[object, object, None]) -> asyncio.Task:
            task = asyncio.create_task(coro)
            running.add(task)
            task.add_done_callback(running.discard)
            return task

        async def fetch(items: list[tuple[FastWeightsPublished, asyncio.Future]]) -> None:
            try:
                found = await loader.fetch_many([p for p, _ in items])
            except Exception:  # noqa: BLE001 (fetch_many logs and refuses, this is a bug)
                log.exception("fetching %d fast weights", len(items))
                found = [None] * len(items)
            for (_, ready), weights in zip(items, found, strict=True):
                ready.set_result(weights)

        async def apply(
            published: FastWeightsPublished,
            produced_at: float | None,
            taken: float,
            ready: asyncio.Future,
            after: asyncio.Task | None,
        ) -> None:
            try:
                weights = await ready
                fetched = time.time()
                if after is not None:
                    await after
                if weights is None:
                    metrics.SWAPS.labels(outcome="rejected").inc()
                    return  # the previous version keeps serving
                async with engine_turns:
                    outcome = await thread.call(engine.swap, published, weights)
                swapped = time.time()
                if outcome == "older":
                    outcome = await _older(published)
                metrics.SWAPS.labels(outcome=outcome).inc()
                log.info(
                    "fast weights %s v%s @%d: %s (taken %.0f ms after publish, fetch %.0f ms, "
                    "engine %.0f ms)",
                    published.scope_id, published.version, published.watermark, outcome,
                    (taken - produced_at) * 1000 if produced_at else -1,
                    (fetched - taken) * 1000, (swapped - fetched) * 1000,
                )  # fmt: skip
            except Exception:  # noqa: BLE001 (one scope's failure must not stop the others)
                metrics.SWAPS.labels(outcome="error").inc()
                log.exception("swap of %s v%s", published.scope_id, published.version)
            finally:
                room.release()

        def forget(scope: str, task: asyncio.Task) -> None:
            if chains.get(scope) is task:
                del chains[scope]

        async for events in stream.take_events(256, within=0.005):
            taken = time.time()
            burst: list[tuple[FastWeightsPublished, float | None, asyncio.Future]] = []
            for ev in events:
                published = await weights_dlq.decode_event(ev, FastWeightsPublished)
                if published is None or not engine.uses_fast_weights:
                    continue
                if not engine.loaded(published.scope_id):
                    continue  # a scope not in memory loads its live weights when it next speaks
                ready = asyncio.get_running_loop().create_future()
                burst.append((published, ev.message.timestamp, ready))
            if not burst:
                continue
            start(fetch([(published, ready) for published, _, ready in burst]))
            for published, produced_at, ready in burst:
                await room.acquire()
                scope = published.scope_id
                task = start(apply(published, produced_at, taken, ready, chains.get(scope)))
                chains[scope] = task
                task.add_done_callback(lambda t, s=scope: forget(s, t))

    async def _older(published: FastWeightsPublished) -> str:
        # A publish behind what we serve is a late one, unless the registry says it is live
        # now: a rollback. Its events after the watermark left the KV at the newer swap, so
        # the scope reloads (the version + those events from the topic: no gap).
        if not await loader.is_live(published):
            return "stale"
        await thread.call(engine.reload, published.scope_id)
        return "rollback"

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
    from consolidation.base_model_watch import POLL_SECONDS, BaseModelWatch

    async def serve(base) -> None:
        dropped = await thread.call(engine.set_base_model, base.lm, base.version)
        log.info("base model v%s: dropped %d scopes' memory, they reload", base.version, dropped)

    watch = BaseModelWatch(settings.tracking_uri, engine.base_model_version, serve)

    @app.timer(interval=POLL_SECONDS)
    async def watch_base_model() -> None:
        try:
            await watch.check()
        except Exception as e:  # noqa: BLE001 (registry away: keep serving, poll again)
            log.warning("base model watch: %s", e)
