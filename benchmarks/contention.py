"""`somna bench contention`: the agent's engine calls beside other busy processes.

On a small CPU box the agent shares its cores with Kafka, MLflow, the sleep worker and the
users' clients. This times two engine calls of the shipped checkpoint (facts-n4), with 1
and with 2 torch threads, next to nothing, one busy process at normal priority, and one
spinning at SCHED_IDLE (what the sleep worker runs as on a CPU):
- urgent: 3 scopes each with a staged swap that keeps its last ``KEPT_EVENTS`` facts
  (~180 tokens), each asked a question: what a question waiting for its scope's new fast
  weights costs;
- facts: 50 scopes stating one fact each: a background call of `somna bench swap`'s load.
Each cell: p50 / p99 / max over many calls (a pause between calls, as turns come), and
the p99 against the same call with 1 thread and no neighbour, measured in the same run.
The agent's default (``SOMNA_AGENT_TORCH_THREADS=1``) comes from this table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.answer_batch import CHECKPOINT, QUESTION, _fact, _turn
from benchmarks.pipeline import pct
from consolidation.fast_weights import FastWeights
from model import HybridLM
from streams.memory import ModelEngine
from streams.records import FastWeightsPublished

NEIGHBOURS = ("none", "busy", "idle_spin")
SPIN = {
    "busy": "while True: pass",
    "idle_spin": (
        "import os; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile True: pass"
    ),
}
FULL = {"calls": {"urgent": 300, "facts": 100}, "threads": (1, 2)}
QUICK = {"calls": {"urgent": 40, "facts": 15}, "threads": (1, 2)}
PAUSE_S = 0.01  # between calls: the engine thread waits for turns, as in the agent


KEPT_EVENTS = 7  # after a swap's watermark: ~180 tokens, as in `somna bench swap`


def _urgent(lm: HybridLM) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(prepare, call): each scope states a fact and gets a new version staged that keeps
    its last ``KEPT_EVENTS`` events; the call applies them and answers a question each."""
    engine = ModelEngine(lm, base_model_version="bench")
    scopes = [f"u{i}" for i in range(3)]
    engine.answer([_turn(s, k, "system", _fact(i, k)) for k in range(KEPT_EVENTS) for i, s in enumerate(scopes)])  # fmt: skip
    offset = [KEPT_EVENTS]

    def prepare() -> None:
        fact = offset[0]
        engine.answer([_turn(s, fact, "system", _fact(i, fact)) for i, s in enumerate(scopes)])
        for s in scopes:
            state = engine.memory(s).state
            watermark = state.pending_events[-KEPT_EVENTS - 1].offset
            published = FastWeightsPublished(
                scope_id=s, version=str(fact), artifact_uri="mlflow-artifacts:/bench",
                sha256="0" * 64, watermark=watermark, base_model_version="bench", job_id="bench",
            )  # fmt: skip
            weights = FastWeights(
                scope_id=s, version=str(fact), tensors=state.fast_weights(),
                metadata={"config_hash": lm.config.config_hash()}, watermark=watermark,
                base_model_version="bench",
            )  # fmt: skip
            if engine.swap(published, weights) != "swapped":
                raise RuntimeError(f"bench swap of {s} not staged")
        offset[0] += 2

    def call() -> Any:
        question = offset[0] - 1
        return engine.answer([_turn(s, question, "user", QUESTION) for s in scopes])

    return prepare, call


def _facts(lm: HybridLM) -> tuple[Callable[[], Any], Callable[[], Any]]:
    engine = ModelEngine(lm, base_model_version="bench", max_scopes=64)
    scopes = [f"f{i}" for i in range(50)]
    engine.answer([_turn(s, 0, "system", _fact(i, 0)) for i, s in enumerate(scopes)])
    offset = [0]

    def call() -> Any:
        offset[0] += 1
        return engine.answer([_turn(s, offset[0], "system", _fact(i, offset[0])) for i, s in enumerate(scopes)])  # fmt: skip

    return (lambda: None), call


def _times(calls: tuple[Callable[[], Any], Callable[[], Any]], n: int) -> list[float]:
    prepare, call = calls
    out = []
    for i in range(n + 3):  # 3 warm-up calls
        prepare()
        t0 = time.perf_counter()
        call()
        if i >= 3:
            out.append((time.perf_counter() - t0) * 1e3)
        time.sleep(PAUSE_S)
    return out


def _cell(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(xs, 0.5), "p99_ms": pct(xs, 0.99), "max_ms": max(xs), "n": len(xs)}


def run(quick: bool = False, json_path: Path | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    sizes = QUICK if quick else FULL
    lm = HybridLM.load(CHECKPOINT, device="cpu")
    torch.set_grad_enabled(False)
    calls = {"urgent": _urgent(lm), "facts": _facts(lm)}
    cells: dict[str, dict] = {}
    for neighbour in NEIGHBOURS:
        procs = [] if neighbour == "none" else [subprocess.Popen([sys.executable, "-c", SPIN[neighbour]])]  # fmt: skip
        try:
            time.sleep(0.3)
            for threads in sizes["threads"]:
                torch.set_num_threads(threads)
                for kind, call in calls.items():
                    cells[f"{kind}/{threads}/{neighbour}"] = _cell(_times(call, sizes["calls"][kind]))  # fmt: skip
        finally:
            for p in procs:
                p.kill()
                p.wait()
    for key, cell in cells.items():
        base = cells[f"{key.split('/')[0]}/1/none"]["p99_ms"]
        cell["p99_vs_1_thread_alone"] = cell["p99_ms"] / base
    result = {
        "benchmark": "contention",
        "quick": quick,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "checkpoint": CHECKPOINT.name,
        "cells": cells,
    }
    console = Console(width=max(Console().width, 110))
    table = Table(title=f"Engine calls beside busy processes ({os.cpu_count()} CPUs, {CHECKPOINT.name})")  # fmt: skip
    for col in ("call", "torch threads", *(f"{n}: p50 / p99 / max ms (p99 ratio)" for n in NEIGHBOURS)):  # fmt: skip
        table.add_column(col, justify="right")
    for kind in calls:
        for threads in sizes["threads"]:
            row = [kind, str(threads)]
            for n in NEIGHBOURS:
                c = cells[f"{kind}/{threads}/{n}"]
                row.append(f"{c['p50_ms']:.1f} / {c['p99_ms']:.1f} / {c['max_ms']:.0f} ({c['p99_vs_1_thread_alone']:.2f})")  # fmt: skip
            table.add_row(*row)
    console.print(table)
    console.print(
        "urgent: 3 scopes, a staged swap and a question each; facts: 50 scopes, a fact each. "
        "busy: one process spinning at normal priority; idle_spin: one at SCHED_IDLE. "
        "Ratio: p99 over the same call with 1 thread and no neighbour."
    )
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
