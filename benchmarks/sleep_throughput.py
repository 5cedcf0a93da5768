"""`somna bench sleep`: consolidated tokens per second of batched sleep.

For 1, 64 and 256 scopes x 512 tokens x N = 4 passes on the reference config
(d_model 256, 4 layers "GAGA", 4 heads of dim 64) it times one batched ``lm.sleep`` call
against a loop of single-scope sleeps (the baseline, measured in the same run), and, where
CUDA and fla are present, fla's ``chunk_gated_delta_rule`` alone on one GDN layer's shapes.
``--quick`` shrinks the sizes so it finishes in about a minute on a small CPU.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import machine
from model import HybridConfig, HybridLM
from model.ops import backend_for, gated_delta_rule
from model.ops.utils import l2norm

REFERENCE = HybridConfig(
    d_model=256, n_layers=4, pattern="GAGA", n_heads=4, head_dim=64, window=256, chunk=512
)
FULL = {"scopes": [1, 64, 256], "tokens": 512, "passes": 4, "loop_max": 16, "repeats": 3}
QUICK = {"scopes": [1, 8, 32], "tokens": 128, "passes": 4, "loop_max": 4, "repeats": 2}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {machine.cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """Best (wall, process CPU) seconds of ``repeats`` runs after one warm-up. On a shared
    CPU the process time is the steadier number; on CUDA the wall time is the one."""
    fn()
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


def kernel_alone(
    B: int, T: int, cfg: HybridConfig, device: torch.device, repeats: int
) -> float | None:
    """fla's chunk kernel on one GDN layer's shapes (bf16); None without CUDA + fla."""
    q = torch.randn(B, T, cfg.n_heads, cfg.head_dim, device=device, dtype=torch.bfloat16)
    if backend_for(q) != "fla":
        return None
    k, v = l2norm(torch.randn_like(q)), torch.randn_like(q)
    q = l2norm(q)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, cfg.n_heads, device=device))
    beta = torch.rand(B, T, cfg.n_heads, device=device, dtype=torch.bfloat16)
    h0 = torch.zeros(B, cfg.n_heads, cfg.head_dim, cfg.head_dim, device=device)
    return timed(lambda: gated_delta_rule(q, k, v, g, beta, h0, backend="fla"), device, repeats)[0]


def run(
    quick: bool = False, json_path: Path | None = None, *, compile_sleep: bool = False
) -> dict[str, Any]:
    """Time batched vs per-scope sleep; ``compile_sleep`` times ``lm.compile_sleep()``."""
    from rich.console import Console
    from rich.table import Table

    sizes = QUICK if quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared small CPU: one thread gives steadier numbers
    torch.manual_seed(0)
    lm = HybridLM(REFERENCE).to(device=device, dtype=dtype).eval()
    if compile_sleep:
        lm.compile_sleep()
    T, N, reps = sizes["tokens"], sizes["passes"], sizes["repeats"]
    probe = torch.zeros(1, 1, 1, 1, device=device, dtype=dtype)
    backend = backend_for(probe)
    rows = []
    console = Console(width=max(Console().width, 110))
    for B in sizes["scopes"]:
        tokens = torch.randint(0, 256, (B, T), device=device)
        state = lm.init_state(B)
        batched, batched_cpu = timed(lambda: lm.sleep(tokens, state, passes=N), device, reps)  # noqa: B023
        # The baseline: one sleep call per scope. Large B: time the first few, scale up.
        n_loop = min(B, sizes["loop_max"])
        singles = [lm.init_state(1) for _ in range(n_loop)]

        def loop(n_loop: int = n_loop) -> None:
            for b in range(n_loop):
                lm.sleep(tokens[b : b + 1], singles[b], passes=N)  # noqa: B023

        loop_wall, loop_cpu = timed(loop, device, 1)
        loop_s, loop_cpu = loop_wall * B / n_loop, loop_cpu * B / n_loop
        fla_s = kernel_alone(B, T, REFERENCE, device, reps)
        row = {
            "scopes": B,
            "tokens_per_scope": T,
            "passes": N,
            "batched_s": batched,
            "batched_tokens_per_s": B * T / batched,
            "batched_cpu_s": batched_cpu,
            "loop_s": loop_s,
            "loop_cpu_s": loop_cpu,
            "loop_scopes_timed": n_loop,
            "loop_tokens_per_s": B * T / loop_s,
            "speedup_vs_loop": loop_s / batched,
            "speedup_vs_loop_cpu_time": loop_cpu / batched_cpu,
            "fla_one_layer_one_pass_s": fla_s,
            # fla's kernel alone, for every GDN layer a sleep pass runs, times N passes
            "fla_kernels_of_sleep_s": None
            if fla_s is None
            else fla_s * len(REFERENCE.gdn_layers) * N,
        }
        rows.append(row)
        console.log(f"{B} scopes: batched {batched * 1e3:.1f} ms, loop {loop_s * 1e3:.1f} ms")
    result = {
        "benchmark": "sleep_throughput",
        "quick": quick,
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "gdn_backend": backend,
        "compiled": compile_sleep,
        "torch": torch.__version__,
        "config": REFERENCE.to_dict(),
        "results": rows,
    }
    compiled = ", torch.compile" if compile_sleep else ""
    table = Table(
        title=f"Batched sleep on {result['device']} ({dtype}, GDN ops: {backend}{compiled})"
    )
    for col in [
        "scopes x tokens",
        "N",
        "batched ms",
        "tok/s batched",
        "loop ms",
        "speedup",
        "CPU-time speedup",
        "fla kernels ms",
    ]:
        table.add_column(col, justify="right")
    for r in rows:
        fla = r["fla_one_layer_one_pass_s"]
        table.add_row(
            f"{r['scopes']} x {r['tokens_per_scope']}",
            str(r["passes"]),
            f"{r['batched_s'] * 1e3:.1f}",
            f"{r['batched_tokens_per_s']:,.0f}",
            f"{r['loop_s'] * 1e3:.1f}" + ("" if r["loop_scopes_timed"] == r["scopes"] else "*"),
            f"{r['speedup_vs_loop']:.1f}x",
            f"{r['speedup_vs_loop_cpu_time']:.1f}x",
            "-" if fla is None else f"{r['fla_kernels_of_sleep_s'] * 1e3:.2f}",
        )
    console.print(table)
    console.print(
        "* loop time extrapolated from the first scopes timed; tok/s counts tokens "
        "consolidated (each passes N times through the stack); fla kernels = fla's chunk kernel "
        "alone for each GDN layer x N passes (the floor of a sleep); CPU-time speedup compares "
        "process CPU seconds, steadier than wall time on a shared machine"
    )
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    run(quick=args.quick, json_path=args.json)
