"""Verifying and loading a published fast-weights version: what the agent swaps in and what
a sleep starts from. The registry is the record; each process keeps what it verified (or
registered itself) in a small cache.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consolidation.exceptions import ArtifactRejected, VersionNotFound
from consolidation.fast_weights import (
    FastWeights,
    fast_weights_model_name,
    get_version,
    published_from_tags,
)
from consolidation.tracking import client, sha256_file
from streams.records import FastWeightsPublished

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

_SEARCH_NAMES = 100  # model names per registry search (the filter string stays short)


def load_fast_weights(
    tracking_uri: str,
    published: FastWeightsPublished,
    expected_scope: str,
    *,
    blob_root: Path | None = None,
    registered: ModelVersion | None = None,
) -> FastWeights:
    """Verify and load a published artifact, or raise :class:`ArtifactRejected`.

    Checks, in order: the event is for ``expected_scope``; the registry holds that version
    for that scope with the same sha256 and artifact URI (so a forged event cannot point a
    scope at another scope's file), or a sleep worker of this data dir recorded exactly
    this registration beside its copy of the bytes (``blobs.registered_here``: no registry
    round trip); the bytes hash to that sha256; the file's own metadata names the scope.
    The bytes come from the local copy under ``blob_root`` (see :mod:`consolidation.blobs`)
    when there is a good one, else from the tracking server.
    ``registered`` is the registry's record of the version when the caller looked it up
    already (:func:`registered_versions`); it is checked the same way.
    """
    import mlflow.artifacts

    from consolidation import blobs

    if published.scope_id != expected_scope:
        raise ArtifactRejected(
            f"fast weights of scope {published.scope_id!r} offered to scope {expected_scope!r}"
        )
    if blob_root is None or not blobs.registered_here(blob_root, published):
        _check_registered(tracking_uri, published, expected_scope, registered)
    cached = _cache_get(tracking_uri, expected_scope, published)
    if cached is not None:
        return cached
    local = blobs.find(blob_root, published.sha256) if blob_root is not None else None
    loaded = None
    if local is not None:
        try:
            loaded = _read_verified(local, published, expected_scope)
        except ArtifactRejected as e:  # a damaged copy: the tracking server has the record
            log.warning("local copy refused (%s); downloading", e)
    if loaded is None:
        with tempfile.TemporaryDirectory(prefix="somna-fw-") as tmp:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=published.artifact_uri, dst_path=tmp, tracking_uri=tracking_uri
            )
            loaded = _read_verified(Path(path), published, expected_scope)
    remember(tracking_uri, published, *loaded)
    return _cache_get(tracking_uri, expected_scope, published)  # type: ignore[return-value]


def _check_registered(
    tracking_uri: str,
    published: FastWeightsPublished,
    expected_scope: str,
    registered: ModelVersion | None,
) -> None:
    """Refuse ``published`` unless the registry holds that version for that scope, and
    the version's lineage tags match the event in every field."""
    mv = registered
    if mv is None or (mv.name, str(mv.version)) != (
        fast_weights_model_name(expected_scope),
        published.version,
    ):
        try:
            mv = get_version(tracking_uri, expected_scope, published.version)
        except VersionNotFound as e:
            raise ArtifactRejected(str(e)) from e
    tags = mv.tags
    if tags.get("scope_id") != expected_scope:
        raise ArtifactRejected(f"version {mv.version} is tagged for scope {tags.get('scope_id')!r}")
    try:
        record = published_from_tags(str(mv.version), tags)
    except (KeyError, ValueError) as e:
        raise ArtifactRejected(f"version {mv.version} has no complete lineage tags: {e}") from e
    # Every field: a genuine artifact under a forged watermark would drop unconsolidated
    # events from the agent's memory (invariant 1).
    differ = sorted(k for k, v in record.model_dump().items() if getattr(published, k) != v)
    if differ:
        raise ArtifactRejected(
            f"event for {expected_scope!r} v{published.version} does not match the registry "
            f"({', '.join(differ)} differ)"
        )


def registered_versions(
    tracking_uri: str, published: list[FastWeightsPublished]
) -> dict[tuple[str, str], ModelVersion]:
    """The registry's records of many published versions, by (scope, version), in one
    search per ``_SEARCH_NAMES`` scopes. Publishes whose version is not found are left out
    (:func:`load_fast_weights` then asks for it alone, and refuses it if it is not there)."""
    wanted = {(p.scope_id, p.version) for p in published if p.version.isdigit()}
    if not wanted:
        return {}
    names = sorted({fast_weights_model_name(scope) for scope, _ in wanted})
    low = min(int(version) for _, version in wanted)
    c, out = client(tracking_uri), {}
    for i in range(0, len(names), _SEARCH_NAMES):
        quoted = ", ".join(f"'{n}'" for n in names[i : i + _SEARCH_NAMES])  # safe chars only
        query, token = f"name IN ({quoted}) AND version_number >= {low}", None
        while True:
            page = c.search_model_versions(query, page_token=token)
            for mv in page:
                key = (mv.tags.get("scope_id", ""), str(mv.version))
                if key in wanted and mv.name == fast_weights_model_name(key[0]):
                    out[key] = mv
            token = page.token
            if not token:
                break
    return out


def _read_verified(
    local: Path, published: FastWeightsPublished, expected_scope: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and metadata of an artifact file whose bytes hash to the published sha256."""
    from safetensors import safe_open
    from safetensors.torch import load_file

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
    if "format" not in metadata:
        return load_file(str(local), device="cpu"), metadata
    # The model's format: also check its content hash.
    from model.artifact import load_artifact
    from model.exceptions import ArtifactError

    try:
        return load_artifact(local)
    except ArtifactError as e:
        raise ArtifactRejected(str(e)) from e


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
