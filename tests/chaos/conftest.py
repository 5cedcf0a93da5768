"""One chaos cluster for the whole suite: starting a broker, a tracking server and two
workers costs more than any scenario, and each scenario uses its own fresh scope ids.

Before each scenario one probe turn must go through the whole pipeline; when it does not
(an earlier scenario left a part wedged), the cluster is replaced by a fresh one, so that
one defect fails one scenario instead of all that follow. Set SOMNA_CHAOS_KEEP=1 to keep
the clusters' directories (logs of every part under ``<root>/logs``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from .harness import Cluster, new_root
from .scenarios import warm_up


@pytest.fixture(scope="session")
def chaos_cluster() -> Iterator[Cluster]:
    cluster = Cluster(new_root())
    roots = [cluster.root]
    try:
        cluster.start()
        warm_up(cluster)
        yield cluster
    finally:
        roots.append(cluster.root)
        cluster.stop()
        if not os.environ.get("SOMNA_CHAOS_KEEP"):
            for root in roots:
                shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _healthy(request: pytest.FixtureRequest) -> None:
    """Restart what died on its own; replace the cluster if a probe turn does not go through."""
    if "chaos_cluster" not in request.fixturenames:
        return
    cluster: Cluster = request.getfixturevalue("chaos_cluster")
    cluster.heal()
    try:
        warm_up(cluster, timeout=90)
    except RuntimeError:
        print(f"chaos cluster in {cluster.root} is wedged: starting a fresh one")
        cluster.reset()
        warm_up(cluster)
