"""Bad set-ups give one clear message that names the fix, and never touch existing data."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest

from infra.errors import SetupError
from infra.kafka import EmbeddedKafka
from infra.mlflow_server import MlflowServer
from infra.ports import free_port, free_ports


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_no_java_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(SetupError, match="openjdk-17-jre-headless") as e:
        EmbeddedKafka(tmp_path, *free_ports(2)).start()
    assert "SOMNA_KAFKA_BOOTSTRAP" in str(e.value)
    assert not (tmp_path / "kafka").exists()


@pytest.fixture
def listening_port() -> object:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_kafka_port_taken(listening_port: int, tmp_path: Path) -> None:
    with pytest.raises(SetupError, match=f"port {listening_port} is already in use") as e:
        EmbeddedKafka(tmp_path, listening_port, free_port()).start()
    message = str(e.value)
    assert "SOMNA_KAFKA_PORT" in message
    assert "pid " in message  # names who holds it (this test process)


def test_controller_port_taken(listening_port: int, tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="SOMNA_KAFKA_CONTROLLER_PORT"):
        EmbeddedKafka(tmp_path, free_port(), listening_port).start()


def test_mlflow_port_taken(listening_port: int, tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="SOMNA_MLFLOW_PORT"):
        MlflowServer(tmp_path, listening_port).start()


GARBAGE_META = b"\x00\xff this is not a properties file \x13\n"
FOREIGN_META = b"#\nnode.id=1\nversion=1\ncluster.id=AAAAAAAAAAAAAAAAAAAAAA\n"


@pytest.mark.parametrize(
    "files, says",
    [
        ({"kafka/data/meta.properties": GARBAGE_META}, "corrupt"),
        ({"kafka/data/meta.properties": b"just text\n"}, "corrupt"),
        ({"kafka/data/somna.interactions-0/00.log": b"log bytes"}, "no meta.properties"),
        ({"kafka/data/meta.properties": FOREIGN_META}, "not to the one Somna formatted"),
        (
            {
                "kafka/data/meta.properties": FOREIGN_META,
                "kafka/cluster.id": b"BBBBBBBBBBBBBBBBBBBBBB\n",
            },
            "belongs to cluster AAAAAAAAAAAAAAAAAAAAAA",
        ),
        (
            {"kafka/data/meta.properties": FOREIGN_META.replace(b"node.id=1", b"node.id=7")},
            "node 7 of another cluster",
        ),
        ({"kafka": b"a file where a dir belongs"}, "is a file"),
    ],
)
def test_corrupt_or_foreign_data_dir_is_left_alone(
    tmp_path: Path, files: dict[str, bytes], says: str
) -> None:
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    before = snapshot(tmp_path)
    with pytest.raises(SetupError, match=says) as e:
        EmbeddedKafka(tmp_path, *free_ports(2)).start()
    assert "--data-dir" in str(e.value) and "move it away" in str(e.value)
    assert snapshot(tmp_path) == before


def test_no_maven_and_no_cached_jars_names_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from infra.kafka import ensure_jars

    monkeypatch.setenv("SOMNA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SOMNA_KAFKA_JARS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(SetupError, match="apt-get install maven"):
        ensure_jars()


def test_cluster_ids_never_look_like_options() -> None:
    from infra.kafka import new_cluster_id

    ids = [new_cluster_id() for _ in range(2000)]  # about 1 in 64 would start with '-'
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
