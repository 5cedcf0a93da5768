"""`somna bench NAME [--quick] [--json F]`: each benchmark is a module with ``run``.

A benchmark module exposes ``run(quick: bool, json_path: Path | None) -> dict``: it prints
a table (rich), writes its JSON when asked, and returns the same dict.
"""

from __future__ import annotations

import importlib
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class Bench(StrEnum):
    memory = "memory"
    sleep = "sleep"
    pipeline = "pipeline"
    swap = "swap"
    chaos = "chaos"
    answer = "answer"
    contention = "contention"
    registry = "registry"
    prewake = "prewake"


MODULES = {
    Bench.memory: "benchmarks.memory",
    Bench.sleep: "benchmarks.sleep_throughput",
    Bench.pipeline: "benchmarks.pipeline",
    Bench.swap: "benchmarks.swap",
    Bench.chaos: "benchmarks.chaos",
    Bench.answer: "benchmarks.answer_batch",
    Bench.contention: "benchmarks.contention",
    Bench.registry: "benchmarks.registry",
    Bench.prewake: "benchmarks.prewake",
}


def bench(
    name: Annotated[Bench, typer.Argument(help="Which benchmark to run.")],
    quick: Annotated[bool, typer.Option(help="A short run that fits CI and a laptop.")] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here.")
    ] = None,
) -> None:
    """Run a benchmark: print a table and optionally write JSON."""
    module = importlib.import_module(MODULES[name])
    module.run(quick=quick, json_path=json_path)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
