"""The base model in the registry: registered model ``somna-hybrid``, alias ``production``.

Every worker serves the version at ``production``. When the registry has none, the
checkpoint shipped under ``model/checkpoints/`` is logged as the artifacts of a run and
registered; workers starting together on an empty registry all end on one version (see
:func:`register_base_model`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consolidation.exceptions import BaseModelMissing
from consolidation.tracking import (
    BASE_EXPERIMENT,
    client,
    ensure_registered_model,
    experiment_id,
    get_by_alias,
    sha256_file,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "somna-hybrid"
PRODUCTION = "production"
CHECKPOINT_SHA_TAG = "checkpoint_sha256"  # on base-model versions: which checkpoint it holds
_SHIPPED_DIR = Path(__file__).resolve().parent.parent / "model" / "checkpoints"


@dataclass
class BaseModel:
    """The served base model: the loaded ``HybridLM`` and its registry version."""

    lm: Any  # model.HybridLM (kept untyped so this module imports without torch)
    version: str
    checkpoint_dir: Path


def shipped_checkpoint(name: str = "facts-n4") -> Path:
    """The checkpoint shipped in the repository (``model/checkpoints/<name>``)."""
    path = _SHIPPED_DIR / name
    if (path / "config.json").is_file():
        return path
    found = sorted(p.parent for p in _SHIPPED_DIR.glob("*/config.json"))
    if not found:
        raise BaseModelMissing(
            f"no base model with alias {PRODUCTION!r} in the registry and no checkpoint "
            f"under {_SHIPPED_DIR}; train one with `somna train` or register one"
        )
    return found[0]


def checkpoint_sha256(checkpoint_dir: Path) -> str:
    """One hash of a checkpoint dir: each file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(q for q in checkpoint_dir.rglob("*") if q.is_file()):
        h.update(p.relative_to(checkpoint_dir).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def _versions_with_sha(c: MlflowClient, name: str, sha: str) -> list[ModelVersion]:
    found = c.search_model_versions(f"name = '{name}' and tags.{CHECKPOINT_SHA_TAG} = '{sha}'")
    return sorted(found, key=lambda mv: int(mv.version))


def _log_checkpoint(c: MlflowClient, name: str, checkpoint_dir: Path, sha: str) -> ModelVersion:
    """A new version of ``name`` holding the checkpoint, logged as the artifacts of a run."""
    run = c.create_run(
        experiment_id(c, BASE_EXPERIMENT),
        run_name=f"register-{checkpoint_dir.name}",
        tags={"somna.kind": "base-model", "checkpoint": checkpoint_dir.name},
    )
    c.log_artifacts(run.info.run_id, str(checkpoint_dir), artifact_path="model")
    c.set_terminated(run.info.run_id)
    ensure_registered_model(c, name, {"somna.kind": "base-model"})
    return c.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run.info.run_id,
        tags={"checkpoint": checkpoint_dir.name, CHECKPOINT_SHA_TAG: sha},
        await_creation_for=0,  # the version of a run's artifacts is READY at once
    )


def register_base_model(
    tracking_uri: str,
    checkpoint_dir: Path,
    *,
    alias: str = PRODUCTION,
    only_if_missing: bool = False,
    name: str = BASE_MODEL_NAME,
) -> str:
    """Register a checkpoint dir as a version of ``name`` and point ``alias`` at it.

    With ``only_if_missing`` (workers starting together on an empty registry) every caller
    ends on the same version: the alias is left alone when it is set; a version that holds
    the same checkpoint (by :func:`checkpoint_sha256`) is reused; after registering, the
    lowest version with that sha256 wins and a caller that lost deletes its own. The server
    numbers versions in commit order, so all callers see the same lowest one.
    """
    c = client(tracking_uri)
    sha = checkpoint_sha256(checkpoint_dir)
    if not only_if_missing:
        mv = _log_checkpoint(c, name, checkpoint_dir, sha)
        c.set_registered_model_alias(name, alias, mv.version)
        log.info("registered base model %s version %s as %r", checkpoint_dir, mv.version, alias)
        return str(mv.version)
    current = get_by_alias(c, name, alias)
    if current is not None:
        return str(current.version)
    same = _versions_with_sha(c, name, sha)
    mine = None if same else _log_checkpoint(c, name, checkpoint_dir, sha)
    winner = _versions_with_sha(c, name, sha)[0]
    if mine is not None and mine.version != winner.version:
        log.info("base model %s v%s was registered concurrently: dropping v%s",
                 name, winner.version, mine.version)  # fmt: skip
        c.delete_model_version(name, mine.version)
        c.delete_run(mine.run_id)
    current = get_by_alias(c, name, alias)
    if current is not None:
        return str(current.version)
    c.set_registered_model_alias(name, alias, winner.version)
    log.info("registered base model %s version %s as %r", checkpoint_dir, winner.version, alias)
    return str(winner.version)


def base_model_version(
    tracking_uri: str, *, alias: str = PRODUCTION, name: str = BASE_MODEL_NAME
) -> str | None:
    mv = get_by_alias(client(tracking_uri), name, alias)
    return None if mv is None else str(mv.version)


def _cache_root() -> Path:
    root = os.environ.get("SOMNA_CACHE_DIR")
    return Path(root) if root else Path(tempfile.gettempdir()) / "somna-cache"


def download_base_model(tracking_uri: str, version: str, *, name: str = BASE_MODEL_NAME) -> Path:
    """The checkpoint dir of a base-model version, downloaded once per host into a cache."""
    import mlflow.artifacts

    c = client(tracking_uri)
    mv = c.get_model_version(name, version)
    # Keyed by server and source: version 1 of one server is not version 1 of another.
    key = hashlib.sha256(f"{tracking_uri}\0{mv.source}".encode()).hexdigest()[:16]
    dest = _cache_root() / "base" / f"{name}-v{version}-{key}"
    if (dest / "config.json").is_file():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix="download-", dir=_mkdir(dest.parent)))
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=tracking_uri
    )
    try:
        os.replace(local, dest)  # whole dir appears at once; a concurrent loser just reuses it
    except OSError:
        if not (dest / "config.json").is_file():
            raise
    return dest


def _mkdir(p: Path) -> str:
    p.mkdir(parents=True, exist_ok=True)
    return str(p)


def ensure_base_model(
    tracking_uri: str,
    *,
    alias: str = PRODUCTION,
    checkpoint_dir: Path | None = None,
    name: str = BASE_MODEL_NAME,
) -> BaseModel:
    """Load the base model at ``alias``, registering the shipped checkpoint when none is
    (safe when several workers start at once on an empty registry)."""
    version = base_model_version(tracking_uri, alias=alias, name=name)
    if version is None:
        version = register_base_model(
            tracking_uri, checkpoint_dir or shipped_checkpoint(), alias=alias,
            only_if_missing=True, name=name,
        )  # fmt: skip
    return load_base_model(tracking_uri, version, name=name)


def load_base_model(tracking_uri: str, version: str, *, name: str = BASE_MODEL_NAME) -> BaseModel:
    """A registered base-model version, downloaded (once per host) and loaded for inference."""
    from model import HybridLM

    local = download_base_model(tracking_uri, version, name=name)
    lm = HybridLM.load(local)
    lm.eval()
    return BaseModel(lm=lm, version=version, checkpoint_dir=local)
