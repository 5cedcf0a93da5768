"""Thin `somna` subcommands of infra: kafka, mlflow, up, doctor, and the `worker` group."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from infra.settings import Settings

log = logging.getLogger(__name__)

DataDir = Annotated[
    Path,
    typer.Option(
        help="Where Kafka, MLflow and the history keep their data.", envvar="SOMNA_DATA_DIR"
    ),
]


def kafka(
    data_dir: DataDir = Path(".somna"),
    port: Annotated[
        int, typer.Option(help="Broker port (PLAINTEXT listener).", envvar="SOMNA_KAFKA_PORT")
    ] = 9092,
    controller_port: Annotated[
        int, typer.Option(help="KRaft controller port.", envvar="SOMNA_KAFKA_CONTROLLER_PORT")
    ] = 9093,
    fetch_jars: Annotated[
        bool, typer.Option("--fetch-jars", help="Only resolve the Kafka jars, print their dir.")
    ] = False,
) -> None:
    """Run the embedded Kafka broker (single-node KRaft) in the foreground until Ctrl-C."""
    from infra.kafka import EmbeddedKafka, ensure_jars

    if fetch_jars:
        typer.echo(ensure_jars())
        return
    broker = EmbeddedKafka(data_dir, port, controller_port)
    _foreground(broker, f"Kafka on {broker.bootstrap} (log: {broker.log_file})")


def mlflow(
    data_dir: DataDir = Path(".somna"),
    port: Annotated[int, typer.Option(help="Server port.", envvar="SOMNA_MLFLOW_PORT")] = 5000,
) -> None:
    """Run the MLflow tracking server (sqlite + local artifacts) until Ctrl-C."""
    from infra.mlflow_server import MlflowServer

    server = MlflowServer(data_dir, port)
    _foreground(server, f"MLflow on {server.uri} (log: {server.log_file})")


def up(
    data_dir: DataDir = Path(".somna"),
    demo: Annotated[
        bool, typer.Option("--demo", help="Add simulated users and a live view.")
    ] = False,
) -> None:
    """Start Kafka, MLflow, the topics and all workers; Ctrl-C stops everything."""
    from infra.up import run_up

    try:
        run_up(Settings(data_dir=data_dir), demo=demo)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def doctor(data_dir: DataDir = Path(".somna")) -> None:
    """Check Java, Maven, the jar cache, ports, the data dir and torch; say how to fix each."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from infra.doctor import run_checks

    checks = run_checks(Settings(data_dir=data_dir))
    table = Table("check", "", "found", "fix")
    for column in table.columns:
        column.overflow = "fold"
    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    for c in checks:
        table.add_row(c.name, marks[c.status], escape(c.detail), escape(c.fix))
    Console().print(table)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


worker_app = typer.Typer(
    help="Long-running workers (`somna up` starts them; run one alone to scale out).",
    no_args_is_help=True,
)


@worker_app.command("stream")
def worker_stream(
    role: Annotated[
        list[str] | None,
        typer.Option(help="Run only these roles (agent, history, consolidator); repeatable."),
    ] = None,
) -> None:
    """The stream worker: inference agent, history aggregator, consolidation processor."""
    run = _import_or_unavailable("streams.worker", "run")
    settings = Settings()
    if role:
        run(settings, roles=tuple(role))
    else:
        run(settings)


@worker_app.command("sleep")
def worker_sleep() -> None:
    """The sleep worker: consolidates scopes' fast weights (offline recurrence)."""
    run = _import_or_unavailable("consolidation.sleep_worker", "run")
    run(Settings())


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root app."""
    app.command("kafka")(kafka)
    app.command("mlflow")(mlflow)
    app.command("up")(up)
    app.command("doctor")(doctor)
    app.add_typer(worker_app, name="worker")


# --- helpers -----------------------------------------------------------------------------


def _import_or_unavailable(module: str, name: str):  # noqa: ANN202 (a worker entry point)
    """``module.name``, or exit with EXIT_UNAVAILABLE if that module is not written yet."""
    import importlib

    from infra.supervisor import EXIT_UNAVAILABLE

    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if e.name != module:  # a missing dependency inside it is a real error
            raise
        typer.secho(f"{module} is not installed in this version of Somna", fg="red", err=True)
        raise typer.Exit(EXIT_UNAVAILABLE) from None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a foreground service like Ctrl-C does


def _foreground(service: object, banner: str) -> None:
    """Start a service, wait until Ctrl-C / SIGTERM or until it dies, stop it."""
    from infra.errors import SetupError

    signal.signal(signal.SIGTERM, _interrupt)
    with service:  # type: ignore[attr-defined]
        typer.echo(f"{banner}; Ctrl-C to stop")
        try:
            code = service.wait()  # type: ignore[attr-defined]
        except KeyboardInterrupt:
            typer.echo("stopping")
            return
    raise SetupError(f"it exited by itself with code {code}; see {service.log_file}")  # type: ignore[attr-defined]
