"""The consolidation processor's decisions, on a plain dict (the Faust table in production)."""

from __future__ import annotations

from streams.consolidator import ConsolidationTracker
from streams.records import FastWeightsPublished, Interaction


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _turn(i: int, scope: str = "u1") -> Interaction:
    return Interaction(
        event_id=f"e{i}", scope_id=scope, session_id="s", role="user", text="x", ts=0
    )


def _published(watermark: int, scope: str = "u1", version: str = "1") -> FastWeightsPublished:
    return FastWeightsPublished(
        scope_id=scope,
        version=version,
        artifact_uri="mlflow-artifacts:/x",
        sha256="0" * 64,
        watermark=watermark,
        base_model_version="1",
        job_id="j",
    )


def _tracker(clock: Clock | None = None) -> ConsolidationTracker:
    return ConsolidationTracker(
        {}, chunk_tokens=30, idle_seconds=5.0, passes=2, clock=clock or Clock()
    )


def test_full_chunk_emits_one_job_then_waits_for_its_weights():
    t = _tracker()
    assert t.on_interaction(_turn(0), 0, 10) is None
    assert t.on_interaction(_turn(1), 1, 10) is None
    job = t.on_interaction(_turn(2), 2, 10)
    assert job is not None and (job.from_watermark, job.to_watermark) == (0, 2)
    assert job.reason == "chunk_full" and job.passes == 2 and job.parent_version is None
    # A second full chunk while the first is in flight: held back (one in flight per scope).
    for i in range(3, 7):
        assert t.on_interaction(_turn(i), i, 10) is None
    # Stale weights do not clear it; the job's own watermark does, and releases the next.
    assert t.on_fast_weights(_published(1)) is None
    nxt = t.on_fast_weights(_published(2, version="2"))
    assert nxt is not None and (nxt.from_watermark, nxt.to_watermark) == (3, 6)
    assert nxt.parent_version == "2"


def test_redelivered_offsets_are_not_counted_twice():
    t = _tracker()
    t.on_interaction(_turn(0), 0, 20)
    assert t.on_interaction(_turn(0), 0, 20) is None
    assert t.progress("u1").pending_tokens == 20


def test_idle_scope_is_consolidated_and_scopes_are_independent():
    clock = Clock()
    t = _tracker(clock)
    t.on_interaction(_turn(0, "a"), 0, 5)
    t.on_interaction(_turn(1, "b"), 0, 5)
    clock.t += 3
    t.on_interaction(_turn(2, "b"), 1, 5)
    assert t.due() == []
    clock.t += 2.5
    jobs = t.due()
    assert [(j.scope_id, j.reason, j.to_watermark) for j in jobs] == [("a", "idle", 0)]


def test_retraction_rebuilds_what_was_consolidated():
    t = _tracker()
    assert t.on_retraction("u1") is None  # nothing consolidated: the agent's buffer suffices
    for i in range(3):
        t.on_interaction(_turn(i), i, 10)
    assert t.on_retraction("u1") is None  # a job is in flight: the rebuild waits for it
    job = t.on_fast_weights(_published(2))
    assert job is not None and job.reason == "retraction"
    assert (job.from_watermark, job.to_watermark, job.parent_version) == (0, 2, None)


def test_a_job_whose_weights_never_come_back_is_sent_again_with_its_id():
    clock = Clock()
    t = ConsolidationTracker({}, chunk_tokens=30, idle_seconds=5.0, passes=2,
                             retry_seconds=20.0, clock=clock)  # fmt: skip
    job = t.on_interaction(_turn(0), 0, 40)
    assert job is not None
    clock.t += 19
    assert t.due() == []
    clock.t += 2
    assert [j.job_id for j in t.due()] == [job.job_id]  # the same id: never a second version
    assert t.due() == []  # and not again until another retry period has passed
    assert t.on_fast_weights(_published(0)) is None  # its weights came: nothing in flight
    clock.t += 60
    assert t.due() == []


class CountingTable(dict):
    writes = 0

    def __setitem__(self, key, value) -> None:
        self.writes += 1
        super().__setitem__(key, value)


def test_the_idle_timer_writes_only_the_rows_it_changes():
    clock, table = Clock(), CountingTable()
    t = ConsolidationTracker(table, chunk_tokens=30, idle_seconds=5.0, passes=2, clock=clock)
    for s in range(10):
        t.on_interaction(_turn(s, scope=f"s{s}"), s, 10)
    assert table.writes == 10
    clock.t += 1
    assert t.due() == [] and table.writes == 10  # nothing idle yet: no changelog record
    t.on_interaction(_turn(10, scope="s0"), 10, 10)
    clock.t += 4.5  # all but s0 idle now
    assert sorted(j.scope_id for j in t.due()) == [f"s{s}" for s in range(1, 10)]
    assert table.writes == 11 + 9
