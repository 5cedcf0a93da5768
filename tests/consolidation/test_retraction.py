"""Retraction, rebuild and rollback against the real MLflow server (history in Parquet)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from consolidation import blobs, fast_weights, fast_weights_load, retraction_record
from consolidation.batch import SleepTask, run_batch, sleep_states
from consolidation.planner import _chunks, plan_job
from consolidation.retraction import UNKNOWN_EVENT, apply, rebuild_async
from consolidation.rollback import rollback
from consolidation.turns import from_history
from infra.settings import Settings
from streams.history import read_history, write_rows
from streams.records import SleepJob
from tests.consolidation.conftest import history_rows, scope_id

pytestmark = pytest.mark.mlflow

FACTS = ["kim reports to bob.", "bob reports to tav.", "tav reports to lem.",
         "sam reports to dex.", "dex reports to vin.", "vin reports to rup."]  # fmt: skip


def _settings(mlflow_uri: str, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "somna", mlflow_uri=mlflow_uri, kafka_bootstrap="127.0.0.1:1",
                    chunk_tokens=40, sleep_passes=2)  # fmt: skip


def _consolidate(settings: Settings, base, scope: str, lo: int, hi: int):
    job = SleepJob(
        job_id=f"job-{scope}-{lo}-{hi}",
        scope_id=scope,
        from_watermark=lo,
        to_watermark=hi,
        passes=2,
    )
    plan = asyncio.run(plan_job(settings, base, job, 0))
    (pub,), _ = run_batch(settings.tracking_uri, base, [plan.task], passes=2, device="cpu")
    return pub


def _replay(settings: Settings, base, scope: str, start, lo: int, hi: int, drop: set[str]):
    """What the fast weights must be: ``start``'s weights + the kept turns, chunked."""
    turns = [t for t in from_history(settings.history_dir, scope, lo, hi) if t.event_id not in drop]
    parent = (
        None
        if start is None
        else fast_weights_load.load_fast_weights(settings.tracking_uri, start, scope).tensors
    )
    task = SleepTask(
        lineage=None, chunks=_chunks(turns, settings.chunk_tokens), parent_weights=parent
    )  # type: ignore[arg-type]
    return sleep_states(base, [task], 2, "cpu")[0]


def _weights(settings: Settings, pub, scope: str) -> dict[str, torch.Tensor]:
    return fast_weights_load.load_fast_weights(settings.tracking_uri, pub, scope).tensors


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.fixture
def three_versions(mlflow_uri, base_model, tmp_path):
    settings = _settings(mlflow_uri, tmp_path)
    scope = scope_id("retract")
    write_rows(
        settings.history_dir, "somna.interactions", 0, history_rows(scope, FACTS, first_offset=0)
    )
    pubs = [_consolidate(settings, base_model, scope, lo, lo + 1) for lo in (0, 2, 4)]
    return settings, scope, pubs


def test_retraction_purges_and_rebuilds_from_the_version_before(three_versions, base_model) -> None:
    settings, scope, (v1, v2, v3) = three_versions
    event = f"{scope}-e3"  # "sam reports to dex.", consolidated into v2
    result = asyncio.run(apply(settings, base_model, scope, event, "wrong fact"))
    assert result.purge.rows_removed == 1 and result.purge.offset == 3
    history = read_history(settings.history_dir, scope)
    assert "sam reports to dex." not in history["text"].to_pylist() and history.num_rows == 5
    assert not any(
        b"sam reports to dex" in p.read_bytes() for p in settings.history_dir.rglob("*.parquet")
    )
    pub = result.published
    assert (
        fast_weights.latest_live(settings.tracking_uri, scope) == pub
        and pub.watermark == v3.watermark
    )
    tags = fast_weights.get_version(settings.tracking_uri, scope, pub.version).tags
    assert tags["parent_version"] == v1.version  # v1's watermark (1) is the last before offset 3
    assert tags["reason"] == "retraction" and tags["retracted_event_id"] == event
    assert tags["replaces_version"] == v3.version
    # Invariant 3: exactly v1 + the retained history after it, chunked deterministically.
    expected = _replay(settings, base_model, scope, v1, 2, 5, {event})
    assert _same(_weights(settings, pub, scope), expected)
    assert not _same(_weights(settings, pub, scope), _weights(settings, v3, scope))
    # The rebuilt artifact is kept locally too, so the agent swaps it without a download.
    assert blobs.find(blobs.root(settings.data_dir), pub.sha256) is not None
    # A retried retraction finds its version.
    again = asyncio.run(apply(settings, base_model, scope, event, "wrong fact"))
    assert again.outcome == "retried" and again.published == pub
    # A later job never brings the event back (the Kafka log still has it; the tombstone rules).
    assert retraction_record.retracted_event_ids(settings.tracking_uri, scope) == {event}


def test_retracting_an_unknown_event_registers_nothing(three_versions, base_model) -> None:
    settings, scope, (_, _, v3) = three_versions
    versions = len(fast_weights.list_versions(settings.tracking_uri, scope))
    files = sorted(p.name for p in settings.history_dir.rglob("*.parquet"))
    result = asyncio.run(apply(settings, base_model, scope, f"{scope}-nope", "never existed"))
    assert result.outcome == UNKNOWN_EVENT and result.published is None
    assert result.purge.rows_removed == 0
    assert len(fast_weights.list_versions(settings.tracking_uri, scope)) == versions
    assert fast_weights.latest_live(settings.tracking_uri, scope) == v3
    assert sorted(p.name for p in settings.history_dir.rglob("*.parquet")) == files
    assert read_history(settings.history_dir, scope).num_rows == len(FACTS)


def test_rebuild_replays_the_whole_history_from_zeros(three_versions, base_model) -> None:
    settings, scope, (_, _, v3) = three_versions
    pub = asyncio.run(rebuild_async(settings, base_model, scope))
    tags = fast_weights.get_version(settings.tracking_uri, scope, pub.version).tags
    assert (
        tags["reason"] == "rebuild"
        and tags["parent_version"] == ""
        and pub.watermark == v3.watermark
    )
    assert _same(
        _weights(settings, pub, scope), _replay(settings, base_model, scope, None, 0, 5, set())
    )


def test_rollback_serves_the_older_version_and_the_next_job_chains_from_it(
    three_versions, base_model
) -> None:
    settings, scope, (v1, _, v3) = three_versions
    back = rollback(settings, scope, v1.version, publish=False)
    assert back == v1 and fast_weights.latest_live(settings.tracking_uri, scope) == v1
    write_rows(settings.history_dir, "somna.interactions", 0,
               history_rows(scope, ["lem likes tea."], first_offset=6))  # fmt: skip
    nxt = _consolidate(settings, base_model, scope, 6, 6)
    tags = fast_weights.get_version(settings.tracking_uri, scope, nxt.version).tags
    # No gap: the events after v1's watermark are folded in again, from v1.
    assert (
        tags["parent_version"] == v1.version
        and tags["from_watermark"] == "2"
        and tags["events"] == "5"
    )


def test_a_wave_reads_its_retractions_at_once_and_plans_the_same(three_versions, base_model):
    # The sleep worker reads a wave's retracted events with one registry search; a plan
    # given them leaves the same events out as one that looks its scope up.
    from consolidation.sleep_worker import SleepWorker

    settings, scope, (v1, _, _) = three_versions
    fast_weights.set_live(settings.tracking_uri, scope, v1.version)  # 2..5 left to sleep
    event, never = f"{scope}-e3", scope_id("never")
    retraction_record.record_retraction(settings.tracking_uri, scope, event)
    worker = SleepWorker(settings, base_model, None, None, device="cpu")
    wave = asyncio.run(worker._retracted([scope, never]))
    assert wave == {scope: {event}, never: set()}
    job = SleepJob(
        job_id=f"job-{scope}-w", scope_id=scope, from_watermark=2, to_watermark=5, passes=2
    )
    given = asyncio.run(plan_job(settings, base_model, job, 0, retracted=wave[scope]))
    looked_up = asyncio.run(plan_job(settings, base_model, job, 0))
    assert given.task.chunks == looked_up.task.chunks
    kept = [t for t in from_history(settings.history_dir, scope, 2, 5) if t.event_id != event]
    assert given.task.chunks == _chunks(kept, settings.chunk_tokens)
