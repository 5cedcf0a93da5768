"""`somna train` end to end: a tiny run logged to a real MLflow server and registered."""

from __future__ import annotations

import json
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


def test_train_import_logs_a_gpu_run_once(mlflow_uri: str, tmp_path: Path) -> None:
    """A run trained on a lent GPU (no MLflow there) is logged and registered afterwards,
    with its curves; a second import finds it by its weights and registers nothing."""
    import shutil

    from mlflow import MlflowClient

    shipped = Path(__file__).resolve().parents[2] / "model" / "checkpoints" / "khop2-n1"
    ck = tmp_path / "khop2-n1"
    shutil.copytree(shipped, ck)
    first = CliRunner().invoke(app, ["train-import", str(ck), "--mlflow-uri", mlflow_uri])
    assert first.exit_code == 0, first.output
    assert "registered somna-hybrid version" in first.output

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    mine = [
        v
        for v in client.search_model_versions("name='somna-hybrid'")
        if v.tags.get("checkpoint") == "khop2-n1"
    ]
    assert len(mine) == 1 and mine[0].tags["device"] == "cuda"
    run = client.get_run(mine[0].run_id)
    assert run.data.params["task"] == "khop" and run.data.params["passes"] == "1"
    losses = client.get_metric_history(mine[0].run_id, "loss")
    assert len(losses) == len(json.loads((ck / "history.json").read_text()))
    assert run.data.metrics["final_acc_hops_2"] > 0

    again = CliRunner().invoke(app, ["train-import", str(ck), "--mlflow-uri", mlflow_uri])
    assert again.exit_code == 0, again.output
    assert f"already somna-hybrid version {mine[0].version}" in again.output
    bad = CliRunner().invoke(app, ["train-import", str(tmp_path), "--mlflow-uri", mlflow_uri])
    assert bad.exit_code != 0 and "not a finished run" in bad.output
