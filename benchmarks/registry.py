"""`somna bench registry`: what a fast-weights version costs the tracking server.

On a CPU box the MLflow server is the consolidation's bottleneck: each request costs it
10-50 ms of CPU (Python, SQLAlchemy, SQLite), and a wave of ~80 versions in `somna bench
swap` spent ~10 s planning and ~10 s sleeping and registering. This bench counts the HTTP
requests the sleep worker makes per version, and times them, on a real server:

1. plan a wave of S jobs, each scope with a live version already (8 at once, as the sleep
   worker does): the wave's retracted events read with one search (what the worker does)
   and, as the baseline in the same run, read per job (``plan_job`` on its own);
2. register the wave: ``run_batch`` (one MLflow run, upload + check, version, alias).

Requests are counted at the HTTP client (``requests.Session.request``), by endpoint.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks import machine

console = Console()
TEXTS = ["kim reports to bob.", "bob reports to tav.", "tav reports to lem.", "sam reports to dex."]


class Requests:
    """Counts the HTTP requests of this process by (method, endpoint) while active."""

    def __init__(self) -> None:
        import requests

        self._session = requests.Session
        self._orig = requests.Session.request
        self.by_endpoint: Counter[str] = Counter()

    def __enter__(self) -> Requests:
        orig, counts = self._orig, self.by_endpoint

        def counting(session, method: str, url: str, *args, **kwargs):
            path = url.split("?")[0].split("/api/2.0/")[-1]
            if path.startswith("mlflow-artifacts/artifacts/"):
                path = "mlflow-artifacts/artifacts/..."
            counts[f"{method} {path}"] += 1
            return orig(session, method, url, *args, **kwargs)

        self._session.request = counting
        return self

    def __exit__(self, *exc: object) -> None:
        self._session.request = self._orig

    @property
    def total(self) -> int:
        return sum(self.by_endpoint.values())


def _history(settings, scopes: list[str]) -> None:
    from infra.topics import INTERACTIONS
    from streams.history import row_of, write_rows
    from streams.records import Interaction

    rows = []
    for i, scope in enumerate(scopes):
        for k, text in enumerate(TEXTS):
            offset = len(TEXTS) * i + k
            ev = Interaction(event_id=f"{scope}-e{offset}", scope_id=scope, session_id="s",
                             role="user", text=text, ts=1_760_000_000.0 + offset)  # fmt: skip
            rows.append(row_of(ev, topic=INTERACTIONS, partition=0, offset=offset))
    write_rows(settings.history_dir, INTERACTIONS, 0, rows)


def _measure(uri: str, data_dir: Path, n_scopes: int) -> dict:
    from consolidation.base_model import ensure_base_model
    from consolidation.batch import run_batch
    from consolidation.planner import plan_job
    from consolidation.sleep_worker import PLAN_CONCURRENCY, SleepWorker
    from infra.settings import Settings
    from streams.records import SleepJob

    settings = Settings(data_dir=data_dir, mlflow_uri=uri, kafka_bootstrap="127.0.0.1:1",
                        chunk_tokens=40, sleep_passes=2)  # fmt: skip
    base = ensure_base_model(uri)
    run_id = time.strftime("%H%M%S")
    scopes = [f"bench-reg-{run_id}-{i:03d}" for i in range(n_scopes)]
    _history(settings, scopes)
    n = len(TEXTS)

    def job(i: int, lo: int, tag: str) -> SleepJob:
        return SleepJob(job_id=f"job-{scopes[i]}-{tag}", scope_id=scopes[i],
                        from_watermark=n * i + lo, to_watermark=n * i + lo + 1, passes=2)  # fmt: skip

    worker = SleepWorker(settings, base, None, None, device="cpu")

    async def wave(lo: int, tag: str, one_search: bool) -> list:
        limit = asyncio.Semaphore(PLAN_CONCURRENCY)
        retracted = await worker._retracted(scopes) if one_search else {}

        async def plan(i: int):
            async with limit:
                return await plan_job(settings, base, job(i, lo, tag), 0,
                                      retracted=retracted.get(scopes[i]))  # fmt: skip

        return await asyncio.gather(*(plan(i) for i in range(n_scopes)))

    # Every scope gets a live version first: the steady state, where a job has a parent.
    first = asyncio.run(wave(0, "first", True))
    run_batch(uri, base, [p.task for p in first], passes=2, device="cpu")
    out, planned = {}, {}
    for name, one_search, tag in (("plan, retractions per job (baseline)", False, "a"),
                                  ("plan, retractions in one search", True, "b")):  # fmt: skip
        with Requests() as req:
            t0 = time.perf_counter()
            planned[one_search] = asyncio.run(wave(2, tag, one_search))
            wall = time.perf_counter() - t0
        out[name] = {"requests_per_version": req.total / n_scopes, "wall_s": wall,
                     "by_endpoint": dict(req.by_endpoint)}  # fmt: skip
    plans = planned[True]  # the sleep worker's way; both ways plan the same tasks
    with Requests() as req:
        t0 = time.perf_counter()
        run_batch(uri, base, [p.task for p in plans], passes=2, device="cpu")
        wall = time.perf_counter() - t0
    out["register (run_batch: sleep + upload + version + alias)"] = {
        "requests_per_version": req.total / n_scopes, "wall_s": wall,
        "by_endpoint": dict(req.by_endpoint),
    }  # fmt: skip
    return out


def run(quick: bool = False, json_path: Path | None = None) -> dict:
    import os

    from infra.mlflow_server import MlflowServer
    from infra.ports import free_port

    n_scopes = 10 if quick else 40
    with tempfile.TemporaryDirectory(prefix="somna-bench-registry-") as tmp:
        existing = os.environ.get("SOMNA_MLFLOW_URI")
        server = None if existing else MlflowServer(Path(tmp) / "mlflow", free_port()).start()
        try:
            steps = _measure(existing or server.uri, Path(tmp) / "somna", n_scopes)
        finally:
            if server is not None:
                server.stop()
    result = {
        "bench": "registry",
        "quick": quick,
        "scopes": n_scopes,
        "machine": machine.describe(),
        "steps": steps,
    }
    table = Table(title=f"Registry requests per fast-weights version ({n_scopes} scopes)")
    for col in ("step", "requests / version", "wall s (the wave)"):
        table.add_column(col)
    for name, s in steps.items():
        table.add_row(name, f"{s['requests_per_version']:.2f}", f"{s['wall_s']:.2f}")
    console.print(table)
    for name, s in steps.items():
        counts = sorted(s["by_endpoint"].items(), key=lambda kv: -kv[1])
        console.print(f"{name}: " + "; ".join(f"{k} x{v}" for k, v in counts), soft_wrap=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    return result
