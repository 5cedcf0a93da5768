"""One chaos cluster for the whole suite: starting a broker, a tracking server and two
workers costs more than any scenario, and each scenario uses its own fresh scope ids."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from .harness import Cluster, new_root
from .scenarios import warm_up


@pytest.fixture(scope="session")
def chaos_cluster() -> Iterator[Cluster]:
    root = new_root()
    cluster = Cluster(root)
    try:
        cluster.start()
        warm_up(cluster)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _healthy(request: pytest.FixtureRequest) -> None:
    """Restart whatever an earlier scenario left dead, before the next one starts."""
    if "chaos_cluster" in request.fixturenames:
        request.getfixturevalue("chaos_cluster").heal()
