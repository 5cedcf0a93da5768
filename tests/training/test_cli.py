"""`somna train` end to end: a tiny run logged to a real MLflow server and registered."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from infra.cli import app

pytestmark = pytest.mark.mlflow


def test_somna_train_logs_and_registers(mlflow_uri: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    out = tmp_path / "ck"
    args = [
        "train",
        "--steps",
        "3",
        "--d-model",
        "32",
        "--n-layers",
        "2",
        "--head-dim",
        "16",
        "--fact-chunks",
        "1",
        "--question-chunks",
        "1",
        "--eval-every",
        "2",
        "--eval-examples",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
        "--mlflow-uri",
        mlflow_uri,
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "registered somna-hybrid version" in result.output
    for name in (
        "config.json",
        "model.safetensors",
        "metrics.json",
        "COMMAND.txt",
        "accuracy_by_distance.png",
    ):
        assert (out / name).is_file()

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    versions = client.search_model_versions("name='somna-hybrid'")
    mine = [v for v in versions if v.tags.get("checkpoint") == "ck"]
    assert mine
    run = client.get_run(mine[0].run_id)
    assert run.data.params["passes"] == "4"
    assert "loss" in run.data.metrics and "final_acc_all" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(mine[0].run_id, "model")}
    assert "model/model.safetensors" in artifacts
