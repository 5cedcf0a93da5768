"""The outside checker: reads what Somna produced, never asks Somna how it went.

:class:`TopicTail` follows the output topics from the beginning in a background thread
(its own consumer, no group, nothing committed). :func:`check` compares what the load
generator sent with the replies, the dead letters, the fast-weight announcements and the
Parquet history, and counts what was lost, duplicated, misrouted and dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from infra.topics import DEAD_LETTERS, FAST_WEIGHTS, REPLIES, SLEEP_JOBS

from .load import Sent

OBSERVED = (REPLIES, DEAD_LETTERS, FAST_WEIGHTS, SLEEP_JOBS)


@dataclass
class Seen:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: dict | None  # None when the payload is not a JSON object
    received_at: float


class TopicTail:
    """Every record of ``topics`` since the beginning, kept in memory (chaos loads are small)."""

    def __init__(self, bootstrap: str, topics: tuple[str, ...] = OBSERVED) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self._records: dict[str, list[Seen]] = defaultdict(list)
        self._seen: set[tuple[str, int, int]] = set()  # a reconnect must not count twice
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> TopicTail:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def records(self, topic: str) -> list[Seen]:
        with self._lock:
            return list(self._records[topic])

    async def _run(self) -> None:
        while not self._stop.is_set():
            consumer = AIOKafkaConsumer(
                *self.topics,
                bootstrap_servers=self.bootstrap,
                group_id=None,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                fetch_max_bytes=64 * 1024 * 1024,
                max_partition_fetch_bytes=32 * 1024 * 1024,
            )
            try:
                await consumer.start()
                await self._consume(consumer)
            except Exception:  # the broker is down on purpose now and then: start over
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        # Resume after what we already hold, so a reconnect never double-counts.
        with self._lock:
            done = {
                (s.topic, s.partition): s.offset for recs in self._records.values() for s in recs
            }
        positioned = False
        while not self._stop.is_set():
            if not positioned and consumer.assignment():
                for tp in consumer.assignment():
                    if (tp.topic, tp.partition) in done:
                        consumer.seek(tp, done[(tp.topic, tp.partition)] + 1)
                positioned = True
            batches = await consumer.getmany(timeout_ms=500)
            now = time.time()
            with self._lock:
                for tp, msgs in batches.items():
                    for m in msgs:
                        if (tp.topic, tp.partition, m.offset) in self._seen:
                            continue
                        self._seen.add((tp.topic, tp.partition, m.offset))
                        self._records[tp.topic].append(
                            Seen(
                                tp.topic, tp.partition, m.offset, _text(m.key), _json(m.value), now
                            )
                        )


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


def _json(raw: bytes | None) -> dict | None:
    try:
        obj = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def history_rows(history_dir: Path) -> list[dict]:
    """All rows of the Parquet history (contract 4), through the streams reader."""
    from streams.history import read_history

    for _ in range(3):  # a file may be replaced between listing and reading: read again
        try:
            return read_history(history_dir).to_pylist()
        except (FileNotFoundError, OSError):
            time.sleep(0.5)
    return read_history(history_dir).to_pylist()


# --- the verdict -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """One row of the chaos table."""

    scenario: str
    sent: int = 0
    lost: int = 0
    duplicated: int = 0
    misrouted: int = 0
    dead_lettered: int = 0
    recover_s: float | None = None  # fault end -> first new reply
    recover_fast_weights_s: float | None = None  # fault end -> first new fast-weights version
    recover_history_s: float | None = None  # fault end -> first Parquet file written after it
    restarts: int = 0  # parts that died on their own and the harness restarted
    send_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def check(
    outcome: Outcome,
    tail: TopicTail,
    history_dir: Path,
    turns: list[Sent],
    *,
    scopes: set[str],
    other_sent: list[Sent] = (),
    forged_versions: set[str] = frozenset(),
    fault_end: float | None = None,
) -> Outcome:
    """Fill ``outcome`` from the outside view of the user ``turns`` of one scenario."""
    replies = [r for r in tail.records(REPLIES) if r.value is not None]
    by_event: dict[str, list[dict]] = defaultdict(list)
    for r in replies:
        by_event[r.value.get("event_id")].append(r.value)
    rows = history_rows(history_dir)
    hist_in: dict[str, list[dict]] = defaultdict(list)
    hist_out: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        (hist_in if row["kind"] == "interaction" else hist_out)[row["event_id"]].append(row)

    lost, dup, strict_dup, misrouted = set(), set(), set(), set()
    no_reply = no_history = 0
    for t in turns:
        reps, ins = by_event.get(t.event_id, []), hist_in.get(t.event_id, [])
        if not reps:
            no_reply += 1
        if not ins:
            no_history += 1
        if not reps or not ins:
            lost.add(t.event_id)
        # Invariant 4: one interaction row, one reply_id. A redelivered reply is allowed on
        # the topic, but the history should still hold it once (counted, not asserted).
        if len(ins) > 1 or len({r.get("reply_id") for r in reps}) > 1:
            dup.add(t.event_id)
            strict_dup.add(t.event_id)
        if len(hist_out.get(t.event_id, [])) > 1:
            dup.add(t.event_id)
        if any(
            x.get("scope_id") != t.scope_id for x in (*reps, *ins, *hist_out.get(t.event_id, []))
        ):
            misrouted.add(t.event_id)

    # A fast-weights version served to a scope must be one announced for that very scope,
    # and never one of the forgeries.
    genuine: dict[str, set[str]] = defaultdict(set)
    for p in tail.records(FAST_WEIGHTS):
        if p.value and p.value.get("version") not in forged_versions:
            genuine[p.value.get("scope_id")].add(str(p.value.get("version")))
    wrong_weights = [
        r.value
        for r in replies
        if r.value.get("scope_id") in scopes
        and r.value.get("fast_weights_version") is not None
        and (
            str(r.value["fast_weights_version"]) not in genuine[r.value["scope_id"]]
            or r.value["fast_weights_version"] in forged_versions
        )
    ]
    misrouted |= {r.get("event_id") for r in wrong_weights}

    ours = {(s.topic, s.partition, s.offset) for s in (*turns, *other_sent)}
    letters = [
        d.value
        for d in tail.records(DEAD_LETTERS)
        if d.value
        and (d.value.get("source_topic"), d.value.get("partition"), d.value.get("offset")) in ours
    ]

    outcome.sent = len(turns) + len(other_sent)
    outcome.lost = len(lost)
    outcome.duplicated = len(dup)
    outcome.misrouted = len(misrouted)
    outcome.dead_lettered = len(letters)
    outcome.details.update(
        turns=len(turns),
        no_reply=no_reply,
        no_history=no_history,
        wrong_fast_weights=len(wrong_weights),
        dead_letter_reasons=sorted({str(d.get("error"))[:80] for d in letters}),
        lost_examples=sorted(lost)[:5],
        two_rows_or_two_reply_ids=len(strict_dup),
        # At-least-once redelivery, allowed: the same reply_id more than once.
        replies_redelivered=sum(1 for t in turns if len(by_event.get(t.event_id, [])) > 1),
        reply_rows_repeated=sum(1 for t in turns if len(hist_out.get(t.event_id, [])) > 1),
    )
    if fault_end is not None:
        outcome.recover_s = _first_after(
            [r.value.get("ts") for r in replies if r.value.get("scope_id") in scopes], fault_end
        )
        outcome.recover_fast_weights_s = _first_after(
            [
                p.received_at
                for p in tail.records(FAST_WEIGHTS)
                if p.value
                and p.value.get("scope_id") in scopes
                and p.value.get("version") not in forged_versions
            ],
            fault_end,
        )
        outcome.recover_history_s = _first_after(_mtimes(history_dir), fault_end)
    return outcome


def _mtimes(history_dir: Path) -> list[float]:
    # A later merge may replace the first file written after the fault: an upper bound.
    times = []
    for path in history_dir.rglob("*.parquet"):
        with contextlib.suppress(OSError):
            times.append(path.stat().st_mtime)
    return times


def _first_after(times: list[float | None], start: float) -> float | None:
    after = [t for t in times if t is not None and t >= start]
    return round(min(after) - start, 2) if after else None


def complete(tail: TopicTail, history_dir: Path, turns: list[Sent]) -> tuple[int, int]:
    """(turns without a reply, turns without a history row): both 0 when all is through."""
    replied = {r.value.get("event_id") for r in tail.records(REPLIES) if r.value}
    stored = {r["event_id"] for r in history_rows(history_dir) if r["kind"] == "interaction"}
    ids = {t.event_id for t in turns}
    return len(ids - replied), len(ids - stored)


def wait_complete(
    tail: TopicTail, history_dir: Path, turns: list[Sent], timeout: float, poll: float = 2.0
) -> tuple[int, int]:
    """Wait until every turn has a reply and a history row, or ``timeout`` seconds."""
    deadline = time.time() + timeout
    missing = complete(tail, history_dir, turns)
    while missing != (0, 0) and time.time() < deadline:
        time.sleep(poll)
        missing = complete(tail, history_dir, turns)
    return missing


def registry_audit(tracking_uri: str, scopes: set[str]) -> dict:
    """What the MLflow registry holds for ``scopes``: versions per scope, versions whose
    lineage names another scope (misrouted), and jobs that registered two versions."""
    from mlflow import MlflowClient

    from consolidation.fast_weights import fast_weights_model_name

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    versions = wrong_scope = retraction_versions = 0
    jobs: dict[str, int] = defaultdict(int)
    for scope in sorted(scopes):
        name = fast_weights_model_name(scope)
        for mv in client.search_model_versions(f"name = '{name}'"):
            versions += 1
            if mv.tags.get("scope_id") != scope:
                wrong_scope += 1
            jobs[mv.tags.get("job_id", "?")] += 1
            retraction_versions += mv.tags.get("reason") == "retraction"
    return {
        "registered_versions": versions,
        "registered_for_wrong_scope": wrong_scope,
        "jobs_registered_twice": sum(1 for n in jobs.values() if n > 1),
        "versions_from_retractions": retraction_versions,
    }
