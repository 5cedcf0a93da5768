"""`somna memory ...` and `somna cost` through typer's CliRunner, on the real services."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from consolidation import fast_weights, tracking
from infra.cli import app
from tests.consolidation.conftest import scope_id

pytestmark = [pytest.mark.mlflow, pytest.mark.kafka]


def _register(uri: str, scope: str, tmp: Path, n: int) -> list:
    c = tracking.client(uri)
    run = c.create_run(tracking.experiment_id(c, tracking.SLEEP_EXPERIMENT)).info.run_id
    pubs, parent = [], None
    for i in range(n):
        f = tmp / f"v{i}" / fast_weights.FAST_WEIGHTS_FILE
        fast_weights.write_artifact(
            f, {"layers.0.S": torch.full((2, 4, 4), float(i))}, {"scope_id": scope}
        )
        lin = fast_weights.Lineage(scope_id=scope, job_id=f"job-{i}", parent_version=parent, base_model_version="1",
                               from_watermark=10 * i, to_watermark=10 * i + 9, passes=2, tokens=64)  # fmt: skip
        pubs.append(fast_weights.register_fast_weights(uri, run_id=run, local_file=f, lineage=lin))
        parent = pubs[-1].version
    return pubs


def test_memory_ls_show_rollback_and_cost(
    kafka_bootstrap: str, mlflow_uri: str, tmp_path: Path
) -> None:
    scope = scope_id("cli")
    v1, v2 = _register(mlflow_uri, scope, tmp_path, 2)
    env = {"SOMNA_MLFLOW_URI": mlflow_uri, "SOMNA_KAFKA_BOOTSTRAP": kafka_bootstrap}
    runner = CliRunner()

    out = runner.invoke(app, ["memory", "ls", "--json"], env=env)
    assert out.exit_code == 0, out.output
    row = next(r for r in json.loads(out.output) if r["scope_id"] == scope)
    assert row["live"] == v2.version and row["versions"] == 2 and row["watermark"] == 19

    out = runner.invoke(app, ["memory", "show", scope, "--json"], env=env)
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["version"] for r in rows] == [v1.version, v2.version]
    assert rows[1]["parent_version"] == v1.version and rows[1]["live"]
    # |S| of v2 = 1 * sqrt(32); the change from v1 (all zeros) is the same.
    assert rows[1]["norm"] == pytest.approx(32**0.5) and rows[1]["delta_norm"] == pytest.approx(
        32**0.5
    )

    out = runner.invoke(app, ["memory", "rollback", scope, v1.version], env=env)
    assert out.exit_code == 0, out.output
    assert fast_weights.latest_live(mlflow_uri, scope) == v1

    out = runner.invoke(app, ["memory", "rollback", scope, "99"], env=env)
    assert out.exit_code != 0  # a domain error: one line, exit 1 (through main())

    out = runner.invoke(app, ["cost", "--json"], env=env)
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert {"runs", "total", "dollars_per_gpu_hour"} <= set(report) and report["total"]["runs"] >= 1


def test_memory_retract_and_rebuild(
    kafka_bootstrap: str, mlflow_uri: str, base_model, tmp_path: Path
) -> None:
    import asyncio

    from consolidation.batch import run_batch
    from consolidation.planner import plan_job
    from infra.settings import Settings
    from streams.history import read_history, write_rows
    from streams.records import SleepJob
    from tests.consolidation.conftest import history_rows

    settings = Settings(data_dir=tmp_path / "somna", mlflow_uri=mlflow_uri, kafka_bootstrap=kafka_bootstrap,
                        chunk_tokens=40, sleep_passes=2)  # fmt: skip
    scope = scope_id("clire")
    texts = ["kim reports to bob.", "bob reports to tav.", "tav reports to lem."]
    write_rows(
        settings.history_dir, "somna.interactions", 0, history_rows(scope, texts, first_offset=0)
    )
    job = SleepJob(
        job_id=f"job-{scope}", scope_id=scope, from_watermark=0, to_watermark=2, passes=2
    )
    plan = asyncio.run(plan_job(settings, base_model, job, 0))
    (v1,), _ = run_batch(mlflow_uri, base_model, [plan.task], passes=2, device="cpu")
    env = {"SOMNA_MLFLOW_URI": mlflow_uri, "SOMNA_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "SOMNA_DATA_DIR": str(settings.data_dir), "SOMNA_CHUNK_TOKENS": "40", "SOMNA_SLEEP_PASSES": "2"}  # fmt: skip
    runner = CliRunner()
    out = runner.invoke(
        app, ["memory", "retract", scope, f"{scope}-e1", "--reason", "wrong"], env=env
    )
    assert out.exit_code == 0, out.output
    assert "purged 1 row(s)" in out.output and "retraction" in out.output
    assert (
        "bob reports to tav." not in read_history(settings.history_dir, scope)["text"].to_pylist()
    )
    live = fast_weights.latest_live(mlflow_uri, scope)
    assert live.version != v1.version and live.watermark == v1.watermark
    out = runner.invoke(app, ["memory", "rebuild", scope], env=env)
    assert out.exit_code == 0, out.output
    tags = fast_weights.get_version(
        mlflow_uri, scope, fast_weights.latest_live(mlflow_uri, scope).version
    ).tags
    assert tags["reason"] == "rebuild" and tags["events"] == "2"
