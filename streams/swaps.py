"""Hot-swapping published fast weights into the agent's engine (the fast-weights agent).

A sleep batch publishes one version per scope at once. Taken one at a time, the last scope
of a burst of 100 waited for 99 registry round trips, downloads and engine calls. So a
burst is verified with one registry lookup (its bytes read from the sleep worker's local
copy, ``consolidation/blobs.py``; those of scopes with a question waiting first, the
others ``DEFER_UNWANTED_SECONDS`` later), each swap is staged as soon as its weights are
ready, and the next burst does not wait for this one. A scope's publishes still swap in
order: a rollback must land after the version it undoes.

Staging (``Engine.swap``) runs here on the event loop, not on the engine thread: queued
there, a swap waited for the answer call in progress (~200 ms for 128 turns at 100 scopes,
``somna bench swap``). The model work of a swap is done when the scope is next asked
something (``streams/memory.py``).

The agent acks a burst's offsets once it is handed over, before the swaps end: a crash
loses the in-memory states anyway, and a restarted worker loads each scope's live version
from the registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from streams import metrics
from streams.engine import Engine
from streams.loader import ScopeLoader
from streams.records import FastWeightsPublished

if TYPE_CHECKING:
    from streams.engine_thread import EngineThread

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 1024  # swaps not yet done: back pressure on the topic
# A burst's swaps that no question waits for are fetched this much later, unless a question
# comes meanwhile: the questions that come right after a burst (~10-50 ms) find the engine
# thread and the GIL without the other swaps' reads competing. Only staging waits: a scope
# that states facts does not need its swap (streams/memory.py).
DEFER_UNWANTED_SECONDS = 0.25


class Swapper:
    """Stages bursts of :class:`FastWeightsPublished` in ``engine`` (rollbacks reload on
    its thread)."""

    def __init__(self, engine: Engine, thread: EngineThread, loader: ScopeLoader) -> None:
        self.engine = engine
        self.thread = thread
        self.loader = loader
        self._chains: dict[str, asyncio.Task] = {}  # scope -> its last swap not yet done
        self._running: set[asyncio.Task] = set()  # the loop keeps only weak references
        self._room = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._waited: Counter[str] = Counter()  # scope -> questions waiting for its swap
        self._wanted = asyncio.Event()  # set when a scope gets a question waiting

    async def submit(self, burst: list[tuple[FastWeightsPublished, float | None]]) -> None:
        """Start the swaps of ``burst`` ((published, record timestamp) pairs); returns once
        they are queued (waits only while ``MAX_IN_FLIGHT`` swaps are pending)."""
        if not burst:
            return
        taken = time.time()
        loop = asyncio.get_running_loop()
        ready = [loop.create_future() for _ in burst]
        self._start(self._fetch([p for p, _ in burst], ready))
        for (published, produced_at), weights in zip(burst, ready, strict=True):
            await self._room.acquire()
            scope = published.scope_id
            task = self._start(
                self._apply(published, produced_at, taken, weights, self._chains.get(scope))
            )
            self._chains[scope] = task
            task.add_done_callback(lambda t, s=scope: self._forget(s, t))

    async def wait_for(self, scopes: set[str], timeout: float) -> None:
        """Until the swaps of ``scopes`` submitted so far are staged (at most ``timeout``
        s: a slow registry must not hold their turns for long)."""
        waiting = [s for s in scopes if s in self._chains]
        if not waiting:
            return
        self._waited.update(waiting)  # their artifacts are read first (ScopeLoader.fetch_many)
        self._wanted.set()  # readers waiting out the deferral look again
        try:
            await asyncio.wait([self._chains[s] for s in waiting], timeout=timeout)
        finally:
            self._waited -= Counter(waiting)  # keeps only the scopes still waited for

    def pending(self, scope: str) -> bool:
        """Has ``scope`` a swap submitted and not yet staged?"""
        return scope in self._chains

    def _start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    def _forget(self, scope: str, task: asyncio.Task) -> None:
        if self._chains.get(scope) is task:
            del self._chains[scope]

    async def _fetch(
        self, published: list[FastWeightsPublished], ready: list[asyncio.Future]
    ) -> None:
        try:
            async for i, weights in self.loader.fetch_many(
                published,
                wanted=self._waited.__contains__,
                defer=DEFER_UNWANTED_SECONDS,
                nudged=self._wanted,
            ):
                ready[i].set_result(weights)
        except Exception:  # noqa: BLE001 (fetch_many logs and refuses; this is a bug)
            log.exception("fetching %d fast weights", len(published))
        finally:
            for future in ready:
                if not future.done():
                    future.set_result(None)  # refused: the previous version keeps serving

    async def _apply(
        self,
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
            outcome = self.engine.swap(published, weights)  # stages only: see above
            swapped = time.time()
            if outcome == "older":
                outcome = await self._older(published)
            metrics.SWAPS.labels(outcome=outcome).inc()
            # benchmarks/swap.py reads this split from the worker's log.
            log.info(
                "fast weights %s v%s @%d: %s (taken %.0f ms after publish, fetch %.0f ms, "
                "stage %.0f ms)",
                published.scope_id, published.version, published.watermark, outcome,
                (taken - produced_at) * 1000 if produced_at else -1,
                (fetched - taken) * 1000, (swapped - fetched) * 1000,
            )  # fmt: skip
        except Exception:  # noqa: BLE001 (one scope's failure must not stop the others)
            metrics.SWAPS.labels(outcome="error").inc()
            log.exception("swap of %s v%s", published.scope_id, published.version)
        finally:
            self._room.release()

    async def _older(self, published: FastWeightsPublished) -> str:
        # A publish behind what we serve is a late one, unless the registry says it is live
        # now: a rollback. Its events after the watermark left the KV at the newer swap, so
        # the scope reloads (the version + those events from the topic: no gap).
        if not await self.loader.is_live(published):
            return "stale"
        await self.thread.call(self.engine.reload, published.scope_id)
        return "rollback"
