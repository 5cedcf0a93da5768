"""`somna bench contention`: the agent's engine calls beside other busy processes.

The agent shares its machine's cores with Kafka, MLflow, the sleep worker and the users'
clients. This times two engine calls of the shipped checkpoint (facts-n4), with 1 and
with 2 torch threads, next to each neighbour process in turn:
- urgent: 3 scopes each with a staged swap that keeps its last ``KEPT_EVENTS`` facts
  (~180 tokens), each asked a question: what a question waiting for its scope's new fast
  weights costs;
- facts: 50 scopes stating one fact each: a background call of `somna bench swap`'s load.
Each cell: p50 / p99 / max over many calls (a pause between calls, as turns come), and
the p99 against the same call with 1 thread and no neighbour, measured in the same run.
The agent's default (``SOMNA_AGENT_TORCH_THREADS=1``) comes from this table.

The neighbours (``NEIGHBOURS``) are spinners and the sleep worker's own batched sleep
(``consolidation.batch.sleep_states``) run back to back under its scheduling, on the CPU
and, where there is one, on the GPU: the question of issue 5 (does sleep slow the online
path?) asked of the engine alone, without Kafka. For each neighbour the table also gives
its CPU use and sleeps per second: what its priority costs the offline side.

    python -m benchmarks.contention [--quick] [--json F] [--neighbours none,sleep_gpu]
        [--threads 1] [--cpus 0,1]

``--cpus`` pins the bench and its neighbours to those cores (a 2-core box on a big one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.answer_batch import CHECKPOINT, QUESTION, _fact, _turn
from benchmarks.pipeline import cpu_seconds, pct
from consolidation.batch import SleepTask
from consolidation.fast_weights import FastWeights, Lineage
from model import HybridLM
from streams.memory import ModelEngine
from streams.records import FastWeightsPublished

_SPIN = "while True: pass"
_IDLE = "import os; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
_SLEEP = [sys.executable, "-m", "benchmarks.contention", "--sleep-loop"]
# name -> the neighbour's command line (None: no neighbour), and whether it needs CUDA.
NEIGHBOURS: dict[str, tuple[list[str] | None, bool]] = {
    "none": (None, False),
    "busy": ([sys.executable, "-c", _SPIN], False),  # one process spinning at normal priority
    "idle_spin": ([sys.executable, "-c", _IDLE + _SPIN], False),  # one spinning at SCHED_IDLE
    # The sleep worker's batched sleep on the CPU, under its default there (SCHED_IDLE).
    "sleep_cpu_idle": ([*_SLEEP, "cpu", "idle"], False),
    # On the GPU under its default there (normal priority), under SCHED_IDLE, and with the
    # CUDA context's blocking sync (the host thread sleeps while it waits for the GPU).
    "sleep_gpu": ([*_SLEEP, "cuda", "normal"], True),
    "sleep_gpu_idle": ([*_SLEEP, "cuda", "idle"], True),
    "sleep_gpu_blocking": ([*_SLEEP, "cuda", "blocking"], True),
}
DEFAULT_NEIGHBOURS = ("none", "busy", "idle_spin", "sleep_cpu_idle")
SLEEP_CHUNK = 256  # tokens of a job's chunk (Settings.chunk_tokens)
SLEEP_SCOPES = {"cpu": 8, "cuda": 128}  # cuda: a full batch (MAX_BATCH_TOKENS / chunk)
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


def sleep_tasks(n: int, seed: int = 0) -> list[SleepTask]:
    """``n`` scopes with one job chunk each (``SLEEP_CHUNK`` random byte tokens), from zeros."""
    gen = torch.Generator().manual_seed(seed)
    return [
        SleepTask(
            lineage=Lineage(f"s{i}", "bench", None, "bench", 0, SLEEP_CHUNK, 4, SLEEP_CHUNK),
            chunks=[torch.randint(0, 256, (SLEEP_CHUNK,), generator=gen).tolist()],
        )
        for i in range(n)
    ]


def sleep_loop_main(device: str, sched: str, count_file: Path) -> None:
    """A neighbour: the sleep worker's batched sleep (``sleep_states``) back to back until
    killed, under scheduling ``sched`` ("idle", "normal", or "blocking": normal with the
    CUDA context set to blocking sync), writing how many batches it has slept to
    ``count_file`` after each."""
    from consolidation.base_model import BaseModel
    from consolidation.batch import sleep_states
    from consolidation.sleep_worker import apply_scheduling
    from infra.settings import Settings

    if sched == "blocking":
        _cuda_blocking_sync()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    lm = HybridLM.load(CHECKPOINT, device="cpu")
    base = BaseModel(lm=lm, version="bench", checkpoint_dir=CHECKPOINT)
    tasks = sleep_tasks(SLEEP_SCOPES[device])
    sleep_states(base, tasks[:1], lm.config.sleep_passes, device)  # load and warm up, untimed
    apply_scheduling(Settings(sleep_sched="idle" if sched == "idle" else "normal"), device)
    done = 0
    while True:
        sleep_states(base, tasks, lm.config.sleep_passes, device)
        done += 1
        count_file.write_text(str(done))


def _cuda_blocking_sync() -> None:
    """Make this process's CUDA context wait for the GPU by sleeping on an interrupt rather
    than spinning (CU_CTX_SCHED_BLOCKING_SYNC), before torch creates the context."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    dev = ctypes.c_int()
    for rc in (cuda.cuInit(0), cuda.cuDeviceGet(ctypes.byref(dev), 0)):
        if rc:
            raise RuntimeError(f"CUDA driver call failed: {rc}")
    if rc := cuda.cuDevicePrimaryCtxSetFlags(dev, 0x04):
        raise RuntimeError(f"cuDevicePrimaryCtxSetFlags failed: {rc}")


def _counted(count_file: Path) -> int:
    try:
        return int(count_file.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _start(neighbour: str, tmp: Path) -> tuple[subprocess.Popen | None, Path]:
    argv, _ = NEIGHBOURS[neighbour]
    count_file = tmp / f"{neighbour}.count"
    if argv is None:
        return None, count_file
    sleeps = argv[: len(_SLEEP)] == _SLEEP
    proc = subprocess.Popen([*argv, str(count_file)] if sleeps else argv)
    deadline = time.monotonic() + 120
    # A sleep loop counts its first batch once it is loaded, warm and under its scheduling.
    while sleeps and _counted(count_file) < 1:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"neighbour {neighbour} did not start (exit {proc.wait()})")
        time.sleep(0.1)
    time.sleep(0.3)
    return proc, count_file


def run(
    quick: bool = False,
    json_path: Path | None = None,
    neighbours: list[str] | None = None,
    threads: list[int] | None = None,
    cpus: list[int] | None = None,
) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    threads = threads or list(sizes["threads"])
    if neighbours is None:
        gpu = [n for n, (_, cuda) in NEIGHBOURS.items() if cuda]
        neighbours = [*DEFAULT_NEIGHBOURS, *(gpu if torch.cuda.is_available() else [])]
    if unknown := set(neighbours) - set(NEIGHBOURS):
        raise SystemExit(f"unknown neighbours {sorted(unknown)}; known: {sorted(NEIGHBOURS)}")
    if "none" not in neighbours:
        neighbours = ["none", *neighbours]  # every ratio is against no neighbour
    if cpus:
        os.sched_setaffinity(0, cpus)  # inherited by the neighbours
    lm = HybridLM.load(CHECKPOINT, device="cpu")
    torch.set_grad_enabled(False)
    calls = {"urgent": _urgent(lm), "facts": _facts(lm)}
    cells: dict[str, dict] = {}
    beside: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="somna-contention-") as tmp:
        for neighbour in neighbours:
            try:
                proc, count_file = _start(neighbour, Path(tmp))
            except RuntimeError as e:  # e.g. a GPU neighbour on a machine without one
                beside[neighbour] = {"error": str(e)}
                continue
            t0, cpu0, n0 = time.monotonic(), proc and cpu_seconds(proc.pid), _counted(count_file)
            try:
                for n_threads in threads:
                    torch.set_num_threads(n_threads)
                    for kind, call in calls.items():
                        cells[f"{kind}/{n_threads}/{neighbour}"] = _cell(_times(call, sizes["calls"][kind]))  # fmt: skip
                if proc is not None:
                    wall = time.monotonic() - t0
                    sleeps = (_counted(count_file) - n0) / wall if count_file.exists() else None
                    beside[neighbour] = {
                        "cpu_share": (cpu_seconds(proc.pid) - cpu0) / wall,
                        "sleeps_per_s": sleeps,
                        "exited_early": proc.poll() is not None,
                    }
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
    for key, cell in cells.items():
        base = cells[f"{key.split('/')[0]}/{threads[0]}/none"]["p99_ms"]
        cell["p99_vs_alone"] = cell["p99_ms"] / base
    result = {
        "benchmark": "contention",
        "quick": quick,
        "cpus": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "checkpoint": CHECKPOINT.name,
        "cells": cells,
        "neighbours": beside,
    }
    _print(result, calls, threads, neighbours)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _print(result: dict, calls: dict, threads: list[int], neighbours: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))
    where = f"{result['cpus']} CPUs" + (f", {result['gpu']}" if result["gpu"] else "")
    table = Table(title=f"Engine calls beside busy processes ({where}, {result['checkpoint']})")
    for col in ("call", "torch threads", *(f"{n}: p50 / p99 / max ms (p99 ratio)" for n in neighbours)):  # fmt: skip
        table.add_column(col, justify="right")
    for kind in calls:
        for n_threads in threads:
            row = [kind, str(n_threads)]
            for n in neighbours:
                c = result["cells"].get(f"{kind}/{n_threads}/{n}")
                if c is None:
                    row.append("failed: " + result["neighbours"][n]["error"])
                    continue
                row.append(f"{c['p50_ms']:.1f} / {c['p99_ms']:.1f} / {c['max_ms']:.0f} ({c['p99_vs_alone']:.2f})")  # fmt: skip
            table.add_row(*row)
    row = ["neighbour", "CPU share, sleeps/s"]
    for n in neighbours:
        b = result["neighbours"].get(n) or {}
        share = f"{b['cpu_share']:.2f} CPU" if "cpu_share" in b else ""
        rate = f", {b['sleeps_per_s']:.2f}/s" if b.get("sleeps_per_s") is not None else ""
        row.append(share + rate + (" (exited early)" if b.get("exited_early") else ""))
    table.add_row(*row)
    console.print(table)
    console.print(
        "urgent: 3 scopes, a staged swap and a question each; facts: 50 scopes, a fact each. "
        "busy / idle_spin: one process spinning at normal priority / SCHED_IDLE. sleep_*: "
        f"the sleep worker's batched sleep ({SLEEP_SCOPES['cpu']} scopes x {SLEEP_CHUNK} tokens "
        f"on the CPU, {SLEEP_SCOPES['cuda']} on the GPU) "
        "back to back. Ratio: p99 over the same call with no neighbour and the first "
        "thread count."
    )


def main() -> None:
    if sys.argv[1:2] == ["--sleep-loop"]:
        sleep_loop_main(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(prog="python -m benchmarks.contention")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--neighbours", help=f"comma-separated, of {', '.join(NEIGHBOURS)}")
    ap.add_argument("--threads", help="torch thread counts of the engine, comma-separated")
    ap.add_argument("--cpus", help="pin to these cores, comma-separated")

    def ints(v: str | None) -> list[int] | None:
        return [int(x) for x in v.split(",")] if v else None

    a = ap.parse_args()
    run(
        a.quick, a.json, a.neighbours.split(",") if a.neighbours else None,
        ints(a.threads), ints(a.cpus),
    )  # fmt: skip


if __name__ == "__main__":
    main()
