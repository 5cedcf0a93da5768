"""Embedded Apache Kafka: one broker, single-node KRaft (broker and controller in one JVM).

The jars come from Maven Central: `mvn dependency:copy-dependencies` on `infra/kafka/pom.xml`
copies them once into ``~/.cache/somna/kafka-<hash of the pom>`` (see `jar_cache_dir`).
The broker keeps its state under ``<data_dir>/kafka/``:

    server.properties   rewritten on every start (ports may change)
    log4j.properties    the broker log goes to server.log beside it
    cluster.id          the id this data dir was formatted with
    data/               log.dirs: meta.properties and the topic partitions
    broker.pid          the running broker, to refuse a second one on the same dir

Storage is formatted only when ``data/`` is new; an existing one that we did not format
(garbage, or another cluster's) is never touched: the error says to move it away.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from infra.errors import SetupError
from infra.ports import free_port, free_ports, port_is_free, who_listens
from infra.process import pid_alive, spawn, tail, terminate
from infra.sync import run_sync

log = logging.getLogger(__name__)

POM = Path(__file__).parent / "kafka" / "pom.xml"
NODE_ID = 1
# A small heap: one dev broker on a laptop or a CI runner, next to torch.
DEFAULT_JAVA_OPTS = ("-Xms128m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true")

JAVA_FIX = (
    "install Java 17 (Debian/Ubuntu: `apt-get install openjdk-17-jre-headless`) or set "
    "JAVA_HOME; or point Somna at an existing cluster with SOMNA_KAFKA_BOOTSTRAP=host:port"
)
MAVEN_FIX = (
    "install Maven (Debian/Ubuntu: `apt-get install maven`), or put the Kafka jars in a "
    "directory and set SOMNA_KAFKA_JARS to it; or use SOMNA_KAFKA_BOOTSTRAP=host:port"
)

# --- the jars ----------------------------------------------------------------------------


def cache_root() -> Path:
    """``$SOMNA_CACHE_DIR``, else ``$XDG_CACHE_HOME/somna``, else ``~/.cache/somna``."""
    if os.environ.get("SOMNA_CACHE_DIR"):
        return Path(os.environ["SOMNA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "somna"


def pom_hash() -> str:
    """The cache key: the first 16 hex digits of the sha256 of the pom."""
    return hashlib.sha256(POM.read_bytes()).hexdigest()[:16]


def jar_cache_dir() -> Path:
    """Where `ensure_jars` puts the jars (``$SOMNA_KAFKA_JARS`` overrides it)."""
    if os.environ.get("SOMNA_KAFKA_JARS"):
        return Path(os.environ["SOMNA_KAFKA_JARS"])
    return cache_root() / f"kafka-{pom_hash()}"


def jars_ready(jars: Path | None = None) -> bool:
    jars = jars or jar_cache_dir()
    return jars.is_dir() and any(jars.glob("kafka_2.13-*.jar"))


def ensure_jars() -> Path:
    """The directory of the broker's jars, resolving them with Maven the first time."""
    jars = jar_cache_dir()
    if jars_ready(jars):
        return jars
    if os.environ.get("SOMNA_KAFKA_JARS"):
        raise SetupError(f"SOMNA_KAFKA_JARS={jars} holds no kafka_2.13-*.jar: {MAVEN_FIX}")
    mvn = shutil.which("mvn")
    if mvn is None:
        raise SetupError(f"Maven (`mvn`) is not on PATH; it fetches the Kafka jars: {MAVEN_FIX}")
    jars.parent.mkdir(parents=True, exist_ok=True)
    # Resolve into a temporary sibling and rename: a half-copied cache is never used.
    with tempfile.TemporaryDirectory(dir=jars.parent, prefix=".kafka-") as work:
        pom = Path(work) / "pom.xml"
        shutil.copyfile(POM, pom)
        out = Path(work) / "jars"
        log.info("resolving the Kafka jars from Maven Central into %s", jars)
        cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies"]
        cmd.append(f"-DoutputDirectory={out}")
        done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if done.returncode != 0 or not jars_ready(out):
            output = (done.stdout + done.stderr).strip().splitlines()[-15:]
            raise SetupError(
                "Maven could not resolve the Kafka jars (it needs Maven Central, or a mirror "
                "in ~/.m2/settings.xml):\n" + "\n".join(output)
            )
        try:
            out.rename(jars)
        except OSError:
            if not jars_ready(jars):  # lost a race to another process: fine if it won
                raise
    return jars


def find_java() -> str:
    """The java executable: ``$JAVA_HOME/bin/java``, else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise SetupError(f"Java is not installed (no `java` on PATH, no JAVA_HOME): {JAVA_FIX}")
    return java


# --- the data dir ------------------------------------------------------------------------


def new_cluster_id() -> str:
    """A Kafka cluster id: a random UUID, URL-safe base64 without padding (22 chars).

    Like Kafka's own Uuid.randomUuid, never one starting with '-', which the storage
    tool's command line would read as an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def read_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def check_data_dir(kafka_dir: Path) -> str | None:
    """The cluster id of an existing, healthy data dir; None when it is new.

    Raises SetupError, touching nothing, for a data dir Somna did not format.
    """
    where = f"{kafka_dir}"
    fix = (
        "Somna never deletes data: move it away (or delete it if you know it is "
        "disposable), or pick another data dir with --data-dir / SOMNA_DATA_DIR"
    )
    if kafka_dir.exists() and not kafka_dir.is_dir():
        raise SetupError(f"{where} is a file, not the Kafka data dir. {fix}")
    data = kafka_dir / "data"
    meta = data / "meta.properties"
    id_file = kafka_dir / "cluster.id"
    if data.exists() and not data.is_dir():
        raise SetupError(f"{data} is a file, not a Kafka log dir. {fix}")
    if not data.exists() or not any(data.iterdir()):
        if id_file.exists():
            raise SetupError(
                f"{data} is missing or empty but {id_file} says a cluster was formatted here: "
                f"the topic data is gone. {fix}"
            )
        return None
    if not meta.is_file():
        raise SetupError(
            f"{data} is not empty but has no meta.properties: not a Kafka data dir "
            f"formatted by Somna, or a damaged one. {fix}"
        )
    try:
        props = read_properties(meta)
    except (OSError, UnicodeDecodeError) as e:
        raise SetupError(f"{meta} cannot be read ({e}): the data dir is corrupt. {fix}") from e
    cluster_id = props.get("cluster.id", "")
    if not cluster_id or props.get("node.id") is None:
        raise SetupError(f"{meta} has no cluster.id/node.id: the data dir is corrupt. {fix}")
    if props.get("node.id") != str(NODE_ID):
        raise SetupError(
            f"{meta} belongs to node {props.get('node.id')} of another cluster "
            f"(the embedded broker is node {NODE_ID}). {fix}"
        )
    ours = id_file.read_text().strip() if id_file.is_file() else None
    if ours != cluster_id:
        raise SetupError(
            f"{meta} belongs to cluster {cluster_id}, not to the one Somna formatted here "
            f"({ours or 'none recorded in ' + str(id_file)}). {fix}"
        )
    return cluster_id


def server_properties(log_dir: Path, port: int, controller_port: int) -> str:
    """One node that is both broker and controller, with single-replica internal topics
    so that consumer groups, idempotent producers and transactions work on it."""
    return "\n".join(
        [
            "process.roles=broker,controller",
            f"node.id={NODE_ID}",
            f"controller.quorum.voters={NODE_ID}@127.0.0.1:{controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={log_dir}",
            # Topics are created by `infra.topics.provision`, never by a typo in a producer.
            "auto.create.topics.enable=false",
            "num.partitions=1",
            "default.replication.factor=1",
            "min.insync.replicas=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=10",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=10",
            # One member joins at a time here; waiting 3 s for more only slows tests down.
            "group.initial.rebalance.delay.ms=0",
            "delete.topic.enable=true",
            # After a crash the controller refuses the restarted broker until the old
            # incarnation's session expires (9 s by default); 5 s is still far above the
            # heartbeat interval on a loaded machine.
            "broker.heartbeat.interval.ms=500",
            "broker.session.timeout.ms=5000",
            "",
        ]
    )


def log4j_properties(log_file: Path) -> str:
    return "\n".join(
        [
            "log4j.rootLogger=INFO, file",
            "log4j.appender.file=org.apache.log4j.RollingFileAppender",
            f"log4j.appender.file.File={log_file}",
            "log4j.appender.file.MaxFileSize=50MB",
            "log4j.appender.file.MaxBackupIndex=3",
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout",
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n",
            "log4j.logger.kafka.request.logger=WARN",
            "log4j.logger.state.change.logger=WARN",
            "log4j.logger.kafka.log.LogCleaner=WARN",
            "",
        ]
    )


# --- readiness ---------------------------------------------------------------------------


async def _broker_count(bootstrap: str) -> int:
    """Brokers in the metadata that ``bootstrap`` answers with (0 if it does not answer)."""
    from aiokafka import AIOKafkaClient
    from aiokafka.errors import KafkaError

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await client.bootstrap()
        return len(client.cluster.brokers())
    except (KafkaError, OSError):
        return 0
    finally:
        await client.close()


def broker_answers(bootstrap: str) -> bool:
    """True when a broker at ``bootstrap`` answers a metadata request."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:  # a cheap connect first: aiokafka logs an error for every refused connection
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return False
    return run_sync(_broker_count(bootstrap)) > 0


# --- the broker --------------------------------------------------------------------------


class EmbeddedKafka:
    """A single-node KRaft broker in a JVM subprocess, with its data under ``data_dir/kafka``.

    >>> with EmbeddedKafka(Path(".somna"), port=9092, controller_port=9093) as kafka:
    ...     print(kafka.bootstrap)
    """

    def __init__(self, data_dir: Path, port: int = 9092, controller_port: int = 9093) -> None:
        """Port 0 picks a free one (tests)."""
        port = port or free_port()
        if not controller_port:  # a picked one is never the broker's
            controller_port = next(p for p in free_ports(2) if p != port)
        if port == controller_port:
            raise SetupError(f"the broker and controller ports are both {port}: pick two")
        self.data_dir = Path(data_dir).resolve()  # the JVM must not depend on our cwd
        self.kafka_dir = self.data_dir / "kafka"
        self.port = port
        self.controller_port = controller_port
        self.cluster_id: str | None = None
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.kafka_dir / "server.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 120.0) -> EmbeddedKafka:
        """Start the broker and wait until it answers metadata; raise SetupError otherwise."""
        if self.running:
            return self
        began = time.monotonic()
        java = find_java()
        self._refuse_second_broker()
        cluster_id = check_data_dir(self.kafka_dir)
        self._refuse_busy_ports()
        jars = ensure_jars()
        data = self.kafka_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        props = self.kafka_dir / "server.properties"
        props.write_text(server_properties(data, self.port, self.controller_port))
        log4j = self.kafka_dir / "log4j.properties"
        log4j.write_text(log4j_properties(self.log_file))
        base = [java, *DEFAULT_JAVA_OPTS, *os.environ.get("SOMNA_KAFKA_JAVA_OPTS", "").split()]
        base += [f"-Dlog4j.configuration=file:{log4j}", "-cp", f"{jars}/*"]
        if cluster_id is None:
            cluster_id = self._format(base, props)
        self.cluster_id = cluster_id
        self._proc = spawn([*base, "kafka.Kafka", str(props)], self.kafka_dir / "stdout.log")
        (self.kafka_dir / "broker.pid").write_text(str(self._proc.pid))
        try:
            self._wait_ready(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        log.info(
            "Kafka %s ready in %.1f s (log: %s)", self.bootstrap, self.start_seconds, self.log_file
        )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Controlled shutdown (SIGTERM), then SIGKILL after ``timeout`` seconds."""
        if self._proc is None:
            return
        code = terminate(self._proc, timeout)
        log.info("Kafka %s stopped (exit %s)", self.bootstrap, code)
        self._proc = None
        with contextlib.suppress(OSError):
            (self.kafka_dir / "broker.pid").unlink()

    def kill(self) -> None:
        """SIGKILL, no controlled shutdown: a crash, for fault-injection tests."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait()
        self._proc = None
        log.info("Kafka %s killed", self.bootstrap)

    def wait(self) -> int:
        """Block until the broker exits (for `somna kafka` in the foreground)."""
        assert self._proc is not None, "start() first"
        return self._proc.wait()

    def __enter__(self) -> EmbeddedKafka:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers --

    def _refuse_second_broker(self) -> None:
        pid_file = self.kafka_dir / "broker.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if pid_alive(pid) and b"kafka.Kafka" in cmdline:
                raise SetupError(
                    f"a Kafka broker (pid {pid}) already runs on {self.kafka_dir}: stop it, "
                    "or use it with SOMNA_KAFKA_BOOTSTRAP=host:port, or pick another --data-dir"
                )

    def _refuse_busy_ports(self) -> None:
        if not port_is_free(self.port):
            raise SetupError(
                f"the Kafka broker port {self.port} is already in use by "
                f"{who_listens(self.port)}: stop that process, or pick another port with "
                f"--port / SOMNA_KAFKA_PORT; if it is a Kafka broker, use it with "
                f"SOMNA_KAFKA_BOOTSTRAP=127.0.0.1:{self.port}"
            )
        if not port_is_free(self.controller_port):
            raise SetupError(
                f"the Kafka controller port {self.controller_port} is already in use by "
                f"{who_listens(self.controller_port)}: stop that process, or pick another "
                "port with --controller-port / SOMNA_KAFKA_CONTROLLER_PORT"
            )

    def _format(self, base: list[str], props: Path) -> str:
        cluster_id = new_cluster_id()
        cmd = [*base, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SetupError(
                f"formatting the Kafka storage in {self.kafka_dir / 'data'} failed:\n"
                + (done.stdout + done.stderr).strip()[-2000:]
            )
        (self.kafka_dir / "cluster.id").write_text(cluster_id + "\n")
        return cluster_id

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                logs = f"{tail(self.log_file)}\n{tail(self.kafka_dir / 'stdout.log', 10)}"
                hint = ""
                if "Address already in use" in logs:
                    hint = " (a port was taken while the JVM started: pick other ports)"
                raise SetupError(
                    f"the Kafka broker exited with code {self._proc.returncode} while "
                    f"starting{hint}; the end of {self.log_file}:\n{logs}"
                )
            if broker_answers(self.bootstrap):
                return
            time.sleep(0.25)
        raise SetupError(
            f"the Kafka broker did not answer on {self.bootstrap} in time; "
            f"the end of {self.log_file}:\n{tail(self.log_file)}"
        )
