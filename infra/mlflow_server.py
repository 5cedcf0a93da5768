"""`mlflow server` as a subprocess: sqlite backend and artifact store under the data dir.

Layout under ``<data_dir>/mlflow/``: ``mlflow.db`` (runs, registry), ``artifacts/`` (served
through the server, so clients upload and download over HTTP and never need the path),
``server.log``. Clients use ``http://127.0.0.1:<port>``; mlflow 3's host and CORS checks
allow loopback by default, so they stay on.

MLflow 3's job runner (huey consumers for GenAI jobs: trace rollups, scorers) is turned
off: Somna runs no MLflow jobs, and its seven consumer processes each imported mlflow at
start, ~25 s of CPU that kept both cores of a 2-core box busy for the server's first
~15 s (while a bench warmed up, or a test ran), and their memory stayed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from infra.errors import SetupError
from infra.ports import free_port, port_is_free, who_listens
from infra.process import spawn, tail, terminate

log = logging.getLogger(__name__)

# The environment every `mlflow server` of Somna runs with (see the module doc): no job runner.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_answers(uri: str, timeout: float = 2.0) -> bool:
    """True when the tracking server at ``uri`` answers GET /health with 200."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class MlflowServer:
    """The tracking server and model registry, with its state under ``data_dir/mlflow``."""

    def __init__(self, data_dir: Path, port: int = 5000, workers: int = 1) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.mlflow_dir = self.data_dir / "mlflow"
        self.port = port or free_port()  # 0 picks a free one (tests)
        # One worker: sqlite serialises writes anyway, and the machine is shared with torch.
        self.workers = workers
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.mlflow_dir / "server.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        db = self.mlflow_dir / "mlflow.db"
        artifacts = self.mlflow_dir / "artifacts"
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{db}",
            "--serve-artifacts",
            "--artifacts-destination", str(artifacts),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", str(self.workers),
        ]  # fmt: skip

    def start(self, timeout: float = 180.0) -> MlflowServer:
        """Start the server and wait until /health answers; raise SetupError otherwise."""
        if self.running:
            return self
        began = time.monotonic()
        if self.mlflow_dir.exists() and not self.mlflow_dir.is_dir():
            raise SetupError(
                f"{self.mlflow_dir} is a file, not the MLflow data dir: move it away or pick "
                "another data dir with --data-dir / SOMNA_DATA_DIR"
            )
        if not port_is_free(self.port):
            raise SetupError(
                f"the MLflow port {self.port} is already in use by {who_listens(self.port)}: "
                "stop that process, or pick another port with --port / SOMNA_MLFLOW_PORT; "
                f"if it is an MLflow server, use it with SOMNA_MLFLOW_URI={self.uri}"
            )
        (self.mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **SERVER_ENV}
        self._proc = spawn(self.command(), self.log_file, env=env, cwd=self.mlflow_dir)
        try:
            self._wait_ready(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        log.info("MLflow %s ready in %.1f s (log: %s)", self.uri, self.start_seconds, self.log_file)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        if self._proc is None:
            return
        # The server forks uvicorn workers in its process group: signal the whole group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self._proc.poll() is None:
                os.killpg(self._proc.pid, 15)
        code = terminate(self._proc, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, 9)  # stragglers of the group, if any
        log.info("MLflow %s stopped (exit %s)", self.uri, code)
        self._proc = None

    def wait(self) -> int:
        assert self._proc is not None, "start() first"
        return self._proc.wait()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SetupError(
                    f"`mlflow server` exited with code {self._proc.returncode} while starting; "
                    f"the end of {self.log_file}:\n{tail(self.log_file)}"
                )
            if mlflow_answers(self.uri):
                return
            time.sleep(0.25)
        raise SetupError(
            f"`mlflow server` did not answer {self.uri}/health in time; "
            f"the end of {self.log_file}:\n{tail(self.log_file)}"
        )
