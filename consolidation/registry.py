"""The MLflow model registry of Somna: the base model and every scope's fast weights.

Layout (contract 3):
- the base model is the registered model ``somna-hybrid``; alias ``production`` is the one
  every worker serves. When the registry has no ``production`` alias, the checkpoint shipped
  under ``model/checkpoints/`` is logged as the artifacts of a run and registered.
- each scope's fast weights are one registered model, named from the scope id
  (:func:`fast_weights_model_name`), whose versions are safetensors files (never pickles)
  with their lineage in tags (:data:`LINEAGE_TAGS`); alias ``live`` is the version served.
  One model per scope (not one shared model with a scope tag) keeps the alias, the version
  history and the lookups of a scope independent of how many scopes exist; the measurement
  behind that choice is ``python -m consolidation.layout_probe``.

Everything goes through the tracking server's REST API and its artifact proxy, so the
same code works against a remote server with an object-store artifact root.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consolidation.exceptions import ArtifactRejected, BaseModelMissing, VersionNotFound
from streams.records import FastWeightsPublished

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "somna-hybrid"
PRODUCTION = "production"
LIVE = "live"
FAST_WEIGHTS_PREFIX = "somna-fw-"
FAST_WEIGHTS_FILE = "fast_weights.safetensors"
BASE_EXPERIMENT = "somna-base-models"
SLEEP_EXPERIMENT = "somna-sleep"
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
_SHIPPED_DIR = Path(__file__).resolve().parent.parent / "model" / "checkpoints"
_SAFE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")


@dataclass
class BaseModel:
    """The served base model: the loaded ``HybridLM`` and its registry version."""

    lm: Any  # model.HybridLM (kept untyped so this module imports without torch)
    version: str
    checkpoint_dir: Path


@dataclass
class FastWeights:
    """A verified fast-weights artifact of one scope."""

    scope_id: str
    version: str
    tensors: dict[str, Any]  # name -> torch.Tensor (CPU)
    metadata: dict[str, str]
    watermark: int
    base_model_version: str


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


# --- names and clients -------------------------------------------------------------------


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


def client(tracking_uri: str) -> MlflowClient:
    # Progress bars of artifact transfers would flood worker logs.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _is_missing(err: Exception) -> bool:
    return getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _get_by_alias(c: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if _is_missing(e) or "not found" in str(e).lower() or "does not exist" in str(e).lower():
            return None
        raise


def _ensure_registered_model(c: MlflowClient, name: str, tags: dict[str, str]) -> None:
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


# --- base model --------------------------------------------------------------------------


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


def register_base_model(
    tracking_uri: str,
    checkpoint_dir: Path,
    *,
    alias: str = PRODUCTION,
    only_if_missing: bool = False,
) -> str:
    """Log a checkpoint dir as the artifacts of a run, register it, point ``alias`` at it.

    With ``only_if_missing`` the alias is left alone when another process set it meanwhile
    (workers starting together), and the version it points at is returned.
    """
    c = client(tracking_uri)
    run = c.create_run(
        experiment_id(c, BASE_EXPERIMENT),
        run_name=f"register-{checkpoint_dir.name}",
        tags={"somna.kind": "base-model", "checkpoint": checkpoint_dir.name},
    )
    c.log_artifacts(run.info.run_id, str(checkpoint_dir), artifact_path="model")
    c.set_terminated(run.info.run_id)
    _ensure_registered_model(c, BASE_MODEL_NAME, {"somna.kind": "base-model"})
    mv = c.create_model_version(
        BASE_MODEL_NAME,
        source=f"{run.info.artifact_uri}/model",
        run_id=run.info.run_id,
        tags={"checkpoint": checkpoint_dir.name},
    )
    if only_if_missing:
        winner = _get_by_alias(c, BASE_MODEL_NAME, alias)
        if winner is not None:
            return str(winner.version)
    c.set_registered_model_alias(BASE_MODEL_NAME, alias, mv.version)
    log.info("registered base model %s version %s as %r", checkpoint_dir, mv.version, alias)
    return str(mv.version)


def base_model_version(tracking_uri: str, *, alias: str = PRODUCTION) -> str | None:
    mv = _get_by_alias(client(tracking_uri), BASE_MODEL_NAME, alias)
    return None if mv is None else str(mv.version)


def _cache_root() -> Path:
    root = os.environ.get("SOMNA_CACHE_DIR")
    return Path(root) if root else Path(tempfile.gettempdir()) / "somna-cache"


def download_base_model(tracking_uri: str, version: str) -> Path:
    """The checkpoint dir of a base-model version, downloaded once per host into a cache."""
    import mlflow.artifacts

    c = client(tracking_uri)
    mv = c.get_model_version(BASE_MODEL_NAME, version)
    # Keyed by server and source: version 1 of one server is not version 1 of another.
    key = hashlib.sha256(f"{tracking_uri}\0{mv.source}".encode()).hexdigest()[:16]
    dest = _cache_root() / "base" / f"{BASE_MODEL_NAME}-v{version}-{key}"
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
    tracking_uri: str, *, alias: str = PRODUCTION, checkpoint_dir: Path | None = None
) -> BaseModel:
    """Load the base model at ``alias``, registering the shipped checkpoint when none is."""
    from model import HybridLM

    version = base_model_version(tracking_uri, alias=alias)
    if version is None:
        version = register_base_model(
            tracking_uri, checkpoint_dir or shipped_checkpoint(), alias=alias, only_if_missing=True
        )
    local = download_base_model(tracking_uri, version)
    lm = HybridLM.load(local)
    lm.eval()
    return BaseModel(lm=lm, version=version, checkpoint_dir=local)


# --- fast weights: write, register, publish -----------------------------------------------


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
            if not _is_missing(e):
                raise
            _ensure_registered_model(
                c, name, {"scope_id": lineage.scope_id, "somna.kind": "fast-weights"}
            )
            mv = create()
    if move_live:
        c.set_registered_model_alias(name, LIVE, mv.version)
    return published(mv)


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
    client(tracking_uri).set_registered_model_alias(mv.name, LIVE, mv.version)
    return published(mv)


def latest_live(tracking_uri: str, scope_id: str) -> FastWeightsPublished | None:
    """What a scope serves now (its ``live`` alias), or None for a scope never consolidated."""
    mv = _get_by_alias(client(tracking_uri), fast_weights_model_name(scope_id), LIVE)
    return None if mv is None else published(mv)


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


# --- fast weights: load and verify --------------------------------------------------------


def load_fast_weights(
    tracking_uri: str, published: FastWeightsPublished, expected_scope: str
) -> FastWeights:
    """Download, verify and load a published artifact, or raise :class:`ArtifactRejected`.

    Checks, in order: the event is for ``expected_scope``; the registry holds that version
    for that scope with the same sha256 and artifact URI (so a forged event cannot point a
    scope at another scope's file); the downloaded bytes hash to that sha256; the file's own
    metadata names the same scope.
    """
    import mlflow.artifacts
    from safetensors import safe_open
    from safetensors.torch import load_file

    if published.scope_id != expected_scope:
        raise ArtifactRejected(
            f"fast weights of scope {published.scope_id!r} offered to scope {expected_scope!r}"
        )
    try:
        mv = get_version(tracking_uri, expected_scope, published.version)
    except VersionNotFound as e:
        raise ArtifactRejected(str(e)) from e
    tags = mv.tags
    if tags.get("scope_id") != expected_scope:
        raise ArtifactRejected(f"version {mv.version} is tagged for scope {tags.get('scope_id')!r}")
    if tags.get("sha256") != published.sha256 or tags.get("artifact_uri") != published.artifact_uri:
        raise ArtifactRejected(
            f"event for {expected_scope!r} v{published.version} does not match the registry "
            "(sha256 or artifact uri differ)"
        )
    cached = _cache_get(tracking_uri, expected_scope, published)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="somna-fw-") as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=published.artifact_uri, dst_path=tmp, tracking_uri=tracking_uri
            )
        )
        actual = sha256_file(local)
        if actual != published.sha256:
            raise ArtifactRejected(
                f"artifact of {expected_scope!r} v{published.version}: sha256 {actual[:12]}... "
                f"!= published {published.sha256[:12]}..."
            )
        with safe_open(str(local), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        if metadata.get("scope_id") != expected_scope:
            raise ArtifactRejected(
                f"artifact file names scope {metadata.get('scope_id')!r}, expected {expected_scope!r}"
            )
        if "format" in metadata:  # the model's format: also check its content hash
            from model.artifact import load_artifact
            from model.exceptions import ArtifactError

            try:
                tensors, metadata = load_artifact(local)
            except ArtifactError as e:
                raise ArtifactRejected(str(e)) from e
        else:
            tensors = load_file(str(local), device="cpu")
    remember(tracking_uri, published, tensors, metadata)
    return _cache_get(tracking_uri, expected_scope, published)  # type: ignore[return-value]


# A few thousand verified artifacts kept in memory: a sleep worker's next job of a scope
# starts from the version it registered itself, and need not download it again. Keyed by
# the sha256 the registry holds, so the registry checks above still run on every load.
_CACHE: OrderedDict[tuple[str, str, str, str], FastWeights] = OrderedDict()
_CACHE_SIZE = 4096
_CACHE_LOCK = threading.Lock()  # planners and registering threads share it


def _cache_get(uri: str, scope: str, pub: FastWeightsPublished) -> FastWeights | None:
    key = (uri, scope, pub.version, pub.sha256)
    with _CACHE_LOCK:
        fw = _CACHE.get(key)
        if fw is not None:
            _CACHE.move_to_end(key)
        return fw


def remember(
    uri: str, pub: FastWeightsPublished, tensors: dict[str, Any], metadata: dict[str, str]
) -> None:
    """Cache what this process just registered (the tensors it wrote, not a download)."""
    key = (uri, pub.scope_id, pub.version, pub.sha256)
    fw = FastWeights(
        pub.scope_id, pub.version, tensors, metadata, pub.watermark, pub.base_model_version
    )
    with _CACHE_LOCK:
        _CACHE[key] = fw
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)


# --- retractions: tombstones the sleep workers honour --------------------------------------

_RETRACTED_PREFIX = "retracted."


def record_retraction(tracking_uri: str, scope_id: str, event_id: str, reason: str = "") -> None:
    """Remember on the scope's registered model that ``event_id`` is retracted.

    The Kafka log still holds the event's text; every later sleep of the scope leaves it
    out (the registry is the one store all sleep workers share, wherever they run).
    """
    c = client(tracking_uri)
    name = fast_weights_model_name(scope_id)
    _ensure_registered_model(c, name, {"scope_id": scope_id, "somna.kind": "fast-weights"})
    c.set_registered_model_tag(name, _RETRACTED_PREFIX + event_id, reason or "retracted")


def retracted_event_ids(tracking_uri: str, scope_id: str) -> set[str]:
    from mlflow.exceptions import MlflowException

    try:
        rm = client(tracking_uri).get_registered_model(fast_weights_model_name(scope_id))
    except MlflowException as e:
        if _is_missing(e) or "not found" in str(e).lower():
            return set()
        raise
    return {k[len(_RETRACTED_PREFIX) :] for k in rm.tags if k.startswith(_RETRACTED_PREFIX)}
