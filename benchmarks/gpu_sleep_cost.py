"""The sleep worker's batched sleep on a GPU: what it costs the GPU and the host.

Times ``consolidation.batch.sleep_states`` (what ``run_batch`` calls) with the shipped
checkpoint (facts-n4) on 1, 32 and 128 scopes x 256 tokens (128 x 256 is a full batch,
``MAX_BATCH_TOKENS``):
- fp32, as the worker runs today: the gated delta rule takes the torch ops (fla's kernels
  take bf16/fp16 only);
- bf16 autocast with fla (where installed), and with the torch ops.
Per cell: wall seconds, the process's CPU seconds meanwhile (host time a GPU sleep worker
takes from the cores it shares with the agents), joules from NVML where the card reports
them, and max |fast weights - fp32's| / max |fp32's| over the batch.

    python -m benchmarks.gpu_sleep_cost [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.contention import SLEEP_CHUNK, sleep_tasks
from consolidation.base_model import BaseModel, shipped_checkpoint
from consolidation.batch import sleep_states
from consolidation.cost import EnergyMeter
from model import HybridLM

SCOPES = (1, 32, 128)
REPEATS = 5
VARIANTS = {  # name -> (autocast dtype or None, SOMNA_FORCE_TORCH_OPS)
    "fp32 (as the worker runs)": (None, "0"),
    "bf16 autocast, fla": (torch.bfloat16, "0"),
    "bf16 autocast, torch ops": (torch.bfloat16, "1"),
}


def _rel(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    return max(
        float((x[k].float() - y[k].float()).abs().max() / y[k].float().abs().max().clamp_min(1e-12))
        for x, y in zip(a, b, strict=True)
        for k in y
    )


def run(json_path: Path | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from model.ops import backend_for

    ckpt = shipped_checkpoint("facts-n4")
    base = BaseModel(HybridLM.load(ckpt, device="cpu"), "bench", ckpt)
    passes = base.lm.config.sleep_passes
    meter = EnergyMeter()
    cells: dict[str, dict[str, Any]] = {}
    reference: dict[int, list] = {}
    for name, (dtype, force) in VARIANTS.items():
        os.environ["SOMNA_FORCE_TORCH_OPS"] = force
        probe = torch.zeros(1, dtype=dtype or torch.float32, device="cuda")
        if "fla" in name and backend_for(probe) != "fla":
            continue  # fla is not installed here
        for n in SCOPES:
            tasks = sleep_tasks(n, seed=n)
            cast = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
            walls, cpus, joules = [], [], []
            with cast:
                sleep_states(base, tasks, passes, "cuda")  # warm-up (and Triton's compile)
                for _ in range(REPEATS):
                    torch.cuda.synchronize()
                    meter.start()
                    w0, c0 = time.perf_counter(), time.process_time()
                    out = sleep_states(base, tasks, passes, "cuda")  # ends in a copy to CPU
                    walls.append(time.perf_counter() - w0)
                    cpus.append(time.process_time() - c0)
                    j = meter.stop()
                    if j is not None:
                        joules.append(j)
            reference.setdefault(n, out)
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            cells[f"{name}/{n}"] = {
                "variant": name,
                "scopes": n,
                "tokens": n * SLEEP_CHUNK,
                "wall_s": wall,
                "cpu_s": cpu,
                "cpu_per_wall": cpu / wall,
                "tokens_per_s": n * SLEEP_CHUNK * passes / wall,
                "joules": statistics.median(joules) if joules else None,
                "rel_err_vs_fp32": _rel(out, reference[n]),
            }
    result = {
        "benchmark": "gpu_sleep_cost",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "checkpoint": ckpt.name,
        "passes": passes,
        "repeats": REPEATS,
        "cells": cells,
    }
    table = Table(title=f"Batched sleep of the sleep worker on {result['gpu']} ({ckpt.name}, N={passes})")  # fmt: skip
    for col in ("variant", "scopes x 256", "wall ms", "CPU s / wall s", "token-passes/s", "J", "rel err vs fp32"):  # fmt: skip
        table.add_column(col, justify="right")
    for c in cells.values():
        table.add_row(
            c["variant"], str(c["scopes"]), f"{1e3 * c['wall_s']:.1f}", f"{c['cpu_per_wall']:.2f}",
            f"{c['tokens_per_s']:,.0f}", "-" if c["joules"] is None else f"{c['joules']:.1f}",
            f"{c['rel_err_vs_fp32']:.1e}",
        )  # fmt: skip
    Console(width=120).print(table)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_sleep_cost")
    ap.add_argument("--json", type=Path)
    run(ap.parse_args().json)
