"""Each scope's fast weights in the registry: write, register with lineage, move ``live``,
look up.

Layout (contract 3): each scope's fast weights are one registered model, named from the
scope id (:func:`fast_weights_model_name`), whose versions are safetensors files (never
pickles) with their lineage in tags (:data:`LINEAGE_TAGS`); alias ``live`` is the version
served. One model per scope (not one shared model with a scope tag) keeps the alias, the
version history and the lookups of a scope independent of how many scopes exist; the
measurement behind that choice is ``python -m consolidation.layout_probe``. Verifying and
loading a version is ``consolidation.fast_weights_load``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consolidation.exceptions import ArtifactRejected, VersionNotFound
from consolidation.tracking import (
    client,
    ensure_registered_model,
    get_by_alias,
    is_missing,
    sha256_file,
)
from streams.records import FastWeightsPublished

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

log = logging.getLogger(__name__)

LIVE = "live"
FAST_WEIGHTS_PREFIX = "somna-fw-"
FAST_WEIGHTS_FILE = "fast_weights.safetensors"
# Tags every fast-weights version carries; `somna memory show` prints them.
LINEAGE_TAGS = (
    "scope_id",
    "parent_version",
    "base_model_version",
    "watermark",
    "from_watermark",
    "to_watermark",
    "job_id",
    "sha256",
    "artifact_uri",
    "passes",
    "tokens",
    "reason",
)
_SAFE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")


@dataclass
class FastWeights:
    """A verified fast-weights artifact of one scope."""

    scope_id: str
    version: str
    tensors: dict[str, Any]  # name -> torch.Tensor (CPU)
    metadata: dict[str, str]
    watermark: int
    base_model_version: str
    # consolidation.prewake.Prewoken: the events after the watermark, woken over these
    # weights by a sleep worker of this data dir (only on an agent's copy; never cached).
    prewoken: Any | None = None


@dataclass(frozen=True)
class Lineage:
    """Where a fast-weights version comes from; becomes its tags."""

    scope_id: str
    job_id: str
    parent_version: str | None
    base_model_version: str
    from_watermark: int
    to_watermark: int  # == the watermark of the new version
    passes: int
    tokens: int
    reason: str = "chunk_full"

    def tags(self, sha256: str, artifact_uri: str) -> dict[str, str]:
        return {
            "scope_id": self.scope_id,
            "parent_version": self.parent_version or "",
            "base_model_version": self.base_model_version,
            "watermark": str(self.to_watermark),
            "from_watermark": str(self.from_watermark),
            "to_watermark": str(self.to_watermark),
            "job_id": self.job_id,
            "sha256": sha256,
            "artifact_uri": artifact_uri,
            "passes": str(self.passes),
            "tokens": str(self.tokens),
            "reason": self.reason,
        }


def fast_weights_model_name(scope_id: str) -> str:
    """Registered-model name of a scope: injective, and safe in URLs and paths.

    Letters, digits, '.' and '-' stay; any other character becomes ``_xx`` (its hex code),
    '_' included, so that two scope ids never share a name.
    """
    out = [c if c in _SAFE_CHARS else f"_{ord(c):02x}" for c in scope_id]
    return FAST_WEIGHTS_PREFIX + "".join(out)


def scope_from_model_name(name: str) -> str | None:
    """Inverse of :func:`fast_weights_model_name`; None for names that are not fast weights."""
    if not name.startswith(FAST_WEIGHTS_PREFIX):
        return None
    body, out, i = name[len(FAST_WEIGHTS_PREFIX) :], [], 0
    while i < len(body):
        if body[i] == "_":
            out.append(chr(int(body[i + 1 : i + 3], 16)))
            i += 3
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def write_artifact(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> str:
    """Write a safetensors file (temp + rename) and return its sha256."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)
    return sha256_file(path)


def find_version_by_job(tracking_uri: str, scope_id: str, job_id: str) -> ModelVersion | None:
    """The version a job already registered (a retried job must not register a second)."""
    c = client(tracking_uri)
    name = fast_weights_model_name(scope_id)
    found = c.search_model_versions(f"name = '{name}' and tags.job_id = '{job_id}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None


def upload_artifact(
    tracking_uri: str,
    run_id: str,
    scope_id: str,
    job_id: str,
    local_file: Path,
    *,
    run_artifact_uri: str | None = None,
) -> str:
    """Upload a scope's artifact into a run and return its URI, after checking it arrived whole.

    The path holds the scope and the job, so no upload ever replaces another version's file.
    ``run_artifact_uri`` (the run's artifact root) saves a lookup of the run per upload.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    c = client(tracking_uri)
    root = run_artifact_uri or c.get_run(run_id).info.artifact_uri
    job = fast_weights_model_name(job_id)[len(FAST_WEIGHTS_PREFIX) :]  # same safe encoding
    sub = f"fast_weights/{fast_weights_model_name(scope_id)}/{job}"
    repo = get_artifact_repository(root, tracking_uri=tracking_uri)
    repo.log_artifact(str(local_file), sub)
    size = local_file.stat().st_size
    listed = {f.path.rsplit("/", 1)[-1]: f.file_size for f in repo.list_artifacts(sub)}
    if listed.get(local_file.name) != size:
        raise ArtifactRejected(
            f"upload of {local_file.name} for scope {scope_id!r} incomplete: "
            f"{listed.get(local_file.name)} of {size} bytes"
        )
    return f"{root}/{sub}/{local_file.name}"


def register_fast_weights(
    tracking_uri: str,
    *,
    run_id: str,
    local_file: Path,
    lineage: Lineage,
    move_live: bool = True,
    extra_tags: dict[str, str] | None = None,
    run_artifact_uri: str | None = None,
    check_existing: bool = True,
) -> FastWeightsPublished:
    """Register an artifact file as a new version of its scope (idempotent per job id).

    Order matters for crash safety: the upload completes and is checked before the version
    exists, so a half-written artifact is never registered; a retry of the same job finds
    the version by its ``job_id`` tag and reuses it.
    """
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    name = fast_weights_model_name(lineage.scope_id)
    existing = (
        find_version_by_job(tracking_uri, lineage.scope_id, lineage.job_id)
        if check_existing
        else None
    )
    if existing is not None:
        log.info("job %s already registered %s v%s", lineage.job_id, name, existing.version)
        mv = existing
    else:
        sha = sha256_file(local_file)
        uri = upload_artifact(
            tracking_uri, run_id, lineage.scope_id, lineage.job_id, local_file,
            run_artifact_uri=run_artifact_uri,
        )  # fmt: skip

        def create() -> ModelVersion:
            return c.create_model_version(
                name,
                source=uri.rsplit("/", 1)[0],
                run_id=run_id,
                tags={**(extra_tags or {}), **lineage.tags(sha, uri)},
                description=f"sleep of {lineage.scope_id} up to offset {lineage.to_watermark}",
                await_creation_for=0,  # the version of a file source is READY at once
            )

        try:
            mv = create()
        except MlflowException as e:  # the scope's first version: create its model first
            if not is_missing(e):
                raise
            ensure_registered_model(
                c, name, {"scope_id": lineage.scope_id, "somna.kind": "fast-weights"}
            )
            mv = create()
    if move_live:
        _move_live(c, name, str(mv.version))
    return published(mv)


def _move_live(c: MlflowClient, name: str, version: str) -> None:
    """Point ``live`` of ``name`` at ``version`` in one request. ``MlflowClient``'s own
    method first reads the whole registered model to refuse prompts (never ours): one
    request more for every version the sleep worker registers, on a tracking server that
    is the consolidation's bottleneck on a CPU box (10-50 ms of its CPU a request)."""
    registry = getattr(c, "_get_registry_client", None)  # MLflow 3.x; else the public way
    if registry is None:
        c.set_registered_model_alias(name, LIVE, version)
    else:
        registry().set_registered_model_alias(name, LIVE, version)


def published(mv: ModelVersion) -> FastWeightsPublished:
    return published_from_tags(str(mv.version), mv.tags)


def published_from_tags(version: str, t: dict[str, str]) -> FastWeightsPublished:
    return FastWeightsPublished(
        scope_id=t["scope_id"],
        version=version,
        artifact_uri=t["artifact_uri"],
        sha256=t["sha256"],
        watermark=int(t["watermark"]),
        base_model_version=t["base_model_version"],
        job_id=t["job_id"],
    )


def get_version(tracking_uri: str, scope_id: str, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking_uri).get_model_version(
            fast_weights_model_name(scope_id), str(version)
        )
    except MlflowException as e:
        raise VersionNotFound(f"scope {scope_id!r} has no fast-weights version {version}") from e


def published_for_version(tracking_uri: str, scope_id: str, version: str) -> FastWeightsPublished:
    return published(get_version(tracking_uri, scope_id, version))


def set_live(tracking_uri: str, scope_id: str, version: str) -> FastWeightsPublished:
    mv = get_version(tracking_uri, scope_id, version)
    _move_live(client(tracking_uri), mv.name, str(mv.version))
    return published(mv)


def latest_live(tracking_uri: str, scope_id: str) -> FastWeightsPublished | None:
    """What a scope serves now (its ``live`` alias), or None for a scope never consolidated."""
    mv = live_version(tracking_uri, scope_id)
    return None if mv is None else published(mv)


def live_version(
    tracking_uri: str, scope_id: str, model: RegisteredModel | None = None
) -> ModelVersion | None:
    """The registry's record of the scope's ``live`` version (None: never consolidated).
    With ``model`` (from :func:`registered_models`) the alias is read from it."""
    if model is None:
        return get_by_alias(client(tracking_uri), fast_weights_model_name(scope_id), LIVE)
    version = model.aliases.get(LIVE)
    return None if version is None else get_version(tracking_uri, scope_id, str(version))


def registered_models(tracking_uri: str, scope_ids: list[str]) -> dict[str, RegisteredModel]:
    """The registered models of many scopes, by scope, with their aliases (``live``) and
    tags (retractions): one search per 100 scopes instead of two calls per scope. Scopes
    never consolidated are absent."""
    by_name = {fast_weights_model_name(s): s for s in scope_ids}
    names, c, out = sorted(by_name), client(tracking_uri), {}
    for i in range(0, len(names), 100):
        quoted = ", ".join(f"'{n}'" for n in names[i : i + 100])  # safe chars only
        token = None
        while True:
            page = c.search_registered_models(
                f"name IN ({quoted})", max_results=1000, page_token=token
            )
            out.update({by_name[m.name]: m for m in page if m.name in by_name})
            token = page.token
            if not token:
                break
    return out


def list_versions(tracking_uri: str, scope_id: str) -> list[ModelVersion]:
    """All versions of a scope, oldest first."""
    name = fast_weights_model_name(scope_id)
    found = client(tracking_uri).search_model_versions(f"name = '{name}'")
    return sorted(found, key=lambda mv: int(mv.version))


def list_scopes(tracking_uri: str) -> list[str]:
    """Every scope that has fast weights in the registry."""
    c = client(tracking_uri)
    scopes, token = [], None
    while True:
        page = c.search_registered_models(
            f"name LIKE '{FAST_WEIGHTS_PREFIX}%'", max_results=1000, page_token=token
        )
        scopes += [s for s in (scope_from_model_name(m.name) for m in page) if s]
        token = page.token
        if not token:
            return sorted(scopes)
