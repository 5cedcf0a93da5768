"""Purging an event rewrites only what holds it and loses nothing else."""

from __future__ import annotations

from pathlib import Path

from consolidation.purge import purge_event
from streams.history import read_history, write_rows
from streams.records import Interaction, Reply, reply_id_for

TOPIC = "somna.interactions"


def _rows(scope: str, n: int, start: int = 0) -> list[dict]:
    from streams.history import row_of

    rows = []
    for i in range(n):
        ev = Interaction(
            event_id=f"{scope}-e{i}",
            scope_id=scope,
            session_id="s",
            role="user",
            text=f"fact {i} of {scope}.",
            ts=1_700_000_000.0 + i,
        )
        rows.append(row_of(ev, topic=TOPIC, partition=0, offset=start + i))
    return rows


def test_purge_removes_the_event_and_its_reply_only(tmp_path: Path) -> None:
    write_rows(tmp_path, TOPIC, 0, _rows("alice", 5) + _rows("bob", 3, start=5))
    reply = Reply(
        reply_id=reply_id_for("alice-e2"),
        event_id="alice-e2",
        scope_id="alice",
        text="noted: fact 2 of alice.",
        base_model_version="1",
        latency_ms=1.0,
        ts=1_700_000_010.0,
    )
    from streams.history import row_of

    write_rows(
        tmp_path, "somna.replies", 0, [row_of(reply, topic="somna.replies", partition=0, offset=0)]
    )
    before = read_history(tmp_path)
    raw = b"".join(p.read_bytes() for p in tmp_path.rglob("*.parquet"))
    assert b"fact 2 of alice" in raw  # stored verbatim, so the check below means something
    result = purge_event(tmp_path, "alice", "alice-e2")
    assert result.rows_removed == 2 and result.offset == 2 and result.partition == 0
    after = read_history(tmp_path)
    assert after.num_rows == before.num_rows - 2
    texts = after["text"].to_pylist()
    assert not any("fact 2 of alice" in t for t in texts)
    assert "fact 1 of bob." in texts and "fact 3 of alice." in texts
    raw = b"".join(p.read_bytes() for p in tmp_path.rglob("*.parquet"))
    assert b"fact 2 of alice" not in raw
    assert not list(tmp_path.rglob("*.tmp"))


def test_purge_of_unknown_event_changes_nothing(tmp_path: Path) -> None:
    write_rows(tmp_path, TOPIC, 0, _rows("carol", 3))
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.parquet")}
    result = purge_event(tmp_path, "carol", "nope")
    assert result.rows_removed == 0 and result.offset is None
    assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.parquet")}
