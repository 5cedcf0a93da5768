"""Shared fixtures: a real Kafka broker and a real MLflow server, started once per session.

Both start lazily, the first time a test asks for them, on free ports in a temporary
data dir, and stop at the end of the session. ``SOMNA_KAFKA_BOOTSTRAP`` /
``SOMNA_MLFLOW_URI`` use existing ones instead (the topics are still provisioned).

Tests share the real topic names: use a unique consumer group id and unique scope ids
per test (e.g. ``f"g-{uuid.uuid4().hex}"``) to stay independent of each other.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from infra.ports import free_port as _free_port
from infra.settings import Settings

if TYPE_CHECKING:
    from infra.kafka import EmbeddedKafka

TEST_PARTITIONS = 4


def free_port() -> int:
    """A free local TCP port (also importable as ``infra.ports.free_port``)."""
    return _free_port()


def unique(prefix: str = "t") -> str:
    """A unique id for consumer groups, scopes and sessions of one test."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """'host:port' of a real broker with the Somna topics (TEST_PARTITIONS partitions)."""
    from infra.topics import provision

    existing = os.environ.get("SOMNA_KAFKA_BOOTSTRAP")
    if existing:
        provision(existing, TEST_PARTITIONS)
        yield existing
        return
    from infra.kafka import EmbeddedKafka

    kafka = EmbeddedKafka(tmp_path_factory.mktemp("kafka"), free_port(), free_port())
    kafka.start(timeout=240)
    try:
        provision(kafka.bootstrap, TEST_PARTITIONS)
        yield kafka.bootstrap
    finally:
        kafka.stop()


@pytest.fixture
def fresh_kafka(tmp_path: Path) -> Iterator[EmbeddedKafka]:
    """A broker of this test alone (topics provisioned), to stop, kill or restart at will:
    ``fresh_kafka.stop(); fresh_kafka.start()`` keeps the data dir and the ports."""
    from infra.kafka import EmbeddedKafka
    from infra.topics import provision

    kafka = EmbeddedKafka(tmp_path / "fresh-kafka", free_port(), free_port())
    kafka.start(timeout=240)
    try:
        provision(kafka.bootstrap, TEST_PARTITIONS)
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """'http://127.0.0.1:PORT' of a real `mlflow server` (sqlite + served artifacts)."""
    existing = os.environ.get("SOMNA_MLFLOW_URI")
    if existing:
        yield existing
        return
    from infra.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), free_port())
    server.start(timeout=300)
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def topics(kafka_bootstrap: str) -> ModuleType:
    """The topic names (``topics.INTERACTIONS`` ...), provisioned on ``kafka_bootstrap``."""
    import infra.topics

    return infra.topics


@pytest.fixture
def settings(kafka_bootstrap: str, mlflow_uri: str, tmp_path: Path) -> Settings:
    """Settings pointing at the session's broker and tracking server, with a fresh data dir."""
    return Settings(
        data_dir=tmp_path / "somna",
        kafka_bootstrap=kafka_bootstrap,
        mlflow_uri=mlflow_uri,
        partitions=TEST_PARTITIONS,
        metrics_port=0,
    )
