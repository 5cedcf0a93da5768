"""`somna memory ...` and `somna cost` through typer's CliRunner, on the real services."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from consolidation import registry
from infra.cli import app
from tests.consolidation.conftest import scope_id

pytestmark = [pytest.mark.mlflow, pytest.mark.kafka]


def _register(uri: str, scope: str, tmp: Path, n: int) -> list:
    c = registry.client(uri)
    run = c.create_run(registry.experiment_id(c, registry.SLEEP_EXPERIMENT)).info.run_id
    pubs, parent = [], None
    for i in range(n):
        f = tmp / f"v{i}" / registry.FAST_WEIGHTS_FILE
        registry.write_artifact(
            f, {"layers.0.S": torch.full((2, 4, 4), float(i))}, {"scope_id": scope}
        )
        lin = registry.Lineage(scope_id=scope, job_id=f"job-{i}", parent_version=parent, base_model_version="1",
                               from_watermark=10 * i, to_watermark=10 * i + 9, passes=2, tokens=64)  # fmt: skip
        pubs.append(registry.register_fast_weights(uri, run_id=run, local_file=f, lineage=lin))
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
    assert registry.latest_live(mlflow_uri, scope) == v1

    out = runner.invoke(app, ["memory", "rollback", scope, "99"], env=env)
    assert out.exit_code != 0  # a domain error: one line, exit 1 (through main())

    out = runner.invoke(app, ["cost", "--json"], env=env)
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert {"runs", "total", "dollars_per_gpu_hour"} <= set(report) and report["total"]["runs"] >= 1
