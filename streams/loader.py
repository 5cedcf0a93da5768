"""Rebuilding a scope's memory when it is not in the agent's LRU (new worker, eviction).

A scope's memory is its live fast weights (S up to a watermark W, from MLflow alias
``live``) plus its interaction events after W, read back from ``somna.interactions`` by
offset: the same partition the agent consumes, so they are exactly the events that were
not consolidated (invariant 1). One pass over the partition serves every scope of a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from infra.settings import Settings
from infra.topics import INTERACTIONS, RETRACTIONS
from streams.engine import ScopeSnapshot
from streams.partition_reader import PartitionReader
from streams.records import (
    Event,
    FastWeightsPublished,
    Interaction,
    InvalidEvent,
    Retraction,
    decode,
)

log = logging.getLogger(__name__)

LIVE_ATTEMPTS = 3
FETCH_CONCURRENCY = 8  # artifacts verified and loaded at once (threads: hashing, reading)
E = TypeVar("E", bound=Event)


class ScopeLoader:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.reader = PartitionReader(settings.bootstrap)

    async def fetch_many(
        self,
        published: list[FastWeightsPublished],
        wanted: Callable[[str], bool] = lambda scope: False,
        *,
        defer: float = 0.0,
        nudged: asyncio.Event | None = None,
    ) -> AsyncIterator[tuple[int, Any | None]]:
        """:meth:`fetch_weights` of a burst of publishes (a sleep batch publishes one per
        scope at once): one registry lookup for all of them instead of one each. Yields
        (index in ``published``, weights or None) as each is ready: a swap need not wait
        for its whole burst.

        ``FETCH_CONCURRENCY`` at a time, the scopes someone ``wanted`` (a question waits
        for the swap) first: a burst of 100 takes ~40 ms, and such a question came ~10 ms
        after the publish. (One at a time, each copy's Python work holding the GIL less
        often, the burst took 122 ms at p50 in `somna bench swap` and the questions
        answered meanwhile were slower; 8 threads it is.) The others wait ``defer``
        seconds first, unless they are wanted meanwhile (``nudged`` is set when a scope
        becomes wanted; the readers clear it): see streams/swaps.py."""
        from consolidation import blobs
        from consolidation.fast_weights_load import registered_versions

        # What this data dir's sleep worker recorded needs no lookup (consolidation/blobs.py).
        root = blobs.root(self.settings.data_dir)
        unknown = [p for p in published if not blobs.registered_here(root, p)]
        try:
            records = (
                await asyncio.to_thread(registered_versions, self.settings.tracking_uri, unknown)
                if unknown
                else {}
            )
        except Exception as e:  # noqa: BLE001 (each fetch then asks the registry itself)
            log.warning("registry lookup of %d publishes failed: %s", len(published), e)
            records = {}
        ready: asyncio.Queue[tuple[int, Any | None]] = asyncio.Queue()

        async def fetch(i: int) -> None:
            p = published[i]
            try:
                weights = await self.fetch_weights(
                    p, registered=records.get((p.scope_id, p.version))
                )
            except Exception:  # noqa: BLE001 (fetch_weights refuses with None: this is a bug)
                log.exception("fetching fast weights %s v%s", p.scope_id, p.version)
                weights = None  # refused: the previous version keeps serving
            ready.put_nowait((i, weights))

        todo = list(range(len(published)))
        loop = asyncio.get_running_loop()
        unwanted_from = loop.time() + defer
        nudged = nudged or asyncio.Event()  # without one, the deferral runs out unnudged

        async def take() -> int | None:
            """The next index to fetch (wanted first; the others once deferred), or None
            when the other workers took the rest."""
            while todo:
                nudged.clear()  # before looking: a scope wanted after this sets it again
                i = next((i for i in todo if wanted(published[i].scope_id)), None)
                left = unwanted_from - loop.time()
                if i is None and left > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(left):
                            await nudged.wait()
                    continue
                i = todo[0] if i is None else i
                todo.remove(i)
                return i
            return None

        async def worker() -> None:
            while (i := await take()) is not None:
                await fetch(i)

        tasks = [asyncio.create_task(worker()) for _ in range(min(FETCH_CONCURRENCY, len(todo)))]
        try:
            for _ in published:
                yield await ready.get()
        finally:  # all done, or the caller stopped listening
            for task in tasks:
                task.cancel()

    async def fetch_weights(
        self, published: FastWeightsPublished, *, registered: Any | None = None
    ) -> Any | None:
        """Verify (registry, sha256, scope) and load an artifact; None if it is refused.

        The bytes come from the sleep worker's local copy when there is one (no download);
        ``registered`` is the registry's record of the version when the caller has it.
        """
        from consolidation import blobs
        from consolidation.exceptions import ArtifactRejected
        from consolidation.fast_weights_load import load_fast_weights

        load = partial(
            load_fast_weights, blob_root=blobs.root(self.settings.data_dir), registered=registered
        )
        try:
            return await asyncio.to_thread(
                self._load_prewoken, load, published, blobs.root(self.settings.data_dir)
            )
        except ArtifactRejected as e:
            log.error("refused fast weights %s v%s: %s", published.scope_id, published.version, e)
            return None
        except Exception as e:  # the tracking server is down or slow: keep serving what we have
            log.error(
                "could not fetch fast weights %s v%s: %s", published.scope_id, published.version, e
            )
            return None

    def _load_prewoken(
        self, load: Callable[..., Any], published: FastWeightsPublished, blob_root: Path
    ) -> Any:
        """The verified weights, with the sleep worker's pre-woken state when it left one
        (``consolidation/prewake.py``; the engine checks it before use)."""
        from consolidation import prewake

        weights = load(self.settings.tracking_uri, published, published.scope_id)
        prewoken = prewake.read(blob_root, published.sha256)
        return weights if prewoken is None else dataclasses.replace(weights, prewoken=prewoken)

    async def is_live(self, published: FastWeightsPublished) -> bool:
        """Whether the registry's ``live`` alias of the scope is ``published`` now."""
        from consolidation.fast_weights import latest_live

        try:
            live = await asyncio.to_thread(
                latest_live, self.settings.tracking_uri, published.scope_id
            )
        except Exception as e:  # noqa: BLE001 (the tracking server is down: keep serving)
            log.error("live fast weights of %s: %s", published.scope_id, e)
            return False
        return live is not None and live.version == published.version

    async def _live(
        self, scope_id: str, models: dict[str, Any] | None = None
    ) -> tuple[FastWeightsPublished | None, Any | None]:
        """The scope's live version and its verified weights; (None, None) when it has none
        or they are refused. ``models``: the batch's registered models, when one search
        found them (a scope missing from it was never consolidated)."""
        from consolidation.exceptions import VersionNotFound
        from consolidation.fast_weights import live_version, published

        model = models.get(scope_id) if models is not None else None
        if models is not None and model is None:
            return None, None
        for attempt in range(LIVE_ATTEMPTS):
            try:
                mv = await asyncio.to_thread(
                    live_version, self.settings.tracking_uri, scope_id, model
                )
                break
            except VersionNotFound as e:  # the alias names a deleted version
                log.error("live fast weights of %s: %s", scope_id, e)
                return None, None
            except Exception as e:  # noqa: BLE001 (any failure of the tracking server)
                log.warning(
                    "live fast weights of %s: attempt %d failed: %s", scope_id, attempt + 1, e
                )
                await asyncio.sleep(2.0 * (attempt + 1))
        else:
            # Without the registry, memory is rebuilt from the scope's whole retained log.
            log.error("tracking server unreachable: %s reloads from its events only", scope_id)
            return None, None
        if mv is None:
            return None, None
        live = published(mv)
        weights = await self.fetch_weights(live, registered=mv)
        return (live, weights) if weights is not None else (None, None)

    async def _models(self, scopes: list[str]) -> dict[str, Any] | None:
        """The scopes' registered models in one search; None if it failed (then each scope
        asks the registry itself, with retries)."""
        from consolidation.fast_weights import registered_models

        try:
            return await asyncio.to_thread(registered_models, self.settings.tracking_uri, scopes)
        except Exception as e:  # noqa: BLE001 (the tracking server is down or slow)
            log.warning("registry search of %d scopes failed: %s", len(scopes), e)
            return None

    async def load(
        self, partition: int, upto: dict[str, int], *, with_weights: bool = True
    ) -> dict[str, ScopeSnapshot]:
        """Snapshots of ``upto``'s scopes: events strictly before each scope's given offset."""
        # One registry search finds every cold scope's live alias and retractions; the
        # live versions are then fetched together (one by one, each new scope held every
        # reply of the worker for ~0.3 s more).
        scopes = list(upto)
        models = await self._models(scopes) if with_weights else None
        lives = (
            await asyncio.gather(*(self._live(s, models) for s in scopes))
            if with_weights
            else [(None, None)] * len(scopes)
        )
        snapshots = {
            scope: ScopeSnapshot(weights=weights, published=published, partition=partition)
            for scope, (published, weights) in zip(scopes, lives, strict=True)
        }
        after = {
            s: (snap.published.watermark if snap.published else -1) for s, snap in snapshots.items()
        }
        start, end = min(after.values()) + 1, max(upto.values())
        if start < end:
            # The topic keeps retracted events (Kafka cannot delete one): skip those. The
            # registry records a retraction before it is announced on somna.retractions.
            retracted = {
                (r.scope_id, r.event_id)
                for _, r in await self._read(RETRACTIONS, partition, 0, None, set(upto), Retraction)
            }
            if models is not None:
                from consolidation.retraction_record import retracted_in

                found = [retracted_in(models[s].tags) if s in models else set() for s in scopes]
            elif with_weights:
                found = await asyncio.gather(*(self._retracted(s) for s in scopes))
            else:
                found = [set() for _ in scopes]
            for scope, ids in zip(scopes, found, strict=True):
                retracted |= {(scope, e) for e in ids}
            events = await self._read(INTERACTIONS, partition, start, end, set(upto), Interaction)
            for offset, event in events:
                if (event.scope_id, event.event_id) in retracted:
                    continue
                if after[event.scope_id] < offset < upto[event.scope_id]:
                    snapshots[event.scope_id].events.append((offset, event))
        return snapshots

    async def _retracted(self, scope_id: str) -> set[str]:
        from consolidation.retraction_record import retracted_event_ids

        try:
            return await asyncio.to_thread(
                retracted_event_ids, self.settings.tracking_uri, scope_id
            )
        except Exception as e:  # noqa: BLE001 (the tracking server is down: the topic says)
            log.warning("retracted events of %s from the registry: %s", scope_id, e)
            return set()

    async def _read(
        self,
        topic: str,
        partition: int,
        start: int,
        end: int | None,
        scopes: set[str],
        kind: type[E],
    ) -> list[tuple[int, E]]:
        """Valid events of ``scopes`` with ``start <= offset < end`` (None: the end now)."""
        out: list[tuple[int, E]] = []
        for record in await self.reader.records(topic, partition, start, end, keys=scopes):
            try:
                event = decode(record.value, kind, max_text_bytes=self.settings.max_text_bytes)
            except InvalidEvent:
                continue  # already dead-lettered when it was first consumed
            if event.scope_id == record.key.decode("utf-8", "replace"):
                out.append((record.offset, event))
        return out

    async def close(self) -> None:
        await self.reader.close()
