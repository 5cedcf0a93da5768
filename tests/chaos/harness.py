"""The chaos cluster: the real parts of Somna as separate OS processes on loopback.

- the embedded Kafka broker (``infra.kafka.EmbeddedKafka``, a JVM) with its own data dir;
- an ``mlflow server`` (sqlite backend, artifact root in its own data dir);
- ``python -m infra worker stream`` and ``python -m infra worker sleep``, each with its own
  environment (SOMNA_DATA_DIR, SOMNA_KAFKA_BOOTSTRAP, SOMNA_MLFLOW_URI, a small
  SOMNA_CHUNK_TOKENS so that sleep jobs happen within a short test).

Faults are applied from outside, by pid: ``kill9`` (SIGKILL to the part's process group),
``restart``, ``stop_broker``/``start_broker`` on the same data dir and ports. The workers'
data dir can sit on a small tmpfs so that the disk can be filled on purpose.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from infra.kafka import EmbeddedKafka
from infra.mlflow_server import SERVER_ENV
from infra.ports import free_port, free_ports
from infra.process import spawn, tail, terminate
from infra.topics import provision

from .checker import TopicTail

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Part:
    """One process of the cluster, restartable with the same command and environment."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    crashes: list[int] = field(default_factory=list)  # exit codes of deaths we did not cause

    cwd: Path = REPO

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:  # one log across restarts, each start marked
            f.write(f"\n===== chaos harness: start #{self.starts + 1} of {self.name} =====\n")
        self.proc = spawn(self.cmd, self.log, env=self.env, cwd=self.cwd)
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL to the whole process group: no cleanup, no goodbye (the fault)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=20)
            with contextlib.suppress(ProcessLookupError):  # stragglers of its group
                os.killpg(self.proc.pid, signal.SIGKILL)

    def heal(self) -> bool:
        """Restart the part if it died on its own (as a supervisor would); True if it had."""
        if self.proc is not None and self.proc.poll() is not None:
            self.crashes.append(self.proc.returncode)
            self.start()
            return True
        return False

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def log_says(self, text: str, since: int) -> bool:
        """Whether the part's log, from byte ``since`` on, holds ``text`` (an outside view)."""
        with contextlib.suppress(OSError), open(self.log, "rb") as f:
            f.seek(since)
            return text.encode() in f.read()
        return False

    def log_count(self, text: str, since: int) -> int:
        with contextlib.suppress(OSError), open(self.log, "rb") as f:
            f.seek(since)
            return f.read().count(text.encode())
        return 0

    def tail(self, lines: int = 30) -> str:
        return tail(self.log, lines)


class Cluster:
    """Broker + tracking server + one stream worker + one sleep worker, all on loopback."""

    def __init__(
        self,
        root: Path,
        *,
        partitions: int = 4,
        chunk_tokens: int = 256,
        idle_seconds: float = 5.0,
        sleep_passes: int = 2,
        tmpfs_mb: int | None = 256,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self._args = dict(
            partitions=partitions,
            chunk_tokens=chunk_tokens,
            idle_seconds=idle_seconds,
            sleep_passes=sleep_passes,
            tmpfs_mb=tmpfs_mb,
            extra_env=extra_env,
        )
        self.root = Path(root)
        self.partitions = partitions
        self.kafka = EmbeddedKafka(self.root / "kafka-home", *free_ports(2))
        self.mlflow_port = free_port()
        self.mlflow_dir = self.root / "mlflow"
        # The workers share one data dir (the sleep worker reads the stream worker's history).
        self.data_dir = self.root / "workers"
        self.tmpfs_error = "no tmpfs asked for"
        self.tmpfs = self._mount_tmpfs(tmpfs_mb) if tmpfs_mb else None
        self.worker_env = {
            **os.environ,
            "SOMNA_DATA_DIR": str(self.data_dir),
            "SOMNA_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "SOMNA_MLFLOW_URI": self.mlflow_uri,
            "SOMNA_PARTITIONS": str(partitions),
            "SOMNA_CHUNK_TOKENS": str(chunk_tokens),
            "SOMNA_IDLE_SECONDS": str(idle_seconds),
            "SOMNA_SLEEP_PASSES": str(sleep_passes),
            "SOMNA_METRICS_PORT": "0",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "SOMNA_HISTORY_WINDOW_SECONDS": "2",
            # A job the sleep worker deferred or lost is sent again within a scenario's
            # drain (the default, 10 min, is longer than any scenario).
            "SOMNA_SLEEP_JOB_RETRY_SECONDS": "20",
            # As `somna up` runs it: a restarted stream worker takes its partitions back at
            # once (static membership) instead of after the 20 s session timeout.
            "SOMNA_STREAM_INSTANCE_ID": f"chaos-stream-{self.root.name}",
            **(extra_env or {}),
        }
        logs = self.root / "logs"
        self.mlflow = Part(
            "mlflow", self._mlflow_cmd(), {**os.environ, **SERVER_ENV}, logs / "mlflow.log",
            cwd=self.root,
        )  # fmt: skip
        self.stream = Part(
            "stream",
            [sys.executable, "-m", "infra", "worker", "stream"],
            self.worker_env,
            logs / "stream.log",
            cwd=self.root,  # Faust puts its own data dir in the working dir
        )
        self.sleep = Part(
            "sleep",
            [sys.executable, "-m", "infra", "worker", "sleep"],
            self.worker_env,
            logs / "sleep.log",
            cwd=self.root,
        )
        self.tail: TopicTail | None = None

    # -- the parts ---------------------------------------------------------------------------

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap

    @property
    def history_dir(self) -> Path:
        return self.data_dir / "history"

    @property
    def workers(self) -> tuple[Part, Part]:
        return (self.stream, self.sleep)

    def _mlflow_cmd(self) -> list[str]:
        self.mlflow_dir.mkdir(parents=True, exist_ok=True)
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.mlflow_port),
            "--backend-store-uri",
            f"sqlite:///{self.mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.mlflow_dir / "artifacts"),
            "--serve-artifacts",
            "--workers",
            "1",
        ]

    def start(self, timeout: float = 240.0) -> Cluster:
        self.kafka.start()
        provision(self.bootstrap, self.partitions)
        self.mlflow.start()
        self.wait_mlflow(timeout)
        # The stream worker first, the sleep worker once the base model is registered: two
        # workers starting at once on an empty registry each register a base model (a race
        # in consolidation.base_model.ensure_base_model), and then the agent refuses every
        # fast-weights version as made for another base model.
        self.stream.start()
        self.wait_base_model(timeout)
        self.sleep.start()
        self.tail = TopicTail(self.bootstrap).start()
        return self

    def base_model_version(self) -> str | None:
        """The version behind alias ``production`` of the base model, as the registry says."""
        from mlflow import MlflowClient

        from consolidation.base_model import BASE_MODEL_NAME, PRODUCTION

        client = MlflowClient(tracking_uri=self.mlflow_uri, registry_uri=self.mlflow_uri)
        try:
            return str(client.get_model_version_by_alias(BASE_MODEL_NAME, PRODUCTION).version)
        except Exception:  # not registered yet (or the server is down on purpose)
            return None

    def wait_base_model(self, timeout: float = 240.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.stream.alive:
                raise RuntimeError(
                    f"the stream worker exited while starting:\n{self.stream.tail()}"
                )
            version = self.base_model_version()
            if version is not None:
                return version
            time.sleep(1.0)
        raise RuntimeError(f"no base model registered in {timeout}s:\n{self.stream.tail()}")

    def wait_mlflow(self, timeout: float = 120.0) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.mlflow.alive:
                raise RuntimeError(f"mlflow server exited:\n{self.mlflow.tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server not ready in {timeout}s:\n{self.mlflow.tail()}")

    def heal(self) -> list[str]:
        """Restart whatever died on its own; the names of the parts that had."""
        if not self.kafka.running:
            self.kafka.start()
        healed = [p.name for p in (self.mlflow, *self.workers) if p.heal()]
        if "mlflow" in healed:
            self.wait_mlflow()
        return healed

    def crashes(self) -> dict[str, int]:
        return {p.name: len(p.crashes) for p in (self.mlflow, *self.workers)}

    def stop(self) -> None:
        if self.tail is not None:
            self.tail.close()
        for part in (*self.workers, self.mlflow):
            part.stop()
        self.kafka.stop()
        if self.tmpfs is not None:
            subprocess.run(["umount", "-l", str(self.tmpfs)], check=False, capture_output=True)

    def reset(self) -> None:
        """Throw this cluster away and start a fresh one in a new root, in place: for when a
        scenario left it in a state no restart repairs (its logs stay in the old root)."""
        self.stop()
        if not os.environ.get("SOMNA_CHAOS_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)
        self.__init__(new_root(), **self._args)  # type: ignore[misc]
        self.start()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the disk ----------------------------------------------------------------------------

    def _mount_tmpfs(self, size_mb: int) -> Path | None:
        """Put the workers' data dir on a tmpfs of ``size_mb`` (root only); None if refused."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(self.data_dir)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            self.tmpfs_error = (done.stderr or done.stdout).strip()
            return None
        return self.data_dir

    def fill_disk(self, leave_bytes: int = 4096) -> Path:
        """Fill the workers' tmpfs up to ``leave_bytes`` free; returns the filler file."""
        assert self.tmpfs is not None, "the data dir is not on a tmpfs"
        filler = self.data_dir / "chaos-filler.bin"
        # Unbuffered: a write that hits ENOSPC fails here, not later in close().
        with open(filler, "wb", buffering=0) as f:
            chunk = b"\0" * (1 << 20)
            left = shutil.disk_usage(self.data_dir).free - leave_bytes
            while left > 0:
                try:
                    left -= f.write(chunk[: min(left, len(chunk))])
                except OSError:  # full already: the workers wrote meanwhile
                    break
        return filler


def new_root(prefix: str = "somna-chaos-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
