"""The MLflow tracking server as Somna uses it: a client, experiments, aliases, file hashes.

Everything goes through the tracking server's REST API and its artifact proxy, so the
same code works against a remote server with an object-store artifact root.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

BASE_EXPERIMENT = "somna-base-models"
SLEEP_EXPERIMENT = "somna-sleep"


def client(tracking_uri: str) -> MlflowClient:
    # Progress bars of artifact transfers would flood worker logs.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def is_missing(err: Exception) -> bool:
    return getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def get_by_alias(c: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if is_missing(e) or "not found" in str(e).lower() or "does not exist" in str(e).lower():
            return None
        raise


def ensure_registered_model(c: MlflowClient, name: str, tags: dict[str, str]) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name, tags=tags)
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise


def experiment_id(c: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except MlflowException:  # created by a concurrent worker
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
