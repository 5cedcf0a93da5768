"""From a request (a sleep job, a retraction, a rebuild) to a :class:`SleepTask`, or to the
version that already answers it.

The rules, per scope:
- a job that already registered a version (found by its ``job_id`` tag) is not slept
  again: its version is published again (crash between register and commit);
- a job whose range the live version already covers is stale: live is published again;
- otherwise the sleep starts from the live version (same base model) and folds in every
  remembered turn after its watermark up to the job's ``to_watermark``, chunked
  deterministically (``turns.chunk_turns``), retracted events left out;
- a rebuild starts from a snapshot (zeros for a whole-history rebuild, the last version
  before a retracted event for a retraction) and replays the history after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from consolidation import fast_weights, fast_weights_load, retraction_record
from consolidation.base_model import BaseModel
from consolidation.batch import SleepTask
from consolidation.exceptions import HistoryError
from consolidation.fast_weights import Lineage
from consolidation.turns import TopicReader, Turn, chunk_turns, partition_for, scope_turns
from infra.settings import Settings
from streams.records import FastWeightsPublished, SleepJob

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)


@dataclass
class Plan:
    scope_id: str
    task: SleepTask | None = None
    done: FastWeightsPublished | None = None  # nothing to sleep: publish this again
    outcome: str = "slept"


def stable_id(prefix: str, *parts: object) -> str:
    raw = "\0".join(str(p) for p in parts).encode()
    return f"{prefix}-{hashlib.sha256(raw).hexdigest()[:24]}"


def _chunks(turns: list[Turn], chunk_tokens: int) -> list[list[int]]:
    return [
        [tok for t in chunk for tok in t.tokens()] for chunk in chunk_turns(turns, chunk_tokens)
    ]


def _lineage_chain(uri: str, scope_id: str, live: FastWeightsPublished) -> list[dict[str, str]]:
    """Tags of the live version and its ancestors (newest first), following parent_version."""
    by_version = {
        str(mv.version): dict(mv.tags, version=str(mv.version))
        for mv in fast_weights.list_versions(uri, scope_id)
    }
    chain, v = [], live.version
    while v and v in by_version and len(chain) <= len(by_version):
        chain.append(by_version[v])
        v = by_version[v].get("parent_version", "")
    return chain


async def plan_job(
    settings: Settings,
    base: BaseModel,
    job: SleepJob,
    partition: int | None,
    reader: TopicReader | None = None,
    *,
    retracted: set[str] | None = None,
) -> Plan:
    """``retracted``: the scope's retracted event ids when the caller read them already
    (the sleep worker reads a whole wave's at once); None looks them up."""
    uri = settings.tracking_uri
    scope = job.scope_id
    existing = await asyncio.to_thread(fast_weights.find_version_by_job, uri, scope, job.job_id)
    live_mv = await asyncio.to_thread(fast_weights.live_version, uri, scope)
    live = None if live_mv is None else fast_weights.published(live_mv)
    if existing is not None:
        pub = fast_weights.published(existing)
        if live is None or live.watermark < pub.watermark:
            pub = await asyncio.to_thread(fast_weights.set_live, uri, scope, pub.version)
        return Plan(
            scope,
            done=pub if live is None or pub.watermark >= live.watermark else live,
            outcome="retried",
        )
    rebuild = job.reason in ("retraction", "rebuild")
    if retracted is None:
        retracted = await asyncio.to_thread(retraction_record.retracted_event_ids, uri, scope)
    if live is not None and live.watermark >= job.to_watermark:
        tags = live_mv.tags
        applied = tags.get("retractions_applied", "0") == str(len(retracted))
        if not rebuild or (applied and tags.get("base_model_version") == base.version):
            return Plan(scope, done=live, outcome="stale")
    parent = None if rebuild else live
    if parent is not None and parent.base_model_version != base.version:
        log.info("scope %s: live v%s is of base v%s, replaying from zeros on v%s",
                 scope, parent.version, parent.base_model_version, base.version)  # fmt: skip
        parent = None
    lo = parent.watermark + 1 if parent else 0
    tail_floor = lo if parent or rebuild else job.from_watermark
    turns = await scope_turns(
        history_dir=settings.history_dir, reader=reader, scope_id=scope,
        partition=partition, lo=lo, hi=job.to_watermark, retracted=retracted, tail_floor=tail_floor,
    )  # fmt: skip
    if not rebuild and job.to_watermark not in {t.offset for t in turns}:
        raise HistoryError(
            f"job {job.job_id}: event at offset {job.to_watermark} of scope {scope!r} is neither "
            "in the history nor on the topic yet"
        )
    return Plan(scope, task=await _task(
        settings, base, scope, job.job_id, parent, live, turns, lo, job.to_watermark,
        job.reason, len(retracted), registered=live_mv,
    ))  # fmt: skip


async def _task(
    settings: Settings,
    base: BaseModel,
    scope: str,
    job_id: str,
    parent: FastWeightsPublished | None,
    replaces: FastWeightsPublished | None,
    turns: list[Turn],
    lo: int,
    hi: int,
    reason: str,
    retractions_applied: int,
    extra: dict[str, str] | None = None,
    *,
    registered: ModelVersion | None = None,
) -> SleepTask:
    """``registered``: the registry's record of ``parent`` when the caller read it already
    (checked the same way, without a second request)."""
    weights = None
    if parent is not None:
        fw = await asyncio.to_thread(
            fast_weights_load.load_fast_weights, settings.tracking_uri, parent, scope,
            registered=registered,
        )  # fmt: skip
        weights = fw.tensors
    chunks = _chunks(turns, settings.chunk_tokens)
    lineage = Lineage(
        scope_id=scope, job_id=job_id, parent_version=parent.version if parent else None,
        base_model_version=base.version, from_watermark=lo, to_watermark=hi,
        passes=settings.sleep_passes, tokens=sum(map(len, chunks)), reason=reason,
    )  # fmt: skip
    tags = {
        "replaces_version": replaces.version if replaces else "",
        "retractions_applied": str(retractions_applied),
        "chunks": str(len(chunks)),
        "events": str(len(turns)),
        **(extra or {}),
    }
    return SleepTask(lineage=lineage, chunks=chunks, parent_weights=weights, extra_tags=tags)


async def plan_rebuild(
    settings: Settings,
    base: BaseModel,
    scope: str,
    *,
    partition: int | None = None,
    retracted_event: str | None = None,
    retracted_offset: int | None = None,
    reader: TopicReader | None = None,
) -> Plan:
    """Replay a scope's history after a snapshot: zeros for a whole-history rebuild, or the
    last version in the live lineage whose watermark is before ``retracted_offset``."""
    uri = settings.tracking_uri
    live = await asyncio.to_thread(fast_weights.latest_live, uri, scope)
    if live is None:
        return Plan(scope, outcome="nothing consolidated")
    if (
        retracted_event is not None
        and retracted_offset is not None
        and retracted_offset > live.watermark
    ):
        return Plan(scope, done=None, outcome="not consolidated yet")
    if retracted_event is not None:
        job_id = stable_id("retract", scope, retracted_event)
        reason = "retraction"
    else:
        job_id = stable_id("rebuild", scope, base.version, live.version)
        reason = "rebuild"
    existing = await asyncio.to_thread(fast_weights.find_version_by_job, uri, scope, job_id)
    if existing is not None:
        return Plan(scope, done=fast_weights.published(existing), outcome="retried")
    snapshot = None
    if retracted_event is not None and retracted_offset is not None:
        chain = await asyncio.to_thread(_lineage_chain, uri, scope, live)
        for tags in chain:  # newest first
            if (
                int(tags["watermark"]) < retracted_offset
                and tags["base_model_version"] == base.version
            ):
                snapshot = fast_weights.published_from_tags(tags["version"], tags)
                break
    retracted = await asyncio.to_thread(retraction_record.retracted_event_ids, uri, scope)
    lo = snapshot.watermark + 1 if snapshot else 0
    if partition is None and reader is not None:
        partition = partition_for(scope, settings.partitions)
    turns = await scope_turns(
        history_dir=settings.history_dir, reader=reader, scope_id=scope,
        partition=partition, lo=lo, hi=live.watermark, retracted=retracted, tail_floor=lo,
    )  # fmt: skip
    if not turns and live.watermark >= lo:
        # Wrong data dir or a history that was lost: replaying nothing would wipe the memory.
        raise HistoryError(
            f"no history of scope {scope!r} in offsets {lo}..{live.watermark} under "
            f"{settings.history_dir} or on the topic: refusing to rebuild it empty"
        )
    extra = {"retracted_event_id": retracted_event} if retracted_event else {}
    task = await _task(
        settings, base, scope, job_id, snapshot, live, turns, lo, live.watermark, reason,
        len(retracted), extra,
    )  # fmt: skip
    return Plan(scope, task=task, outcome=reason)
