"""Plan + batched sleep + registration against the real MLflow server (history in Parquet)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from consolidation import fast_weights, fast_weights_load
from consolidation.batch import run_batch
from consolidation.planner import plan_job
from infra.settings import Settings
from streams.history import write_rows
from streams.records import SleepJob
from tests.consolidation.conftest import history_rows, scope_id

pytestmark = pytest.mark.mlflow

FACTS = ["alice reports to bob.", "bob reports to carol.", "carol likes tea.", "dave owns a cat."]


def _settings(mlflow_uri: str, tmp_path: Path) -> Settings:
    # No broker: every event of these jobs is in the Parquet history already.
    return Settings(data_dir=tmp_path / "somna", mlflow_uri=mlflow_uri, kafka_bootstrap="127.0.0.1:1",
                    chunk_tokens=32, sleep_passes=2)  # fmt: skip


def _job(scope: str, lo: int, hi: int) -> SleepJob:
    return SleepJob(job_id=f"job-{scope}-{lo}-{hi}", scope_id=scope, from_watermark=lo,
                    to_watermark=hi, passes=2)  # fmt: skip


def _sleep(settings: Settings, base, jobs: list[SleepJob]):
    plans = [asyncio.run(plan_job(settings, base, j, 0)) for j in jobs]
    tasks = [p.task for p in plans if p.task is not None]
    published, cost = run_batch(settings.tracking_uri, base, tasks, passes=2, device="cpu")
    return plans, published, cost


def test_batched_sleep_registers_one_version_per_scope(mlflow_uri, base_model, tmp_path) -> None:
    settings = _settings(mlflow_uri, tmp_path)
    a, b = scope_id(), scope_id()
    write_rows(settings.history_dir, "somna.interactions", 0,
               history_rows(a, FACTS[:2], first_offset=0) + history_rows(b, FACTS[2:], first_offset=2))  # fmt: skip
    plans, published, cost = _sleep(settings, base_model, [_job(a, 0, 1), _job(b, 2, 3)])
    assert [p.scope_id for p in published] == [a, b]
    assert cost.tokens == sum(len(f) + 2 for f in FACTS) and cost.scopes == 2 and cost.flops > 0
    for pub in published:
        assert fast_weights.latest_live(mlflow_uri, pub.scope_id) == pub
        mv = fast_weights.get_version(mlflow_uri, pub.scope_id, pub.version)
        assert mv.tags["base_model_version"] == base_model.version
        assert mv.tags["watermark"] == str(pub.watermark) and mv.tags["parent_version"] == ""
    # Different histories, different memories; and not all zeros.
    wa = fast_weights_load.load_fast_weights(mlflow_uri, published[0], a).tensors
    wb = fast_weights_load.load_fast_weights(mlflow_uri, published[1], b).tensors
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert any(wa[k].abs().sum() > 0 for k in wa)


def test_retried_job_yields_the_same_version_and_next_job_chains(
    mlflow_uri, base_model, tmp_path
) -> None:
    settings = _settings(mlflow_uri, tmp_path)
    s = scope_id()
    write_rows(
        settings.history_dir, "somna.interactions", 0, history_rows(s, FACTS, first_offset=10)
    )
    _, (v1,), _ = _sleep(settings, base_model, [_job(s, 10, 11)])
    again = asyncio.run(plan_job(settings, base_model, _job(s, 10, 11), 0))
    assert again.task is None and again.done == v1 and again.outcome == "retried"
    _, (v2,), _ = _sleep(settings, base_model, [_job(s, 12, 13)])
    mv2 = fast_weights.get_version(mlflow_uri, s, v2.version)
    assert mv2.tags["parent_version"] == v1.version and v2.watermark == 13
    assert [mv.version for mv in fast_weights.list_versions(mlflow_uri, s)] == [
        v1.version,
        v2.version,
    ]
    stale = asyncio.run(
        plan_job(settings, base_model, _job(s, 10, 11).model_copy(update={"job_id": "other"}), 0)
    )
    assert stale.outcome == "stale" and stale.done == v2
    # Deterministic: the same history from the same parent gives the same bytes.
    fw2 = fast_weights_load.load_fast_weights(mlflow_uri, v2, s)
    assert fw2.metadata["scope_id"] == s and fw2.metadata["watermark"] == "13"
