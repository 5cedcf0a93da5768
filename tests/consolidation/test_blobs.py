"""The local copy of fresh artifacts (consolidation.blobs), against a real MLflow server."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
import torch

from consolidation import blobs, fast_weights, fast_weights_load, tracking
from consolidation.exceptions import ArtifactRejected
from streams.records import FastWeightsPublished

pytestmark = pytest.mark.mlflow


def _publish(uri: str, tmp: Path, value: float) -> tuple[FastWeightsPublished, Path]:
    """A registered version of a new scope, and the file it was registered from."""
    scope = f"user:{uuid.uuid4().hex[:10]}"
    c = tracking.client(uri)
    run = c.create_run(tracking.experiment_id(c, tracking.SLEEP_EXPERIMENT)).info.run_id
    f = tmp / scope.replace(":", "_") / fast_weights.FAST_WEIGHTS_FILE
    fast_weights.write_artifact(f, {"s0": torch.full((2, 3), value)}, {"scope_id": scope})
    lineage = fast_weights.Lineage(scope_id=scope, job_id="job-1", parent_version=None,
                               base_model_version="1", from_watermark=0, to_watermark=10,
                               passes=2, tokens=40)  # fmt: skip
    return fast_weights.register_fast_weights(uri, run_id=run, local_file=f, lineage=lineage), f


def _damage_server_copy(uri: str, pub: FastWeightsPublished, tmp: Path) -> None:
    """Replace the stored artifact, through the server, with other bytes of the same name."""
    run_id = fast_weights.get_version(uri, pub.scope_id, pub.version).run_id
    evil = tmp / "evil" / uuid.uuid4().hex / pub.artifact_uri.rsplit("/", 1)[-1]
    fast_weights.write_artifact(evil, {"s0": torch.full((2, 3), 9.0)}, {"scope_id": pub.scope_id})
    sub = pub.artifact_uri.split("/artifacts/", 1)[1].rsplit("/", 1)[0]
    tracking.client(uri).log_artifact(run_id, str(evil), artifact_path=sub)


def _damage_local_copy(root: Path, pub: FastWeightsPublished, tmp: Path) -> None:
    other = tmp / "other.safetensors"
    fast_weights.write_artifact(other, {"s0": torch.full((2, 3), 7.0)}, {"scope_id": pub.scope_id})
    shutil.copyfile(other, blobs.path_for(root, pub.sha256))


def test_swap_reads_the_local_copy_and_still_checks_its_sha256(
    mlflow_uri: str, tmp_path: Path
) -> None:
    root = blobs.root(tmp_path / "data")
    # A good local copy: the damaged server copy is never read.
    pub, f = _publish(mlflow_uri, tmp_path, 1.0)
    blobs.put(root, pub, f)
    _damage_server_copy(mlflow_uri, pub, tmp_path)
    fw = fast_weights_load.load_fast_weights(mlflow_uri, pub, pub.scope_id, blob_root=root)
    assert torch.equal(fw.tensors["s0"], torch.full((2, 3), 1.0))

    # A damaged local copy is refused; the tracking server's bytes are used.
    pub, f = _publish(mlflow_uri, tmp_path, 2.0)
    blobs.put(root, pub, f)
    _damage_local_copy(root, pub, tmp_path)
    fw = fast_weights_load.load_fast_weights(mlflow_uri, pub, pub.scope_id, blob_root=root)
    assert torch.equal(fw.tensors["s0"], torch.full((2, 3), 2.0))

    # Both damaged: refused, so the previous version keeps serving.
    pub, f = _publish(mlflow_uri, tmp_path, 3.0)
    blobs.put(root, pub, f)
    _damage_local_copy(root, pub, tmp_path)
    _damage_server_copy(mlflow_uri, pub, tmp_path)
    with pytest.raises(ArtifactRejected, match="sha256"):
        fast_weights_load.load_fast_weights(mlflow_uri, pub, pub.scope_id, blob_root=root)


def test_a_local_copy_does_not_skip_the_registry(mlflow_uri: str, tmp_path: Path) -> None:
    root = blobs.root(tmp_path / "data")
    pub, f = _publish(mlflow_uri, tmp_path, 4.0)
    blobs.put(root, pub, f)
    # An event naming a version the registry does not hold, with genuine bytes at hand.
    forged = pub.model_copy(update={"version": str(int(pub.version) + 1)})
    with pytest.raises(ArtifactRejected):
        fast_weights_load.load_fast_weights(mlflow_uri, forged, pub.scope_id, blob_root=root)


def test_a_publish_recorded_here_needs_no_registry(mlflow_uri: str, tmp_path: Path) -> None:
    root = blobs.root(tmp_path / "data")
    pub, f = _publish(mlflow_uri, tmp_path, 5.0)
    blobs.put(root, pub, f)
    assert blobs.registered_here(root, pub)
    # The swap right after a publish: the sleep worker's record and copy, no tracking server.
    nowhere = "http://127.0.0.1:9"
    fw = fast_weights_load.load_fast_weights(nowhere, pub, pub.scope_id, blob_root=root)
    assert torch.equal(fw.tensors["s0"], torch.full((2, 3), 5.0))
    # An event that differs from the record in any field is looked up in the registry.
    for change in ({"watermark": pub.watermark + 1}, {"scope_id": "user:other"}):
        other = pub.model_copy(update=change)
        assert not blobs.registered_here(root, other)
    with pytest.raises(ArtifactRejected):
        forged = pub.model_copy(update={"watermark": pub.watermark + 5})
        fast_weights_load.load_fast_weights(mlflow_uri, forged, pub.scope_id, blob_root=root)


def test_path_for_takes_only_a_sha256(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        blobs.path_for(tmp_path, "../../etc/passwd")
    assert blobs.find(tmp_path, "../x") is None
