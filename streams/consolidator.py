"""The consolidation processor: decides when a scope's history is folded into its fast weights.

Per scope it keeps (in a Faust table, so that it survives a restart through the changelog)
the tokens not yet consolidated, the first and last offsets they span in the scope's
partition of ``somna.interactions``, and the last activity. It emits a :class:`SleepJob`
when the pending tokens fill a chunk (``settings.chunk_tokens``) or the scope has been
idle for ``settings.idle_seconds``; at most one job per scope is in flight (contract 6):
the job is cleared by a ``FastWeightsPublished`` with ``watermark >= to_watermark``. A
retraction emits a rebuild job (reason ``"retraction"``) over what was consolidated.

:class:`ConsolidationTracker` is plain Python over a mapping; the Faust glue is in
``streams/worker.py``. Values are replaced, never mutated in place, because a Faust table
writes its changelog only on assignment.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, MutableMapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from streams import metrics
from streams.records import FastWeightsPublished, Interaction, SleepJob

if TYPE_CHECKING:
    import faust

    from infra.settings import Settings
    from streams.app import Topics
    from streams.dead_letters import DeadLetterPolicy
    from streams.gaps import SkipCheck

log = logging.getLogger(__name__)


def count_tokens(event: Interaction) -> int:
    """Tokens the event adds to the scope's memory: its canonical rendering (contract 2)."""
    from model.tokenizer import render_turn  # torch-only package; imported when first needed

    return len(render_turn(event.role, event.text))


def job_id_for(scope_id: str, from_wm: int, to_wm: int, reason: str) -> str:
    """Deterministic, so a job re-emitted after a restart is recognisably the same job."""
    raw = f"{scope_id}\0{from_wm}\0{to_wm}\0{reason}".encode()
    return "job-" + hashlib.sha256(raw).hexdigest()[:24]


@dataclass(frozen=True)
class ScopeProgress:
    pending_tokens: int = 0
    first_offset: int | None = None  # first unconsolidated (and not yet in a job) offset
    last_offset: int = -1  # last interaction offset seen (redeliveries at or below: ignored)
    last_activity: float = 0.0
    consolidated_to: int = -1  # highest watermark published for the scope
    parent_version: str | None = None
    in_flight_job: dict | None = None  # the SleepJob as a dict, until its weights come back
    in_flight_since: float = 0.0
    rebuild_pending: bool = False


class ConsolidationTracker:
    def __init__(
        self,
        table: MutableMapping[str, dict],
        *,
        chunk_tokens: int,
        idle_seconds: float,
        passes: int,
        retry_seconds: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.table = table
        self.chunk_tokens = chunk_tokens
        self.idle_seconds = idle_seconds
        self.passes = passes
        # A job whose fast weights never came back (a sleep worker died, or deferred it
        # because its events were not readable yet) is sent again after this long; a
        # resent job has the same id, so it never yields a second version.
        self.retry_seconds = retry_seconds
        self.clock = clock

    def progress(self, scope_id: str) -> ScopeProgress:
        raw = self.table.get(scope_id)
        return ScopeProgress(**raw) if raw else ScopeProgress()

    def _save(self, scope_id: str, p: ScopeProgress) -> None:
        row = asdict(p)
        # A table write is a changelog record: the idle timer looks at every scope each
        # tick and changes almost none (100 scopes every 0.75 s in `somna bench swap`).
        if self.table.get(scope_id) != row:
            self.table[scope_id] = row

    def on_interaction(self, event: Interaction, offset: int, tokens: int) -> SleepJob | None:
        p = self.progress(event.scope_id)
        if offset <= p.last_offset:
            return None  # redelivered after a restart: already counted
        p = replace(
            p,
            pending_tokens=p.pending_tokens + tokens,
            first_offset=offset if p.first_offset is None else p.first_offset,
            last_offset=offset,
            last_activity=self.clock(),
        )
        return self._maybe_emit(event.scope_id, p)

    def on_fast_weights(self, published: FastWeightsPublished) -> SleepJob | None:
        p = self.progress(published.scope_id)
        p = replace(
            p,
            consolidated_to=max(p.consolidated_to, published.watermark),
            parent_version=published.version,
        )
        job = p.in_flight_job
        if job is not None and published.watermark >= job["to_watermark"]:
            p = replace(p, in_flight_job=None, in_flight_since=0.0)
        return self._maybe_emit(published.scope_id, p)

    def on_retraction(self, scope_id: str) -> SleepJob | None:
        p = replace(self.progress(scope_id), rebuild_pending=True)
        return self._maybe_emit(scope_id, p)

    def due(self) -> list[SleepJob]:
        """Jobs owed to idle scopes, and in-flight jobs to send again; called by a timer."""
        now, jobs = self.clock(), []
        for scope_id in list(self.table.keys()):
            p = self.progress(scope_id)
            if p.in_flight_job is not None and now - p.in_flight_since >= self.retry_seconds:
                self._save(scope_id, replace(p, in_flight_since=now))
                jobs.append(SleepJob(**p.in_flight_job))
                continue
            idle = p.pending_tokens > 0 and now - p.last_activity >= self.idle_seconds
            job = self._maybe_emit(scope_id, p, idle=idle)
            if job is not None:
                jobs.append(job)
        return jobs

    def _maybe_emit(
        self, scope_id: str, p: ScopeProgress, *, idle: bool = False
    ) -> SleepJob | None:
        job = None
        if p.in_flight_job is None:
            if p.rebuild_pending:
                job, p = self._rebuild_job(scope_id, p)
            elif p.first_offset is not None and (p.pending_tokens >= self.chunk_tokens or idle):
                reason = "chunk_full" if p.pending_tokens >= self.chunk_tokens else "idle"
                job = self._job(scope_id, p.first_offset, p.last_offset, reason, p.parent_version)
                p = replace(p, pending_tokens=0, first_offset=None)
            if job is not None:
                p = replace(p, in_flight_job=job.model_dump(), in_flight_since=self.clock())
                metrics.SLEEP_JOBS.labels(reason=job.reason).inc()
        self._save(scope_id, p)
        return job

    def _rebuild_job(
        self, scope_id: str, p: ScopeProgress
    ) -> tuple[SleepJob | None, ScopeProgress]:
        p = replace(p, rebuild_pending=False)
        if p.consolidated_to < 0:
            # Nothing consolidated yet: the event is only in the agent's buffer, which the
            # agent drops itself; the next chunk job reads the purged history.
            return None, p
        # Rebuild from the base (parent None) over everything consolidated so far.
        return self._job(scope_id, 0, p.consolidated_to, "retraction", None), p

    def _job(
        self, scope_id: str, first: int, last: int, reason: str, parent: str | None
    ) -> SleepJob:
        return SleepJob(
            job_id=job_id_for(scope_id, first, last, reason),
            scope_id=scope_id,
            from_watermark=first,
            to_watermark=last,
            parent_version=parent,
            passes=self.passes,
            reason=reason,  # type: ignore[arg-type]
        )


# --- the Faust glue ----------------------------------------------------------------------

TABLE_NAME = "somna-consolidation"


class ChangelogReady:
    """Until the App's producer knows the table's changelog topic, writing the table fails.

    Faust creates the changelog at start, after its producer fetched the cluster's
    metadata, and partitions a table write by key with that metadata (refreshed every
    5 min): a write before it knows the new topic raised TypeError, and the consolidator's
    agents crashed in a loop, emitting no sleep job for minutes (seen in `somna bench
    swap`). So the agents and the idle timer wait until the producer has it.
    """

    def __init__(self, app: faust.App, table: faust.TableT) -> None:
        self._app = app
        self._topic = table.changelog_topic.get_topic_name()
        self._task: asyncio.Task | None = None

    async def wait(self, timeout: float | None = None) -> bool:
        """Whether the producer knows the topic (waiting at most ``timeout`` s for it)."""
        if self._task is None or (self._task.done() and self._task.exception() is not None):
            self._task = asyncio.create_task(self._refresh())  # first, or after a failure
        if not self._task.done():
            await asyncio.wait([self._task], timeout=timeout)
        return self._task.done() and self._task.result()

    async def _refresh(self) -> bool:
        # Faust has no public handle on its aiokafka producer; partitions_for refreshes
        # the metadata until the topic is in it.
        log.info("waiting for the producer to know %s", self._topic)
        producer = self._app.producer._ensure_producer()
        await producer.partitions_for(self._topic)
        log.info("the producer knows %s", self._topic)
        return True


def install(
    app: faust.App, topics: Topics, dlq: DeadLetterPolicy, skips: SkipCheck, settings: Settings
) -> ConsolidationTracker:
    """Three agents (interactions, fast-weights, retractions) and an idle timer over one table.

    The table is keyed by scope and uses the producer's partitioner for its changelog, so a
    scope's row lands in the same partition number as its events, and the idle timer can
    write it from outside a stream.
    """
    import faust

    from streams.records import Retraction

    table = app.Table(
        TABLE_NAME,
        default=None,
        partitions=settings.partitions,
        schema=faust.Schema(key_type=str, key_serializer="raw", value_serializer="json"),
        use_partitioner=True,
    )
    tracker = ConsolidationTracker(
        table,
        chunk_tokens=settings.chunk_tokens,
        idle_seconds=settings.idle_seconds,
        passes=settings.sleep_passes,
        retry_seconds=settings.sleep_job_retry_seconds,
    )

    async def emit(job: SleepJob | None) -> None:
        if job is not None:
            await topics.sleep_jobs.send(key=job.scope_id.encode(), value=job.to_bytes())
            log.info(
                "sleep job %s for %s: offsets %d..%d (%s)",
                job.job_id,
                job.scope_id,
                job.from_watermark,
                job.to_watermark,
                job.reason,
            )

    consumed = [topics.interactions, topics.fast_weights, topics.retractions]
    check = skips.role("consolidator", [t.get_topic_name() for t in consumed])
    changelog = ChangelogReady(app, table)

    def consumer(topic: faust.TopicT, kind: type, handle: Callable) -> None:
        policy = dlq.claim(topic.get_topic_name())

        async def agent(stream: faust.StreamT) -> None:
            await changelog.wait()
            async for ev in stream.events():
                msg = ev.message
                metrics.EVENTS.labels(role="consolidator", topic=msg.topic).inc()
                for r in await check.skipped(msg.topic, msg.partition, msg.offset):
                    skipped = await policy.decode_record(r, kind)
                    if skipped is not None:
                        await emit(handle(skipped, r.offset))
                event = await policy.decode_event(ev, kind)
                if event is not None:
                    await emit(handle(event, msg.offset))

        app.agent(topic, name=f"somna-consolidator-{topic.get_topic_name()}")(agent)

    consumer(
        topics.interactions,
        Interaction,
        lambda e, offset: tracker.on_interaction(e, offset, count_tokens(e)),
    )
    consumer(topics.fast_weights, FastWeightsPublished, lambda e, _o: tracker.on_fast_weights(e))
    consumer(topics.retractions, Retraction, lambda e, _o: tracker.on_retraction(e.scope_id))

    @app.timer(interval=max(0.2, min(settings.idle_seconds / 4, 5.0)))
    async def idle_scopes() -> None:
        if not await changelog.wait(timeout=0.0):
            return
        for job in tracker.due():
            await emit(job)

    return tracker
