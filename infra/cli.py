"""The `somna` command: one typer app; each package registers its own thin commands.

Domain errors (``infra.errors.SomnaError``) are caught here only, at the boundary, and
become a one-line message and exit code 1.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from infra.errors import SomnaError

app = typer.Typer(
    name="somna",
    help="Somna: a hybrid SSM-attention LM with a sleep cycle, as a streaming service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"somna {version('somna')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    log_level: Annotated[
        str, typer.Option(help="Logging level.", envvar="SOMNA_LOG_LEVEL")
    ] = "INFO",
) -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _register_all() -> None:
    # Each package owns its commands; imports of torch/mlflow stay inside the commands.
    import benchmarks.cli
    import consolidation.cli
    import infra.commands
    import model.cli
    import streams.cli

    for module in (infra.commands, streams.cli, model.cli, consolidation.cli, benchmarks.cli):
        module.register(app)


_register_all()


def main() -> None:
    try:
        app()
    except SomnaError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None
