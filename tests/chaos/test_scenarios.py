"""Chaos scenarios (marker ``chaos``): zero lost and zero misrouted under every fault.

Run: ``.venv/bin/python -m pytest tests/chaos -m chaos -x -q``. Each scenario's counts
are printed (``-s`` shows them); ``somna bench chaos`` prints them as a table.
"""

from __future__ import annotations

import json

import pytest

from . import scenarios
from .checker import Outcome
from .harness import Cluster

pytestmark = [pytest.mark.chaos, pytest.mark.kafka, pytest.mark.mlflow, pytest.mark.slow]


def _show(out: Outcome) -> None:
    print(json.dumps(out.as_dict(), indent=1, default=str))


def _assert_invariants(out: Outcome) -> None:
    assert out.sent > 0, out.notes
    assert out.lost == 0, out.details
    assert out.misrouted == 0, out.details
    assert out.duplicated == 0, out.details


def test_kill_stream_worker(chaos_cluster: Cluster) -> None:
    out = scenarios.kill_stream_worker(chaos_cluster)
    _show(out)
    _assert_invariants(out)
    assert out.recover_s is not None


def test_kill_sleep_worker(chaos_cluster: Cluster) -> None:
    out = scenarios.kill_sleep_worker(chaos_cluster)
    _show(out)
    _assert_invariants(out)
    assert out.details["jobs_unfinished"] == 0
    assert out.details["jobs_with_two_versions"] == 0


def test_broker_outage(chaos_cluster: Cluster) -> None:
    out = scenarios.broker_outage(chaos_cluster)
    _show(out)
    _assert_invariants(out)


def test_mlflow_kill(chaos_cluster: Cluster) -> None:
    out = scenarios.mlflow_kill(chaos_cluster)
    _show(out)
    _assert_invariants(out)
    assert out.details["jobs_unfinished"] == 0


def test_disk_full(chaos_cluster: Cluster) -> None:
    if chaos_cluster.tmpfs is None:
        pytest.xfail(f"cannot mount a tmpfs here (needs root): {chaos_cluster.tmpfs_error}")
    out = scenarios.disk_full(chaos_cluster)
    _show(out)
    _assert_invariants(out)


def test_poison_inputs(chaos_cluster: Cluster) -> None:
    out = scenarios.poison(chaos_cluster)
    _show(out)
    _assert_invariants(out)
    assert out.details["crashes"].get("stream", 0) == 0, "bad input stopped the stream worker"
    assert out.details["poison_not_dead_lettered"] == 0, out.details["poison"]
    assert out.details["path_scope_leaked"] == []


def test_forged_fast_weights(chaos_cluster: Cluster) -> None:
    out = scenarios.forged_fast_weights(chaos_cluster)
    _show(out)
    _assert_invariants(out)
    assert out.details.get("served_foreign_or_forged") == 0
    assert out.details.get("scope_a_dropped_its_version") == 0
