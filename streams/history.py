"""Parquet history of interactions and replies (contract 4 of the team's contracts).

Layout: ``<history_dir>/date=YYYY-MM-DD/bucket=NN/<topic>-p<partition>-<first>-<last>.parquet``
(date of the event's ``ts`` in UTC, bucket = stable hash of scope_id mod 16). Each file is
written to a temp name and renamed. A file's name comes from its (topic, partition, first
offset, last offset), and a write that overlaps files already there for the same
(topic, partition) merges them into one file and removes the old ones: a replay after a
crash rewrites instead of duplicating, so the history holds each event once (invariant 4).
An event produced twice (a reply redelivered after a worker crash lands at two offsets) is
kept once too: a write leaves out rows whose id (``reply_id`` of a reply, ``event_id`` of an
interaction) another file of the same (topic, partition) and directory already holds, and
``read_history`` drops repeated reply ids as a second line of defence.

A retracted event never comes back: the Kafka log still holds it, so a replay, or an event
flushed after its purge, would write its text again. Every write (new rows and the rows
merged from older files) leaves out the event ids :class:`RetractedEvents` knows.

:class:`HistorySink` has the shape of a Quix Streams sink: ``add`` rows, ``flush`` writes a
batch per (topic, partition) through ``write`` and clears it in ``finally``. The worker
commits Kafka offsets only after ``flush`` returned.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import uuid
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from streams import metrics
from streams.exceptions import StreamsError
from streams.records import Interaction, Reply

if TYPE_CHECKING:
    import faust

    from infra.settings import Settings
    from streams.app import Topics
    from streams.dead_letters import DeadLetterPolicy
    from streams.gaps import SkipCheck

log = logging.getLogger(__name__)

BUCKETS = 16
SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "interaction" | "reply"
        ("event_id", pa.string()),
        ("reply_id", pa.string()),  # null for interactions
        ("scope_id", pa.string()),
        ("session_id", pa.string()),  # null for replies
        ("role", pa.string()),
        ("text", pa.string()),
        ("ts", pa.float64()),
        ("source_topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
    ]
)
_FILE_RE = re.compile(r"^(?P<topic>.+)-p(?P<partition>\d+)-(?P<first>\d+)-(?P<last>\d+)\.parquet$")


def bucket_of(scope_id: str) -> int:
    """Stable across processes and machines (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(scope_id.encode("utf-8")).digest()[:4], "big") % BUCKETS


def row_of(event: Interaction | Reply, *, topic: str, partition: int, offset: int) -> dict:
    if isinstance(event, Interaction):
        kind, reply_id, session_id, role = "interaction", None, event.session_id, event.role
    else:
        kind, reply_id, session_id, role = "reply", event.reply_id, None, "assistant"
    return {
        "kind": kind,
        "event_id": event.event_id,
        "reply_id": reply_id,
        "scope_id": event.scope_id,
        "session_id": session_id,
        "role": role,
        "text": event.text,
        "ts": float(event.ts),
        "source_topic": topic,
        "partition": partition,
        "offset": offset,
    }


def file_name(topic: str, partition: int, first: int, last: int) -> str:
    return f"{topic}-p{partition}-{first}-{last}.parquet"


def _date_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d")


class RetractionsUnavailable(StreamsError):
    """The retracted events of a scope cannot be read now; the write waits and retries."""


class RetractedEvents:
    """The retracted event ids of each scope, as a cache of the registry's record.

    A scope's set is read (``lookup``: ``consolidation.retraction_record.retracted_event_ids``) the
    first time one of its rows is written, and again after each of its retractions seen on
    ``somna.retractions`` (whose event id counts at once, in case the registry lags).
    """

    def __init__(self, lookup: Callable[[str], set[str]] | None = None) -> None:
        self._lookup = lookup
        self._ids: dict[str, set[str]] = defaultdict(set)
        self._fresh: set[str] = set()  # scopes read from the registry since their last change
        self._lock = threading.Lock()  # writes run in a thread, retractions on the loop

    def add(self, scope_id: str, event_id: str) -> None:
        with self._lock:
            self._ids[scope_id].add(event_id)
            self._fresh.discard(scope_id)

    def of(self, scope_id: str) -> set[str]:
        with self._lock:
            if self._lookup is None or scope_id in self._fresh:
                return set(self._ids.get(scope_id, ()))
        try:
            ids = self._lookup(scope_id)
        except Exception as e:  # the tracking server is down: never guess
            raise RetractionsUnavailable(f"retracted events of {scope_id!r}: {e}") from e
        with self._lock:
            self._ids[scope_id] |= ids
            self._fresh.add(scope_id)
            return set(self._ids[scope_id])

    def keep(self, rows: list[dict]) -> list[dict]:
        """``rows`` without those of retracted events (an interaction and its replies)."""
        retracted = {s: self.of(s) for s in {r["scope_id"] for r in rows}}
        return [r for r in rows if r["event_id"] not in retracted[r["scope_id"]]]


def write_rows(
    history_dir: Path,
    topic: str,
    partition: int,
    rows: list[dict],
    retracted: RetractedEvents | None = None,
) -> list[Path]:
    """Write one (topic, partition) batch, one file per (date, bucket) directory."""
    groups: dict[Path, list[dict]] = defaultdict(list)
    for row in rows:
        sub = f"date={_date_of(row['ts'])}/bucket={bucket_of(row['scope_id']):02d}"
        groups[history_dir / sub].append(row)
    written = [
        _merge_write(d, topic, partition, group, retracted) for d, group in sorted(groups.items())
    ]
    return [p for p in written if p is not None]


def event_key(row: dict) -> tuple[str, str]:
    """What makes a row one event: a reply's ``reply_id`` (its ``event_id`` is the turn it
    answers), an interaction's ``event_id``."""
    return (row["kind"], row["reply_id"] if row["kind"] == "reply" else row["event_id"])


class _KeyIndex:
    """The event keys held by the files of one (directory, topic, partition).

    A write asks which of its keys another file already holds (a redelivery). Reading every
    other file's keys on each write grew with the history (a window's flush re-read
    thousands of files); the index reads a file once, after which a write only lists the
    directory. A file changed by someone else (a purge, another worker after a rebalance)
    shows a new mtime or size and is read again.
    """

    def __init__(self) -> None:
        self._files: dict[str, tuple[int, int, frozenset[tuple[str, str]]]] = {}
        self._count: Counter[tuple[str, str]] = Counter()  # key -> how many files hold it

    def sync(self, paths: Iterable[Path]) -> None:
        seen = set()
        for path in paths:
            try:
                st = path.stat()
            except FileNotFoundError:  # replaced meanwhile by a merge
                continue
            seen.add(path.name)
            held = self._files.get(path.name)
            if held is None or held[:2] != (st.st_mtime_ns, st.st_size):
                self.put(path, _keys_in_file(path), st)
        for name in set(self._files) - seen:
            self.forget(name)

    def put(
        self, path: Path, keys: frozenset[tuple[str, str]], st: os.stat_result | None = None
    ) -> None:
        st = st or path.stat()
        self.forget(path.name)
        self._files[path.name] = (st.st_mtime_ns, st.st_size, keys)
        self._count.update(keys)

    def forget(self, name: str) -> None:
        held = self._files.pop(name, None)
        for key in held[2] if held is not None else ():
            self._count[key] -= 1
            if not self._count[key]:  # a purged or merged-away event leaves no entry
                del self._count[key]

    def held_outside(self, names: set[str]) -> Callable[[tuple[str, str]], bool]:
        """Whether a key is held by a file not among ``names``."""
        inside = [self._files[n][2] for n in names if n in self._files]

        def held(key: tuple[str, str]) -> bool:
            return self._count[key] > sum(key in keys for keys in inside)

        return held


def _keys_in_file(path: Path) -> frozenset[tuple[str, str]]:
    table = pq.read_table(path, columns=["kind", "event_id", "reply_id"])
    return frozenset(event_key(r) for r in table.to_pylist())


_INDEX_DIRECTORIES = 1024  # (directory, topic, partition) indexes kept; the oldest go first
_indexes: OrderedDict[tuple[str, str, int], _KeyIndex] = OrderedDict()
_indexes_lock = threading.Lock()


def _index_of(directory: Path, topic: str, partition: int) -> _KeyIndex:
    with _indexes_lock:
        key = (str(directory), topic, partition)
        index = _indexes.pop(key, None) or _KeyIndex()
        _indexes[key] = index
        while len(_indexes) > _INDEX_DIRECTORIES:
            _indexes.popitem(last=False)
        return index


def _once(rows: list[dict], elsewhere: Callable[[tuple[str, str]], bool]) -> list[dict]:
    """``rows`` (in offset order) with each event once, at its first offset, and none that
    another file already holds."""
    seen: set[tuple[str, str]] = set()
    out = []
    for row in rows:
        key = event_key(row)
        if key not in seen and not elsewhere(key):
            seen.add(key)
            out.append(row)
    return out


def _merge_write(
    directory: Path,
    topic: str,
    partition: int,
    rows: list[dict],
    retracted: RetractedEvents | None = None,
) -> Path | None:
    directory.mkdir(parents=True, exist_ok=True)
    first = min(r["offset"] for r in rows)
    last = max(r["offset"] for r in rows)
    # Files of the same (topic, partition) whose offset range overlaps ours: a replay.
    # The others may hold the same event at another offset: a redelivery (invariant 4).
    overlapping, mine = [], []
    for path in directory.glob(f"{topic}-p{partition}-*.parquet"):
        m = _FILE_RE.match(path.name)
        if m and m["topic"] == topic and int(m["partition"]) == partition:
            mine.append(path)
            if int(m["first"]) <= last and first <= int(m["last"]):
                overlapping.append(path)
    index = _index_of(directory, topic, partition)
    index.sync(mine)
    by_offset = {r["offset"]: r for r in rows}
    for path in overlapping:
        for old in pq.read_table(path, schema=SCHEMA).to_pylist():
            by_offset.setdefault(old["offset"], old)
    elsewhere = index.held_outside({p.name for p in overlapping})
    merged = _once([by_offset[o] for o in sorted(by_offset)], elsewhere)
    if retracted is not None:
        merged = retracted.keep(merged)
    if not merged:  # only retracted rows: the files that held them go
        for path in overlapping:
            path.unlink(missing_ok=True)
            index.forget(path.name)
        return None
    first, last = merged[0]["offset"], merged[-1]["offset"]
    target = directory / file_name(topic, partition, first, last)
    tmp = directory / f".{target.name}.{uuid.uuid4().hex}.tmp"
    pq.write_table(pa.Table.from_pylist(merged, schema=SCHEMA), tmp)
    os.replace(tmp, target)  # atomic: readers see the old file or the new one, never half
    for path in overlapping:
        if path != target:
            path.unlink(missing_ok=True)
        index.forget(path.name)
    index.put(target, frozenset(event_key(r) for r in merged))
    return target


class HistorySink:
    """Batches rows per (topic, partition); ``flush`` writes them all (Quix sink shape)."""

    def __init__(self, history_dir: Path, retracted: RetractedEvents | None = None) -> None:
        self.history_dir = Path(history_dir)
        self.retracted = retracted
        self._batches: dict[tuple[str, int], list[dict]] = defaultdict(list)

    def add(self, event: Interaction | Reply, *, topic: str, partition: int, offset: int) -> None:
        self._batches[(topic, partition)].append(
            row_of(event, topic=topic, partition=partition, offset=offset)
        )

    def __len__(self) -> int:
        return sum(len(b) for b in self._batches.values())

    def flush(self) -> list[Path]:
        written: list[Path] = []
        try:
            for (topic, partition), rows in self._batches.items():
                if rows:
                    written += self.write(topic, partition, rows)
        finally:
            self._batches.clear()
        return written

    def write(self, topic: str, partition: int, rows: list[dict]) -> list[Path]:
        paths = write_rows(self.history_dir, topic, partition, rows, self.retracted)
        metrics.HISTORY_ROWS.inc(len(rows))
        log.debug("history: %d rows of %s[%d] -> %d files", len(rows), topic, partition, len(paths))
        return paths


def dataset(history_dir: Path) -> ds.Dataset:
    """The history as a hive-partitioned pyarrow dataset (temp files excluded)."""
    return ds.dataset(
        str(history_dir),
        format="parquet",
        partitioning="hive",
        exclude_invalid_files=False,
        ignore_prefixes=[".", "_"],
    )


def read_history(history_dir: Path | str, scope_id: str | None = None) -> pa.Table:
    """All rows (or one scope's), deduplicated by (source_topic, partition, offset), in order.

    A reply id seen twice (a redelivered reply the writer missed, say across two dates)
    is kept at its first offset only."""
    history_dir = Path(history_dir)
    if not history_dir.exists() or not any(history_dir.rglob("*.parquet")):
        return SCHEMA.empty_table()
    data = dataset(history_dir)
    flt = None
    if scope_id is not None:
        flt = (ds.field("bucket") == bucket_of(scope_id)) & (ds.field("scope_id") == scope_id)
    table = data.to_table(filter=flt, columns=SCHEMA.names)
    seen: set[tuple[str, int, int]] = set()
    keep = []
    keys = zip(
        table["source_topic"].to_pylist(),
        table["partition"].to_pylist(),
        table["offset"].to_pylist(),
        strict=True,
    )
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    table = table.take(pa.array(keep, type=pa.int64())).cast(SCHEMA)
    table = table.sort_by(
        [("source_topic", "ascending"), ("partition", "ascending"), ("offset", "ascending")]
    )
    replies: set[str] = set()
    keep = []
    for i, (kind, reply_id) in enumerate(
        zip(table["kind"].to_pylist(), table["reply_id"].to_pylist(), strict=True)
    ):
        if kind == "reply" and reply_id is not None:
            if reply_id in replies:
                continue
            replies.add(reply_id)
        keep.append(i)
    if len(keep) == table.num_rows:
        return table
    return table.take(pa.array(keep, type=pa.int64()))


# --- the Faust glue ----------------------------------------------------------------------

MAX_WINDOW_ROWS = 10_000  # a window closes early when it holds this many rows
WRITE_RETRY_SECONDS = 5.0


def install(
    app: faust.App, topics: Topics, dlq: DeadLetterPolicy, skips: SkipCheck, settings: Settings
) -> None:
    """One history agent per topic: a tumbling window of rows, flushed, then acked.

    ``take_events`` acks a window's events only after the loop body returns, and the body
    returns only once the files are written (a failing write is retried, never skipped):
    so Kafka offsets are committed after the Parquet file exists, and a crash in between
    replays the window, which rewrites the same files (see ``_merge_write``).

    A third agent follows ``somna.retractions``: the event id joins the retracted set, and
    the event is purged from the files again, in case a window wrote it after the purge the
    retraction did (before this worker knew of it). Writes and purges take turns (a lock),
    so neither rewrites a file from a copy the other is replacing.
    """
    import asyncio

    from consolidation.retraction_record import retracted_event_ids
    from streams.records import Retraction

    retracted = RetractedEvents(lambda scope: retracted_event_ids(settings.tracking_uri, scope))
    files = asyncio.Lock()
    sinks = [topics.interactions.get_topic_name(), topics.replies.get_topic_name()]
    check = skips.role("history", sinks)

    def sink_agent(topic: faust.TopicT, kind: type[Interaction | Reply], name: str) -> None:
        sink = HistorySink(settings.history_dir, retracted)
        policy = dlq.claim(topic.get_topic_name())

        async def agent(stream: faust.StreamT) -> None:
            window = settings.history_window_seconds
            async for events in stream.take_events(MAX_WINDOW_ROWS, within=window):
                window_rows = []
                for ev in events:
                    msg = ev.message
                    metrics.EVENTS.labels(role="history", topic=msg.topic).inc()
                    for r in await check.skipped(msg.topic, msg.partition, msg.offset):
                        skipped = await policy.decode_record(r, kind)
                        if skipped is not None:
                            window_rows.append((skipped, r.topic, r.partition, r.offset))
                    event = await policy.decode_event(ev, kind)
                    if event is not None:
                        window_rows.append((event, msg.topic, msg.partition, msg.offset))
                await write_window(sink, window_rows)

        app.agent(topic, name=name)(agent)

    async def write_window(sink: HistorySink, rows: list) -> None:
        while True:  # a failed write is retried, never skipped: the offsets wait for it
            for event, topic, partition, offset in rows:
                sink.add(event, topic=topic, partition=partition, offset=offset)
            try:
                async with files:
                    await asyncio.to_thread(sink.flush)
                return
            except (OSError, RetractionsUnavailable):
                log.exception("history write failed; retrying in %ss", WRITE_RETRY_SECONDS)
                await asyncio.sleep(WRITE_RETRY_SECONDS)

    retractions_policy = dlq.claim(topics.retractions.get_topic_name())

    async def on_retractions(stream: faust.StreamT) -> None:
        from consolidation.purge import purge_event

        async for ev in stream.events():
            msg = ev.message
            metrics.EVENTS.labels(role="history", topic=msg.topic).inc()
            event = await retractions_policy.decode_event(ev, Retraction)
            if event is None:
                continue
            retracted.add(event.scope_id, event.event_id)
            try:
                async with files:
                    await asyncio.to_thread(
                        purge_event, settings.history_dir, event.scope_id, event.event_id
                    )
            except Exception:  # an unreadable file: the writes still leave the event out
                log.exception("history: purge of retracted %s failed", event.event_id)

    sink_agent(topics.interactions, Interaction, "somna-history-interactions")
    sink_agent(topics.replies, Reply, "somna-history-replies")
    app.agent(topics.retractions, name="somna-history-retractions")(on_retractions)
