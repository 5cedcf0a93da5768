"""Parquet history: layout, replay without duplicates, readable by pyarrow and DuckDB."""

from __future__ import annotations

import uuid

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from infra.topics import INTERACTIONS, REPLIES
from streams.history import HistorySink, RetractedEvents, bucket_of, read_history
from streams.records import Interaction, Reply, reply_id_for

TS = 1_764_000_000.0  # 2025-11-24 UTC


def _turn(i: int, scope: str) -> Interaction:
    return Interaction(
        event_id=f"e{i}", scope_id=scope, session_id="s", role="user", text=f"t{i}", ts=TS + i
    )


def _fill(sink: HistorySink, offsets: range, partition: int = 0) -> None:
    for o in offsets:
        sink.add(_turn(o, f"scope{o % 3}"), topic=INTERACTIONS, partition=partition, offset=o)


def test_layout_and_names(tmp_path):
    sink = HistorySink(tmp_path)
    _fill(sink, range(0, 6))
    reply = Reply(
        reply_id=reply_id_for("e0"),
        event_id="e0",
        scope_id="scope0",
        text="ok",
        base_model_version="1",
        latency_ms=3.0,
        ts=TS,
    )
    sink.add(reply, topic=REPLIES, partition=0, offset=0)
    paths = sink.flush()
    assert len(sink) == 0
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    b0 = bucket_of("scope0")
    assert f"date=2025-11-24/bucket={b0:02d}/{INTERACTIONS}-p0-0-3.parquet" in names
    assert f"date=2025-11-24/bucket={b0:02d}/{REPLIES}-p0-0-0.parquet" in names
    table = read_history(tmp_path, "scope0")
    assert table["kind"].to_pylist() == ["interaction", "interaction", "reply"]
    assert table["reply_id"].to_pylist()[2] == reply_id_for("e0")


def test_replay_rewrites_instead_of_duplicating(tmp_path):
    sink = HistorySink(tmp_path)
    _fill(sink, range(0, 10))
    sink.flush()
    _fill(sink, range(10, 20))
    sink.flush()
    # A crash before the commit: the worker replays from offset 5, with other windows.
    _fill(sink, range(5, 13))
    sink.flush()
    _fill(sink, range(13, 25))
    sink.flush()
    files = sorted(tmp_path.rglob("*.parquet"))
    offsets = []
    for f in files:
        offsets += ds.dataset(str(f)).to_table()["offset"].to_pylist()
    assert sorted(offsets) == list(range(25)), "each event in exactly one file"
    assert not list(tmp_path.rglob("*.tmp"))
    assert read_history(tmp_path)["offset"].to_pylist() == list(range(25))


def test_readable_by_pyarrow_dataset_and_duckdb(tmp_path):
    sink = HistorySink(tmp_path)
    _fill(sink, range(0, 30), partition=2)
    sink.flush()
    data = ds.dataset(str(tmp_path), format="parquet", partitioning="hive")
    assert data.count_rows() == 30
    rows = duckdb.sql(
        f"select scope_id, count(*) as n, min(cast(bucket as integer)) as b from "
        f"read_parquet('{tmp_path}/**/*.parquet', hive_partitioning = true) "
        f"group by scope_id order by scope_id"
    ).fetchall()
    assert rows == [(f"scope{i}", 10, bucket_of(f"scope{i}")) for i in range(3)]


def test_empty_history(tmp_path):
    assert read_history(tmp_path / "nothing").num_rows == 0


@pytest.mark.mlflow
def test_a_replay_never_writes_a_retracted_event_back(tmp_path, mlflow_uri):
    """Retract two events (one flushed, one not yet at purge time), then replay the offsets
    as a restarted worker would: the retracted text is in no file, the rest once."""
    from consolidation.purge import purge_event
    from consolidation.retraction_record import record_retraction, retracted_event_ids

    scope = f"hist-{uuid.uuid4().hex[:10]}"

    def lookup(s: str) -> set[str]:
        return retracted_event_ids(mlflow_uri, s)

    def turn(i: int) -> Interaction:
        return Interaction(event_id=f"e{i}", scope_id=scope, session_id="s", role="user",
                           text=f"secret number {i} of {scope}", ts=TS + i)  # fmt: skip

    def fill(sink: HistorySink, offsets: range) -> None:
        for o in offsets:
            sink.add(turn(o), topic=INTERACTIONS, partition=1, offset=o)
        # The reply to e2 repeats its text: it goes with it.
        reply = Reply(reply_id=reply_id_for("e2"), event_id="e2", scope_id=scope,
                      text=turn(2).text, base_model_version="1", latency_ms=1.0, ts=TS + 2)  # fmt: skip
        sink.add(reply, topic=REPLIES, partition=1, offset=0)

    retracted = RetractedEvents(lookup)
    sink = HistorySink(tmp_path, retracted)
    fill(sink, range(0, 6))
    sink.flush()
    sink.add(turn(6), topic=INTERACTIONS, partition=1, offset=6)  # not flushed yet
    for event_id in ("e2", "e6"):  # what a retraction does to the history and the registry
        purge_event(tmp_path, scope, event_id)
        record_retraction(mlflow_uri, scope, event_id)
        retracted.add(scope, event_id)  # the history role sees it on somna.retractions
    sink.flush()
    # A restart with the committed offsets reset: the same records again, and more.
    restarted = HistorySink(tmp_path, RetractedEvents(lookup))
    fill(restarted, range(0, 8))
    restarted.flush()

    texts = []
    for path in tmp_path.rglob("*.parquet"):
        texts += pq.read_table(path)["text"].to_pylist()
        raw = path.read_bytes()
        assert turn(2).text.encode() not in raw and turn(6).text.encode() not in raw
    kept = [turn(i).text for i in (0, 1, 3, 4, 5, 7)]
    assert sorted(texts) == sorted(kept), "retracted rows gone, every other row once"
    assert read_history(tmp_path, scope)["event_id"].to_pylist() == [
        f"e{i}" for i in (0, 1, 3, 4, 5, 7)
    ]
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_replay_also_drops_retracted_rows_merged_from_older_files(tmp_path):
    retracted = RetractedEvents()  # no registry: only what somna.retractions said
    sink = HistorySink(tmp_path, retracted)
    _fill(sink, range(0, 3))  # scope0, scope1, scope2: one bucket directory each
    sink.flush()
    retracted.add("scope1", "e1")
    _fill(sink, range(0, 3))  # a replay, before any purge of e1
    sink.flush()
    scope1_files = tmp_path.glob(f"*/bucket={bucket_of('scope1'):02d}/*.parquet")
    assert not list(scope1_files), "a file of retracted rows only is removed"
    assert read_history(tmp_path)["event_id"].to_pylist() == ["e0", "e2"]


def _reply(scope: str, ts: float = TS) -> Reply:
    return Reply(reply_id=reply_id_for("e0"), event_id="e0", scope_id=scope, text="ok",
                 base_model_version="1", latency_ms=1.0, ts=ts)  # fmt: skip


def test_a_redelivered_reply_is_written_once(tmp_path):
    """A worker crash after producing a reply: the reply is produced again, at another
    offset, and the history writes it in another window. Invariant 4: one row."""
    sink = HistorySink(tmp_path)
    sink.add(_reply("scope0"), topic=REPLIES, partition=0, offset=3)
    sink.add(_turn(1, "scope0"), topic=INTERACTIONS, partition=0, offset=1)
    sink.flush()
    sink.add(_reply("scope0"), topic=REPLIES, partition=0, offset=9)
    sink.add(_turn(1, "scope0"), topic=INTERACTIONS, partition=0, offset=7)  # same event_id
    sink.add(_turn(8, "scope0"), topic=INTERACTIONS, partition=0, offset=8)
    sink.flush()
    rows = []
    for path in tmp_path.rglob("*.parquet"):
        rows += pq.read_table(path, columns=["kind", "event_id", "offset"]).to_pylist()
    replies = [r for r in rows if r["kind"] == "reply"]
    assert [r["offset"] for r in replies] == [3], "the first copy only"
    assert sorted(r["event_id"] for r in rows if r["kind"] == "interaction") == ["e1", "e8"]
    table = read_history(tmp_path, "scope0")
    assert table["reply_id"].to_pylist().count(reply_id_for("e0")) == 1


def test_read_history_keeps_one_row_per_reply_id(tmp_path):
    # Two copies the writer cannot see together: different dates, so different directories.
    sink = HistorySink(tmp_path)
    sink.add(_reply("scope0"), topic=REPLIES, partition=0, offset=3)
    sink.flush()
    sink.add(_reply("scope0", ts=TS + 86_400), topic=REPLIES, partition=0, offset=9)
    sink.flush()
    assert len(list(tmp_path.rglob("*.parquet"))) == 2
    table = read_history(tmp_path, "scope0")
    assert table["offset"].to_pylist() == [3]


def test_the_redelivery_check_sees_files_other_writers_changed(tmp_path):
    """The keys of files already read are kept in memory; a file another writer removed or
    wrote since (a purge, the worker that had the partition before a rebalance) counts as
    it is now on disk."""
    sink = HistorySink(tmp_path)
    sink.add(_turn(1, "scope0"), topic=INTERACTIONS, partition=0, offset=1)
    sink.flush()
    (first,) = tmp_path.rglob("*.parquet")
    first.unlink()  # gone, as a purge of its only event leaves it
    # another worker wrote e5 in this directory meanwhile
    other = HistorySink(tmp_path / "elsewhere")
    other.add(_turn(5, "scope0"), topic=INTERACTIONS, partition=0, offset=5)
    (theirs,) = other.flush()
    theirs.rename(first.parent / theirs.name)

    sink.add(_turn(1, "scope0"), topic=INTERACTIONS, partition=0, offset=11)  # e1 again
    sink.add(_turn(5, "scope0"), topic=INTERACTIONS, partition=0, offset=12)  # e5 again
    sink.flush()
    table = read_history(tmp_path, "scope0")
    assert sorted(zip(table["event_id"].to_pylist(), table["offset"].to_pylist(), strict=True)) == [
        ("e1", 11),
        ("e5", 5),
    ]
