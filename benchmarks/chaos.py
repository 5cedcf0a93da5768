"""`somna bench chaos`: every chaos scenario against the real parts, as a table.

The same scenarios as ``tests/chaos`` (one cluster: the embedded broker, an MLflow server,
a stream worker and a sleep worker as OS processes on loopback), with a longer load unless
``--quick``. Prints: scenario, events sent, lost, duplicated, misrouted, dead-lettered,
time to recover (fault end to the first new reply, and to the first new fast-weights
version), restarts a supervisor had to make. The goal is zero lost and zero misrouted.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks import machine

REPO = Path(__file__).resolve().parents[1]


def _scenarios():  # the harness lives with the tests; import it from the source tree
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.chaos import harness, scenarios

    return harness, scenarios


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def table(rows: list[dict]) -> Table:
    t = Table(title="Somna chaos: faults, load and bad input")
    for col in (
        "scenario",
        "sent",
        "lost",
        "dup",
        "misrouted",
        "dead-lettered",
        "recover reply",
        "recover weights",
        "recover history",
        "restarts",
    ):
        t.add_column(col, justify="left" if col == "scenario" else "right")
    for r in rows:
        bad = r["lost"] or r["misrouted"]
        t.add_row(
            r["scenario"],
            str(r["sent"]),
            str(r["lost"]),
            str(r["duplicated"]),
            str(r["misrouted"]),
            str(r["dead_lettered"]),
            _fmt(r["recover_s"]),
            _fmt(r["recover_fast_weights_s"]),
            _fmt(r["recover_history_s"]),
            str(r["restarts"]),
            style="red" if bad else None,
        )
    return t


def run(quick: bool, json_path: Path | None, only: list[str] | None = None) -> dict:
    harness, scenarios = _scenarios()
    size = scenarios.QUICK if quick else scenarios.LONG
    console = Console(width=max(Console().width, 150))  # a wide table: do not squeeze it
    cluster = harness.Cluster(harness.new_root("somna-bench-chaos-"))
    rows: list[dict] = []
    began = time.time()
    try:
        with console.status("starting broker, MLflow and workers"):
            cluster.start()
            warm = scenarios.warm_up(cluster)
        console.print(f"cluster ready; first turn through the pipeline in {warm:.1f} s")
        for name, fn in scenarios.ALL.items():
            if only and name not in only:
                continue
            with console.status(f"scenario {name}"):
                try:
                    scenarios.warm_up(cluster, timeout=90)
                except RuntimeError:  # an earlier scenario wedged a part: start afresh
                    console.print("cluster wedged by the previous scenario: starting a fresh one")
                    cluster.reset()
                    scenarios.warm_up(cluster)
                try:
                    out = fn(cluster, size).as_dict()
                except Exception as e:  # one broken scenario must not hide the others
                    tb = traceback.format_exc(limit=-3)
                    out = scenarios.Outcome(name, notes=[f"harness error: {e!r}", tb]).as_dict()
            rows.append(out)
            console.print(
                f"{name}: lost={out['lost']} misrouted={out['misrouted']} "
                f"notes={out['notes']} details={json.dumps(out['details'], default=str)[:400]}",
                markup=False,
            )
    finally:
        cluster.stop()
        if not os.environ.get("SOMNA_CHAOS_KEEP"):
            shutil.rmtree(cluster.root, ignore_errors=True)
    console.print(table(rows))
    result = {
        "benchmark": "chaos",
        "quick": quick,
        "size": vars(size),
        "machine": f"{machine.describe()}, cpus usable {_cpus()}",
        "wall_s": round(time.time() - began, 1),
        "rows": rows,
    }
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2, default=str))
    return result


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    run(
        quick="--quick" in sys.argv,
        json_path=None,
        only=[a for a in sys.argv[1:] if not a.startswith("-")],
    )
