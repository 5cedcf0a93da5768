"""`somna up`: the whole service on one machine.

Order: embedded Kafka, MLflow server (each unless an existing one is configured), topics,
then the workers as supervised subprocesses. Ctrl-C (or SIGTERM) stops everything in the
reverse order, so that workers commit their offsets while the broker is still there.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.errors import SetupError
from infra.kafka import EmbeddedKafka, broker_answers
from infra.mlflow_server import MlflowServer, mlflow_answers
from infra.settings import Settings
from infra.supervisor import Child, Supervisor
from infra.topics import provision

log = logging.getLogger(__name__)


def somna_argv(*args: str) -> list[str]:
    """`somna ARGS` run by this interpreter, independent of PATH."""
    return [sys.executable, "-m", "infra", *args]


def default_children(logs: Path, demo: bool) -> list[Child]:
    from streams.app import AGENT_ROLES, AGGREGATOR_ROLES, ALL_ROLES, group_id

    def stream_worker(roles: tuple[str, ...]) -> list[str]:
        return somna_argv("worker", "stream", *(a for r in roles for a in ("--role", r)))

    # The agent in a stream worker of its own: beside the history aggregator and the
    # consolidation processor, their bursts (~50 sleep jobs at once when chunks fill
    # together) held its event loop while it swapped fresh fast weights in (hot swap p50
    # 176-202 ms in one worker, 114-165 alone; benchmarks/swap.py). The aggregators keep
    # the consumer group (offsets, consolidation table) of the one worker `somna up` ran
    # before; the agent takes a group of its own (it never answers a stale backlog).
    group = os.environ.get("SOMNA_STREAM_GROUP") or group_id(ALL_ROLES)
    children = [
        Child(
            "agent",
            stream_worker(AGENT_ROLES),
            logs / "worker-agent.log",
            env={"SOMNA_STREAM_GROUP": f"{group}-agent"},
        ),
        Child(
            "stream",
            stream_worker(AGGREGATOR_ROLES),
            logs / "worker-stream.log",
            env={"SOMNA_STREAM_GROUP": group},
        ),
        Child("sleep", somna_argv("worker", "sleep"), logs / "worker-sleep.log"),
    ]
    if demo:  # the live view needs our terminal; quitting it is not a crash
        children.append(Child("demo", somna_argv("demo"), None, restart_on_success=False))
    return children


@dataclass
class Services:
    """Where the running service is, as the workers must see it."""

    bootstrap: str
    tracking_uri: str
    # The ones started here, restarted by `revive` if they die under us.
    embedded: tuple[EmbeddedKafka | MlflowServer, ...] = ()

    def revive(self) -> None:
        for service in self.embedded:
            if not service.running:
                log.error(
                    "%s died (see %s); restarting it", type(service).__name__, service.log_file
                )
                try:
                    service.start()
                except SetupError as e:
                    log.error("restart failed, trying again: %s", e)

    def env(self, settings: Settings) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            SOMNA_KAFKA_BOOTSTRAP=self.bootstrap,
            SOMNA_MLFLOW_URI=self.tracking_uri,
            SOMNA_DATA_DIR=str(settings.data_dir.resolve()),
            SOMNA_PARTITIONS=str(settings.partitions),
        )
        # Static group membership for our stream workers: restarted after a crash one
        # takes its partitions back at once (no wait for the session timeout). Stable per
        # host and data dir, so the next `somna up` here takes over the same way. Both
        # workers may share it: each role set has a consumer group of its own.
        where = f"{socket.gethostname()}:{settings.data_dir.resolve()}"
        env.setdefault(
            "SOMNA_STREAM_INSTANCE_ID",
            "stream-" + hashlib.sha256(where.encode()).hexdigest()[:12],
        )
        return env


@contextlib.contextmanager
def services(settings: Settings) -> Iterator[Services]:
    """Kafka and MLflow, started here or checked if configured; stopped on exit."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        embedded: list[EmbeddedKafka | MlflowServer] = []
        if settings.kafka_bootstrap:
            if not broker_answers(settings.kafka_bootstrap):
                raise SetupError(
                    f"SOMNA_KAFKA_BOOTSTRAP={settings.kafka_bootstrap} does not answer: start "
                    "that cluster, or unset the variable to use the embedded broker"
                )
            bootstrap = settings.kafka_bootstrap
        else:
            kafka = EmbeddedKafka(
                settings.data_dir, settings.kafka_port, settings.kafka_controller_port
            )
            stack.enter_context(kafka)
            embedded.append(kafka)
            bootstrap = kafka.bootstrap
        if settings.mlflow_uri:
            if not mlflow_answers(settings.mlflow_uri):
                raise SetupError(
                    f"SOMNA_MLFLOW_URI={settings.mlflow_uri} does not answer /health: start "
                    "that server, or unset the variable to use the local one"
                )
            tracking_uri = settings.mlflow_uri
        else:
            server = MlflowServer(settings.data_dir, settings.mlflow_port)
            stack.enter_context(server)
            embedded.append(server)
            tracking_uri = server.uri
        provision(bootstrap, settings.partitions)
        yield Services(bootstrap, tracking_uri, tuple(embedded))


def run_up(
    settings: Settings,
    demo: bool = False,
    children: Sequence[Child] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run until Ctrl-C / SIGTERM (or until ``stop`` is set, for tests)."""
    stop = stop or threading.Event()
    restore = _stop_on_sigterm()
    try:
        with services(settings) as svc:
            log.info(
                "Kafka %s, MLflow %s, %d partitions",
                svc.bootstrap,
                svc.tracking_uri,
                settings.partitions,
            )
            logs = settings.data_dir / "logs"
            kids = list(children) if children is not None else default_children(logs, demo)
            supervisor = Supervisor(kids, svc.env(settings))
            try:
                supervisor.start_all()
                while not stop.wait(0.5):
                    svc.revive()
                    supervisor.poll()
            except KeyboardInterrupt:
                log.info("stopping (Ctrl-C)")
            finally:
                supervisor.stop_all()
    finally:
        restore()


def _stop_on_sigterm() -> Callable[[], object]:
    """Make SIGTERM behave like Ctrl-C in the main thread; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)
