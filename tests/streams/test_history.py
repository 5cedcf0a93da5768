"""Parquet history: layout, replay without duplicates, readable by pyarrow and DuckDB."""

from __future__ import annotations

import duckdb
import pyarrow.dataset as ds

from infra.topics import INTERACTIONS, REPLIES
from streams.history import HistorySink, bucket_of, read_history
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
