"""Retraction and rebuild (invariant 3: S is a pure function of the retained history).

A retraction of event E of scope X:
1. purges E's text from the Parquet history (``purge.purge_event``: the files that hold it
   are rewritten, nothing else lost);
2. records E on X's registered model, so every later sleep leaves it out even where it
   still reads the Kafka log;
3. rebuilds X's fast weights from the last version of the live lineage whose watermark is
   before E, replaying the history after it without E (deterministic chunking), registers
   the result (reason ``retraction``, tagged with E) and moves ``live`` to it.

``rebuild`` replays a scope's whole history from zeros (after a base model upgrade, say).
Both are idempotent: the job id is derived from what they do, so a retry finds the version.

A retraction of an event that never existed (in neither the history nor the scope's
partition of ``somna.interactions`` up to the live watermark) only leaves its tombstone:
it is logged and counted, and nothing is rebuilt, registered or published. (``retract``
still announces it on ``somna.retractions``: an event not consolidated yet may sit in an
agent's buffer.)
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from prometheus_client import Counter

from consolidation import blobs, fast_weights, metrics, retraction_record
from consolidation.base_model import BaseModel, ensure_base_model
from consolidation.batch import run_batch
from consolidation.planner import Plan, plan_rebuild, stable_id
from consolidation.purge import PurgeResult, purge_event
from consolidation.turns import TopicReader, partition_for
from infra.settings import Settings
from streams.records import FastWeightsPublished

log = logging.getLogger(__name__)

UNKNOWN_EVENT = "unknown event"
UNKNOWN_RETRACTIONS = Counter(
    "somna_retractions_unknown_total", "Retractions of events never seen (nothing rebuilt)"
)


@dataclass
class RetractionResult:
    purge: PurgeResult
    outcome: str
    published: FastWeightsPublished | None


async def _execute(
    settings: Settings, base: BaseModel, plan: Plan, device: str | None
) -> FastWeightsPublished | None:
    if plan.task is None:
        return plan.done
    # A local copy of the artifact, as a sleep batch keeps: the agent swaps it without a
    # download (it still checks the registry and the sha256).
    published, _ = await asyncio.to_thread(
        run_batch, settings.tracking_uri, base, [plan.task],
        passes=settings.sleep_passes, device=device, run_name=plan.outcome,
        blob_root=blobs.root(settings.data_dir),
    )  # fmt: skip
    return published[0]


async def apply(
    settings: Settings,
    base: BaseModel,
    scope_id: str,
    event_id: str,
    reason: str = "",
    *,
    partition: int | None = None,
    device: str | None = None,
    reader: TopicReader | None = None,
) -> RetractionResult:
    """Record, purge, rebuild. Returns what to publish (None when nothing was consolidated)."""
    # Record first: the history writer consults the registry, so once the tombstone is
    # there no later write can put the row back after the purge below.
    await asyncio.to_thread(
        retraction_record.record_retraction, settings.tracking_uri, scope_id, event_id, reason
    )
    purge = await asyncio.to_thread(purge_event, settings.history_dir, scope_id, event_id)
    partition = partition if partition is not None else purge.partition
    offset = purge.offset
    if offset is None:
        found, offset = await _locate(settings, scope_id, event_id, partition, reader)
        if not found:
            UNKNOWN_RETRACTIONS.inc()
            log.warning(
                "retraction of %s of %s: not in the history nor in the consolidated range "
                "of the topic; tombstone recorded, nothing rebuilt", event_id, scope_id,
            )  # fmt: skip
            return RetractionResult(purge=purge, outcome=UNKNOWN_EVENT, published=None)
    plan = await plan_rebuild(
        settings, base, scope_id, partition=partition,
        retracted_event=event_id, retracted_offset=offset, reader=reader,
    )  # fmt: skip
    published = await _execute(settings, base, plan, device)
    metrics.RETRACTIONS.inc()
    log.info(
        "retracted %s of %s: %d row(s) purged from %d file(s); %s%s",
        event_id, scope_id, purge.rows_removed, len(purge.files_rewritten), plan.outcome,
        f" -> v{published.version}" if published else "",
    )  # fmt: skip
    return RetractionResult(purge=purge, outcome=plan.outcome, published=published)


async def _locate(
    settings: Settings,
    scope_id: str,
    event_id: str,
    partition: int | None,
    reader: TopicReader | None,
) -> tuple[bool, int | None]:
    """For an event the history does not hold: (whether a rebuild may be due, its offset).

    The history may lack it because this retraction was applied before (the job id finds
    the version), because the history worker purged it first, or because it was never
    flushed: then the topic has it, up to the live watermark. Beyond the watermark it is
    not consolidated, so there is nothing to rebuild either way."""
    uri = settings.tracking_uri
    job_id = stable_id("retract", scope_id, event_id)
    if await asyncio.to_thread(fast_weights.find_version_by_job, uri, scope_id, job_id) is not None:
        return True, None  # plan_rebuild answers "retried"
    live = await asyncio.to_thread(fast_weights.latest_live, uri, scope_id)
    if live is None:
        return True, None  # plan_rebuild answers "nothing consolidated"
    if reader is None:  # the history is the only source here, and it has no such event
        return False, None
    if partition is None:
        partition = partition_for(scope_id, settings.partitions)
    turns = await reader.read(scope_id, partition, 0, live.watermark)
    offsets = [t.offset for t in turns if t.event_id == event_id]
    return (True, offsets[0]) if offsets else (False, None)


async def rebuild_async(
    settings: Settings,
    base: BaseModel,
    scope_id: str,
    *,
    partition: int | None = None,
    device: str | None = None,
    reader: TopicReader | None = None,
) -> FastWeightsPublished | None:
    plan = await plan_rebuild(settings, base, scope_id, partition=partition, reader=reader)
    return await _execute(settings, base, plan, device)


# --- synchronous entry points (CLI, tests) --------------------------------------------------


def retract(
    settings: Settings, scope_id: str, event_id: str, reason: str = "", *, publish: bool = True
) -> RetractionResult:
    """Apply a retraction in this process, publish the rebuilt version, and announce the
    retraction on ``somna.retractions`` so agents drop the event from their buffers (a sleep
    worker that sees it too finds the work done)."""
    from consolidation.publish import publish as publish_events
    from streams.records import Retraction, now

    async def main() -> RetractionResult:
        base = await asyncio.to_thread(ensure_base_model, settings.tracking_uri)
        reader = await TopicReader(settings.bootstrap).start()
        try:
            result = await apply(settings, base, scope_id, event_id, reason, reader=reader)
        finally:
            await reader.stop()
        if publish:
            if result.published is not None:
                await publish_events(settings.bootstrap, [result.published])
            await _announce(
                settings.bootstrap,
                Retraction(scope_id=scope_id, event_id=event_id, reason=reason, ts=now()),
            )
        return result

    return asyncio.run(main())


def rebuild(
    settings: Settings, scope_id: str, *, publish: bool = True
) -> FastWeightsPublished | None:
    """Replay the scope's whole history on the production base model; publish the result."""
    from consolidation.publish import publish as publish_events

    async def main() -> FastWeightsPublished | None:
        base = await asyncio.to_thread(ensure_base_model, settings.tracking_uri)
        reader = await TopicReader(settings.bootstrap).start()
        try:
            published = await rebuild_async(settings, base, scope_id, reader=reader)
        finally:
            await reader.stop()
        if publish and published is not None:
            await publish_events(settings.bootstrap, [published])
        return published

    return asyncio.run(main())


async def _announce(bootstrap: str, event) -> None:
    from consolidation.publish import make_producer
    from infra.topics import RETRACTIONS

    producer = make_producer(bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            RETRACTIONS, key=event.scope_id.encode("utf-8"), value=event.to_bytes()
        )
    finally:
        await producer.stop()
