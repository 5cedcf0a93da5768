"""Registry of fast weights against a real MLflow server: lineage, idempotence, checks."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from consolidation import fast_weights, fast_weights_load, retraction_record, tracking
from consolidation.exceptions import ArtifactRejected

pytestmark = pytest.mark.mlflow


def _scope() -> str:
    return f"user:{uuid.uuid4().hex[:10]}"


def _register(uri: str, scope: str, tmp: Path, job: str, value: float, parent: str | None = None):
    c = tracking.client(uri)
    run = c.create_run(tracking.experiment_id(c, tracking.SLEEP_EXPERIMENT)).info.run_id
    f = tmp / f"{job}.safetensors"
    fast_weights.write_artifact(
        f, {"s0": torch.full((2, 3), value)}, {"scope_id": scope, "job_id": job}
    )
    lineage = fast_weights.Lineage(
        scope_id=scope,
        job_id=job,
        parent_version=parent,
        base_model_version="1",
        from_watermark=0,
        to_watermark=10 + int(value),
        passes=2,
        tokens=40,
    )
    return fast_weights.register_fast_weights(uri, run_id=run, local_file=f, lineage=lineage)


def test_model_names_are_injective_and_reversible() -> None:
    names = {fast_weights.fast_weights_model_name(s) for s in ("a_b", "a:b", "a_3ab", "a.b", "a-b")}
    assert len(names) == 5
    for s in ("user:x@y.z", "a_b-c"):
        assert fast_weights.scope_from_model_name(fast_weights.fast_weights_model_name(s)) == s


def test_register_moves_live_and_retry_reuses_version(mlflow_uri: str, tmp_path: Path) -> None:
    scope = _scope()
    assert fast_weights.latest_live(mlflow_uri, scope) is None
    v1 = _register(mlflow_uri, scope, tmp_path, "job-a", 1.0)
    v2 = _register(mlflow_uri, scope, tmp_path, "job-b", 2.0, parent=v1.version)
    assert fast_weights.latest_live(mlflow_uri, scope) == v2
    again = _register(mlflow_uri, scope, tmp_path, "job-b", 2.0, parent=v1.version)
    assert again.version == v2.version
    versions = fast_weights.list_versions(mlflow_uri, scope)
    assert [mv.version for mv in versions] == [v1.version, v2.version]
    assert versions[1].tags["parent_version"] == v1.version
    assert versions[1].tags["sha256"] == v2.sha256
    fw = fast_weights_load.load_fast_weights(mlflow_uri, v2, scope)
    assert torch.equal(fw.tensors["s0"], torch.full((2, 3), 2.0))


def test_sha256_mismatch_is_refused(mlflow_uri: str, tmp_path: Path) -> None:
    scope = _scope()
    pub = _register(mlflow_uri, scope, tmp_path, "job-t", 1.0)
    # Overwrite the stored artifact through the server with other bytes of the same name.
    run_id = fast_weights.get_version(mlflow_uri, scope, pub.version).run_id
    evil = tmp_path / "evil" / pub.artifact_uri.rsplit("/", 1)[-1]
    fast_weights.write_artifact(evil, {"s0": torch.full((2, 3), 9.0)}, {"scope_id": scope})
    sub = pub.artifact_uri.split("/artifacts/", 1)[1].rsplit("/", 1)[0]
    tracking.client(mlflow_uri).log_artifact(run_id, str(evil), artifact_path=sub)
    with pytest.raises(ArtifactRejected, match="sha256"):
        fast_weights_load.load_fast_weights(mlflow_uri, pub, scope)


def test_scope_a_weights_never_load_for_scope_b(mlflow_uri: str, tmp_path: Path) -> None:
    a, b = _scope(), _scope()
    pub_a = _register(mlflow_uri, a, tmp_path, "job-a", 1.0)
    pub_b = _register(mlflow_uri, b, tmp_path, "job-b", 2.0)
    with pytest.raises(ArtifactRejected):
        fast_weights_load.load_fast_weights(mlflow_uri, pub_a, b)
    # A forged event that claims scope b but points at a's artifact.
    forged = pub_b.model_copy(update={"artifact_uri": pub_a.artifact_uri, "sha256": pub_a.sha256})
    with pytest.raises(ArtifactRejected):
        fast_weights_load.load_fast_weights(mlflow_uri, forged, b)
    assert fast_weights_load.load_fast_weights(mlflow_uri, pub_b, b).scope_id == b


def test_retractions_are_recorded_per_scope(mlflow_uri: str) -> None:
    a, b = _scope(), _scope()
    retraction_record.record_retraction(mlflow_uri, a, "ev-1", "wrong")
    assert retraction_record.retracted_event_ids(mlflow_uri, a) == {"ev-1"}
    assert retraction_record.retracted_event_ids(mlflow_uri, b) == set()


def test_one_lookup_finds_a_burst_of_publishes(mlflow_uri: str, tmp_path: Path) -> None:
    a, b = _scope(), _scope()
    a1 = _register(mlflow_uri, a, tmp_path, "job-a1", 1.0)
    a2 = _register(mlflow_uri, a, tmp_path, "job-a2", 2.0, parent=a1.version)
    b1 = _register(mlflow_uri, b, tmp_path, "job-b1", 3.0)
    forged = b1.model_copy(update={"version": str(int(b1.version) + 5)})
    found = fast_weights_load.registered_versions(mlflow_uri, [a2, b1, forged])
    assert set(found) == {(a, a2.version), (b, b1.version)}
    assert found[(a, a2.version)].tags["sha256"] == a2.sha256
    # What the lookup found is checked like a lookup of its own, and loads the same.
    fw = fast_weights_load.load_fast_weights(mlflow_uri, b1, b, registered=found[(b, b1.version)])
    assert torch.equal(fw.tensors["s0"], torch.full((2, 3), 3.0))
    with pytest.raises(ArtifactRejected):  # a record of another version is not trusted
        fast_weights_load.load_fast_weights(
            mlflow_uri, forged, b, registered=found[(b, b1.version)]
        )


def test_one_search_finds_the_live_alias_and_retractions_of_many_scopes(
    mlflow_uri: str, tmp_path: Path
) -> None:
    a, b, never = _scope(), _scope(), _scope()
    a1 = _register(mlflow_uri, a, tmp_path, "job-s-a1", 1.0)
    a2 = _register(mlflow_uri, a, tmp_path, "job-s-a2", 2.0, parent=a1.version)
    retraction_record.record_retraction(mlflow_uri, b, "ev-9")  # a model, no version yet
    models = fast_weights.registered_models(mlflow_uri, [a, b, never])
    assert set(models) == {a, b}
    assert retraction_record.retracted_in(models[b].tags) == {"ev-9"}
    assert retraction_record.retracted_in(models[a].tags) == set()
    # The alias read from the search names the same version as asking for it alone.
    live = fast_weights.live_version(mlflow_uri, a, models[a])
    assert live is not None and fast_weights.published(live) == a2
    assert fast_weights.live_version(mlflow_uri, a) is not None
    assert fast_weights.live_version(mlflow_uri, b, models[b]) is None


def test_a_version_costs_two_registry_requests_to_plan_and_four_to_register(
    mlflow_uri: str, tmp_path: Path, base_model
) -> None:
    # `somna bench registry` on three scopes: what the sleep worker asks the tracking
    # server per version (its bottleneck on a CPU box), counted at the HTTP client.
    from benchmarks.registry import _measure

    steps = _measure(mlflow_uri, tmp_path / "somna", 3)
    plan = steps["plan, retractions in one search"]["by_endpoint"]
    assert plan == {
        "GET mlflow/model-versions/search": 3,  # the job's version, if a retry registered it
        "GET mlflow/registered-models/alias": 3,  # live: the parent and its record
        "GET mlflow/registered-models/search": 1,  # the wave's retractions
    }
    register = steps["register (run_batch: sleep + upload + version + alias)"]["by_endpoint"]
    for endpoint in ("PUT mlflow-artifacts/artifacts/...", "GET mlflow-artifacts/artifacts",
                     "POST mlflow/model-versions/create", "POST mlflow/registered-models/alias"):  # fmt: skip
        assert register.pop(endpoint) == 3
    assert all(n == 1 or "log-parameter" in k for k, n in register.items())  # the batch's run
