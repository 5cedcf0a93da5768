"""`somna memory ls|show|rollback|rebuild|retract` and `somna cost` (thin; the work is in
``views``, ``rollback``, ``retraction`` and ``cost``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

memory = typer.Typer(
    help="Inspect and manage the scopes' fast-weight versions.", no_args_is_help=True
)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data dir (history Parquet).", envvar="SOMNA_DATA_DIR"),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _settings(data_dir: Path | None = None):
    from infra.settings import Settings

    return Settings(data_dir=data_dir) if data_dir else Settings()


HEADERS = {"watermark": "wm", "from_watermark": "from", "parent_version": "parent",
           "base_model_version": "base", "retracted_event_id": "retracted event", "norm": "|S|",
           "delta_norm": "|dS|", "compute_seconds": "compute s", "gpu_seconds": "GPU s"}  # fmt: skip


def _table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(HEADERS.get(c, c))
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in columns])
    Console().print(table)


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@memory.command("ls")
def ls(as_json: JsonOut = False) -> None:
    """Every scope with fast weights: live version, watermark, base model, versions."""
    from consolidation.views import scopes_summary

    rows = scopes_summary(_settings().tracking_uri)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        _table(
            "scopes",
            rows,
            ["scope_id", "live", "watermark", "base_model_version", "versions", "retracted"],
        )


@memory.command("show")
def show(
    scope: Annotated[str, typer.Argument(help="Scope id.")],
    last: Annotated[int, typer.Option(help="Show the last N versions.")] = 20,
    as_json: JsonOut = False,
) -> None:
    """A scope's versions: lineage, watermark, |S| and the norm of the change from the previous."""
    from consolidation.views import scope_versions

    rows = scope_versions(_settings().tracking_uri, scope, last=last)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    cols = ["version", "live", "watermark", "from_watermark", "parent_version", "base_model_version",
            "reason", "tokens", "events", "norm", "delta_norm", "retracted_event_id"]  # fmt: skip
    _table(f"fast weights of {scope}", rows, cols)


@memory.command("rollback")
def rollback_cmd(
    scope: Annotated[str, typer.Argument(help="Scope id.")],
    version: Annotated[str, typer.Argument(help="Version to serve again.")],
) -> None:
    """Move the scope's `live` alias back to VERSION and publish it (agents swap it in)."""
    from consolidation.rollback import rollback

    pub = rollback(_settings(), scope, version)
    typer.echo(f"{scope}: live -> v{pub.version} (watermark {pub.watermark}), published")


@memory.command("rebuild")
def rebuild_cmd(
    scope: Annotated[str, typer.Argument(help="Scope id.")], data_dir: DataDir = None
) -> None:
    """Replay the scope's whole history on the production base model (after an upgrade, say)."""
    from consolidation.retraction import rebuild

    pub = rebuild(_settings(data_dir), scope)
    if pub is None:
        typer.echo(f"{scope}: nothing consolidated yet, nothing to rebuild")
    else:
        typer.echo(f"{scope}: rebuilt as v{pub.version} (watermark {pub.watermark}), published")


@memory.command("retract")
def retract_cmd(
    scope: Annotated[str, typer.Argument(help="Scope id.")],
    event_id: Annotated[str, typer.Argument(help="The interaction's event_id.")],
    reason: Annotated[str, typer.Option(help="Why (kept on the registry).")] = "",
    data_dir: DataDir = None,
) -> None:
    """Purge an event from the history and rebuild the scope's fast weights without it."""
    from consolidation.retraction import retract

    r = retract(_settings(data_dir), scope, event_id, reason)
    typer.echo(
        f"{scope}: purged {r.purge.rows_removed} row(s) of {event_id} from "
        f"{len(r.purge.files_rewritten)} file(s); {r.outcome}"
        + (f" -> v{r.published.version}" if r.published else "")
    )


def cost(
    as_json: JsonOut = False,
    last: Annotated[int, typer.Option(help="Show the last N runs.")] = 20,
) -> None:
    """Sleep cost per run and in total: tokens, GPU-seconds, joules, dollars."""
    from consolidation.cost import cost_report

    s = _settings()
    report = cost_report(s.tracking_uri, s.gpu_dollars_per_hour)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    cols = [
        "run_name",
        "scopes",
        "tokens",
        "passes",
        "compute_seconds",
        "gpu_seconds",
        "joules",
        "flops",
        "dollars",
    ]
    _table("sleep runs", report["runs"][-last:], cols)
    total = report["total"]
    _table(f"total at ${report['dollars_per_gpu_hour']}/GPU-hour", [total],
           ["runs", "scopes", "tokens", "compute_seconds", "gpu_seconds", "joules", "flops", "dollars"])  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root app."""
    app.add_typer(memory, name="memory")
    app.command("cost")(cost)
