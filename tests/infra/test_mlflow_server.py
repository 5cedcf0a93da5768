"""The MLflow server as Somna uses it: safetensors artifacts, registry versions, aliases."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.mlflow


def test_run_artifact_version_and_alias(mlflow_uri: str, tmp_path: Path) -> None:
    import mlflow
    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load_file, save_file

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.create_experiment(f"infra-test-{uuid.uuid4().hex[:8]}")
    weights = {"S.0": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    path = tmp_path / "fast_weights.safetensors"
    save_file(weights, str(path), metadata={"scope": "alice"})

    run = client.create_run(experiment)
    client.log_param(run.info.run_id, "passes", 4)
    client.log_artifact(run.info.run_id, str(path), artifact_path="fast_weights")
    client.set_terminated(run.info.run_id)

    name = f"infra-test-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    version = client.create_model_version(
        name, f"runs:/{run.info.run_id}/fast_weights", run_id=run.info.run_id
    )
    client.set_registered_model_alias(name, "live", version.version)

    by_alias = client.get_model_version_by_alias(name, "live")
    assert by_alias.version == version.version
    mlflow.set_tracking_uri(mlflow_uri)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}@live", dst_path=str(tmp_path / "down")
    )
    [downloaded] = Path(local).rglob("*.safetensors")
    assert downloaded.read_bytes() == path.read_bytes()
    assert torch.equal(load_file(str(downloaded))["S.0"], weights["S.0"])


def test_the_server_starts_no_job_runner(mlflow_uri: str) -> None:
    """MLflow 3's job runner (huey consumers, for GenAI jobs Somna never runs) stays off:
    its seven processes each imported mlflow at start (~25 s of CPU on a 2-core box)."""
    if os.environ.get("SOMNA_MLFLOW_URI"):
        pytest.skip("an existing server: its job runner is not ours to decide")
    port = mlflow_uri.rsplit(":", 1)[1]
    commands = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            commands[int(pid)] = (os.getpgid(int(pid)), raw)
        except OSError:
            continue  # gone meanwhile
    (group,) = {g for g, cmd in commands.values() if f"--port {port} " in f"{cmd} "}
    ours = [cmd for g, cmd in commands.values() if g == group]
    assert any("mlflow server" in cmd for cmd in ours)
    assert [cmd for cmd in ours if "huey" in cmd or "mlflow.server.jobs" in cmd] == []
