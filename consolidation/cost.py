"""What sleep costs: measured per batch, logged to the batch's MLflow run, summed by
``somna cost``.

GPU-seconds are the wall seconds of the sleep computation when it ran on a GPU (zero on
CPU; ``compute_seconds`` has it either way). Joules come from NVML's energy counter
(``pynvml``, optional) where the card reports one, else they are left out, never guessed.
FLOPs are an estimate: ``2 * parameters * tokens * passes`` (forward only, the dense
matmuls; the recurrence itself is small next to them at these widths).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

METRICS = (
    "tokens",
    "passes",
    "scopes",
    "wall_seconds",
    "compute_seconds",
    "gpu_seconds",
    "joules",
    "flops",
)


@dataclass
class BatchCost:
    tokens: int = 0
    passes: int = 0
    scopes: int = 0
    wall_seconds: float = 0.0  # the whole batch: reads, sleep, uploads, registry
    compute_seconds: float = 0.0  # the sleep itself
    gpu_seconds: float = 0.0
    joules: float | None = None
    flops: float = 0.0

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if v is not None}


def estimate_flops(n_params: int, tokens: int, passes: int) -> float:
    return 2.0 * n_params * tokens * passes


class EnergyMeter:
    """NVML total-energy counter of one GPU between ``start`` and ``stop`` (joules or None)."""

    def __init__(self, device_index: int = 0) -> None:
        self._handle = None
        self._start_mj: int | None = None
        try:
            import pynvml  # optional: only on GPU machines

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # supported?
        except Exception as e:  # no pynvml, no driver, or a card without the counter
            log.debug("no NVML energy counter: %s", e)
            self._handle = None

    def _read_mj(self) -> int | None:
        if self._handle is None:
            return None
        import pynvml

        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def start(self) -> None:
        self._start_mj = self._read_mj()

    def stop(self) -> float | None:
        end = self._read_mj()
        if end is None or self._start_mj is None:
            return None
        return (end - self._start_mj) / 1000.0


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def cost_report(tracking_uri: str, dollars_per_hour: float, max_runs: int = 10_000) -> dict:
    """Per sleep run and in total: tokens, GPU-seconds, joules, dollars."""
    from consolidation.tracking import SLEEP_EXPERIMENT, client

    c = client(tracking_uri)
    exp = c.get_experiment_by_name(SLEEP_EXPERIMENT)
    runs = []
    if exp is not None:
        found = c.search_runs(
            [exp.experiment_id], max_results=max_runs, order_by=["attributes.start_time ASC"]
        )
        for r in found:
            m = r.data.metrics
            row = {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "start_time": r.info.start_time,
            }
            row.update({k: m.get(k) for k in METRICS})
            row["dollars"] = (m.get("gpu_seconds") or 0.0) / 3600.0 * dollars_per_hour
            runs.append(row)
    total: dict[str, float | None] = {}
    for k in (*METRICS, "dollars"):
        if k == "passes":
            continue
        vals = [r[k] for r in runs if r.get(k) is not None]
        total[k] = sum(vals) if vals else (None if k == "joules" else 0.0)
    total["runs"] = len(runs)
    return {"runs": runs, "total": total, "dollars_per_gpu_hour": dollars_per_hour}
