"""Chaos scenarios (marker ``chaos``): zero lost and zero misrouted under every fault.

Run: ``.venv/bin/python -m pytest tests/chaos -m chaos -x -q -s`` (``-s`` prints each
scenario's counts; ``somna bench chaos`` prints them as a table). The scenarios that restart
the stream worker come last: a wedged worker gets the cluster replaced (see conftest).
"""

from __future__ import annotations

import json

import pytest

from . import scenarios
from .checker import Outcome
from .harness import Cluster

pytestmark = [pytest.mark.chaos, pytest.mark.kafka, pytest.mark.mlflow, pytest.mark.slow]


def _check(out: Outcome, cluster: Cluster) -> None:
    print(json.dumps(out.as_dict(), indent=1, default=str))
    logs = "".join(f"\n--- {p.name} worker:\n{p.tail(15)}" for p in cluster.workers)
    assert out.sent > 0, f"{out.notes}{logs}"
    assert out.lost == 0, f"{out.details}{logs}"
    assert out.misrouted == 0, f"{out.details}{logs}"
    # Strict part of invariant 4 (a reply row stored twice is reported, not asserted).
    assert out.details["two_rows_or_two_reply_ids"] == 0, f"{out.details}{logs}"


def test_poison_inputs(chaos_cluster: Cluster) -> None:
    out = scenarios.poison(chaos_cluster)
    _check(out, chaos_cluster)
    assert out.details["crashes"].get("stream", 0) == 0, "bad input stopped the stream worker"
    assert out.details["poison_not_dead_lettered"] == 0, out.details["poison"]
    assert out.details["path_scope_leaked"] == []
    # A 10 MB text reaches the worker and becomes a small dead letter with its reason, and
    # the turns sent after it are answered (not refused at the producer, not a stuck worker).
    assert out.details["poison"].get("huge_text") == "dead-lettered", out.details["poison"]
    assert 0 < out.details["huge_text_letter_bytes"] < 256 * 1024
    assert out.details["turns_after_huge_text"] > 0
    assert out.details["turns_after_huge_text_unanswered"] == 0


def test_forged_fast_weights(chaos_cluster: Cluster) -> None:
    out = scenarios.forged_fast_weights(chaos_cluster)
    _check(out, chaos_cluster)
    assert out.details["served_foreign_or_forged"] == 0
    assert out.details["a_served_genuine_before"], "no genuine version served: nothing proven"
    assert out.details["scope_a_dropped_its_version"] == 0


def test_kill_sleep_worker(chaos_cluster: Cluster) -> None:
    out = scenarios.kill_sleep_worker(chaos_cluster)
    _check(out, chaos_cluster)
    # The sleep worker's own account, for a failure that the temp dir would take away.
    sleep_log = f"\n--- sleep worker:\n{chaos_cluster.sleep.tail(80)}"
    assert out.details["jobs_unfinished"] == 0, sleep_log
    assert out.details["jobs_with_two_versions"] == 0, sleep_log
    assert out.details["jobs_registered_twice"] == 0, sleep_log


def test_mlflow_kill(chaos_cluster: Cluster) -> None:
    out = scenarios.mlflow_kill(chaos_cluster)
    _check(out, chaos_cluster)
    assert out.details["jobs_unfinished"] == 0
    assert out.details["jobs_registered_twice"] == 0


def test_broker_outage(chaos_cluster: Cluster) -> None:
    out = scenarios.broker_outage(chaos_cluster)
    _check(out, chaos_cluster)
    # The Kafka client's retries are rate-limited (streams/log_limits.py): a few lines a
    # second per worker, where unlimited it wrote hundreds to thousands.
    assert out.details["client_log_lines_per_s"] <= 10, out.details["client_log_lines"]


def test_disk_full(chaos_cluster: Cluster) -> None:
    if chaos_cluster.tmpfs is None:
        pytest.xfail(f"cannot mount a tmpfs here (needs root): {chaos_cluster.tmpfs_error}")
    out = scenarios.disk_full(chaos_cluster)
    _check(out, chaos_cluster)


def test_kill_stream_worker(chaos_cluster: Cluster) -> None:
    out = scenarios.kill_stream_worker(chaos_cluster)
    _check(out, chaos_cluster)
    assert out.recover_s is not None
