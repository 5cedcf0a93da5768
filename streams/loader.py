"""Rebuilding a scope's memory when it is not in the agent's LRU (new worker, eviction).

A scope's memory is its live fast weights (S up to a watermark W, from MLflow alias
``live``) plus its interaction events after W, read back from ``somna.interactions`` by
offset: the same partition the agent consumes, so they are exactly the events that were
not consolidated (invariant 1). One pass over the partition serves every scope of a batch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.settings import Settings
from infra.topics import INTERACTIONS, RETRACTIONS
from streams.engine import ScopeSnapshot
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
E = TypeVar("E", bound=Event)


class ScopeLoader:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def fetch_weights(self, published: FastWeightsPublished) -> Any | None:
        """Download and verify (sha256, scope) an artifact; None if it is refused."""
        from consolidation.exceptions import ArtifactRejected
        from consolidation.registry import load_fast_weights

        try:
            return await asyncio.to_thread(
                load_fast_weights, self.settings.tracking_uri, published, published.scope_id
            )
        except ArtifactRejected as e:
            log.error("refused fast weights %s v%s: %s", published.scope_id, published.version, e)
            return None
        except Exception as e:  # the tracking server is down or slow: keep serving what we have
            log.error(
                "could not fetch fast weights %s v%s: %s", published.scope_id, published.version, e
            )
            return None

    async def is_live(self, published: FastWeightsPublished) -> bool:
        """Whether the registry's ``live`` alias of the scope is ``published`` now."""
        from consolidation.registry import latest_live

        try:
            live = await asyncio.to_thread(
                latest_live, self.settings.tracking_uri, published.scope_id
            )
        except Exception as e:  # noqa: BLE001 (the tracking server is down: keep serving)
            log.error("live fast weights of %s: %s", published.scope_id, e)
            return False
        return live is not None and live.version == published.version

    async def _live(self, scope_id: str) -> tuple[FastWeightsPublished | None, Any | None]:
        from consolidation.registry import latest_live

        for attempt in range(LIVE_ATTEMPTS):
            try:
                published = await asyncio.to_thread(
                    latest_live, self.settings.tracking_uri, scope_id
                )
                break
            except Exception as e:  # noqa: BLE001 (any failure of the tracking server)
                log.warning(
                    "live fast weights of %s: attempt %d failed: %s", scope_id, attempt + 1, e
                )
                await asyncio.sleep(2.0 * (attempt + 1))
        else:
            # Without the registry, memory is rebuilt from the scope's whole retained log.
            log.error("tracking server unreachable: %s reloads from its events only", scope_id)
            return None, None
        if published is None:
            return None, None
        weights = await self.fetch_weights(published)
        return (published, weights) if weights is not None else (None, None)

    async def load(
        self, partition: int, upto: dict[str, int], *, with_weights: bool = True
    ) -> dict[str, ScopeSnapshot]:
        """Snapshots of ``upto``'s scopes: events strictly before each scope's given offset."""
        snapshots: dict[str, ScopeSnapshot] = {}
        for scope in upto:
            published, weights = await self._live(scope) if with_weights else (None, None)
            snapshots[scope] = ScopeSnapshot(
                weights=weights, published=published, partition=partition
            )
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
            if with_weights:
                for scope in upto:
                    retracted |= {(scope, e) for e in await self._retracted(scope)}
            events = await self._read(INTERACTIONS, partition, start, end, set(upto), Interaction)
            for offset, event in events:
                if (event.scope_id, event.event_id) in retracted:
                    continue
                if after[event.scope_id] < offset < upto[event.scope_id]:
                    snapshots[event.scope_id].events.append((offset, event))
        return snapshots

    async def _retracted(self, scope_id: str) -> set[str]:
        from consolidation.registry import retracted_event_ids

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
        tp = TopicPartition(topic, partition)
        out: list[tuple[int, E]] = []
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
                    key = record.key.decode("utf-8", "replace") if record.key else None
                    if key not in scopes:
                        continue
                    try:
                        event = decode(
                            record.value, kind, max_text_bytes=self.settings.max_text_bytes
                        )
                    except InvalidEvent:
                        continue  # already dead-lettered when it was first consumed
                    if event.scope_id == key:
                        out.append((record.offset, event))
        return out

    async def _get_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self.settings.bootstrap,
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
