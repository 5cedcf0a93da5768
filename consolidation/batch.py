"""One batched sleep over many scopes, and what follows it: artifacts, versions, cost.

A :class:`SleepTask` is one scope's share of a batch: where its fast weights start (the
parent version, or zeros), the token chunks to fold in, in order, and the lineage the new
version will carry. :func:`run_batch` sleeps all tasks together (chunk ``r`` of every task
in one ``lm.sleep`` call, ragged), then for each task writes the safetensors file, uploads
it, registers the version (after the upload is verified), moves ``live``, and returns what
to publish. One MLflow run per batch holds the artifacts and the batch's cost.
"""

from __future__ import annotations

import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consolidation import blobs, fast_weights, fast_weights_load, metrics, tracking
from consolidation.base_model import BaseModel
from consolidation.cost import BatchCost, EnergyMeter, Stopwatch, estimate_flops
from consolidation.fast_weights import Lineage
from streams.records import FastWeightsPublished

log = logging.getLogger(__name__)

REGISTER_THREADS = 4  # scopes registered concurrently (each is a few HTTP round trips)


@dataclass
class SleepTask:
    lineage: Lineage
    chunks: list[list[int]]  # token chunks, folded in this order
    parent_weights: dict[str, Any] | None = None  # tensors of the parent version (None: zeros)
    extra_tags: dict[str, str] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.chunks)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sleep_states(
    base: BaseModel, tasks: list[SleepTask], passes: int, device: str
) -> list[dict[str, Any]]:
    """Fold every task's chunks into its fast weights; returns the new tensors per task."""
    import torch

    from model import MemoryState
    from model.tokenizer import PAD

    cfg = base.lm.config
    if base.lm.device.type != torch.device(device).type:
        base.lm.to(device)  # the base model is loaded on CPU; sleep where the batch runs
    states = [
        MemoryState.from_fast_weights(t.parent_weights, cfg, device=device)
        if t.parent_weights is not None
        else MemoryState.zeros(cfg, 1, device=device)
        for t in tasks
    ]
    rounds = max((len(t.chunks) for t in tasks), default=0)
    with torch.no_grad():
        for r in range(rounds):
            idx = [i for i, t in enumerate(tasks) if r < len(t.chunks) and t.chunks[r]]
            if not idx:
                continue
            lengths = [len(tasks[i].chunks[r]) for i in idx]
            tokens = torch.full((len(idx), max(lengths)), PAD, dtype=torch.long, device=device)
            for row, i in enumerate(idx):
                tokens[row, : lengths[row]] = torch.tensor(tasks[i].chunks[r], device=device)
            batch = MemoryState.stack([states[i] for i in idx])
            batch = base.lm.sleep(
                tokens, batch, passes=passes, lengths=torch.tensor(lengths, device=device)
            )
            for i, s in zip(idx, batch.split(), strict=True):
                states[i] = s
    return [{k: v.to("cpu") for k, v in s.fast_weights().items()} for s in states]


def artifact_of(
    base: BaseModel, weights: dict[str, Any], lin: Lineage
) -> tuple[dict, dict[str, str]]:
    """Tensors and metadata in the model's artifact format (its content sha256 included),
    plus the scope and lineage, so the file alone says whose memory it is."""
    from model import MemoryState
    from model.artifact import artifact_sha256, to_artifact

    cfg = base.lm.config
    state = MemoryState.from_fast_weights(weights, cfg, watermark=lin.to_watermark)
    tensors, meta = to_artifact(
        state, base_model_version=base.version, watermark=lin.to_watermark, config=cfg
    )
    meta.update(
        scope_id=lin.scope_id,
        job_id=lin.job_id,
        parent_version=lin.parent_version or "",
        passes=str(lin.passes),
    )
    meta["sha256"] = artifact_sha256(tensors, meta)
    return tensors, meta


def run_batch(
    tracking_uri: str,
    base: BaseModel,
    tasks: list[SleepTask],
    *,
    passes: int,
    device: str | None = None,
    run_name: str = "sleep",
    blob_root: Path | None = None,
) -> tuple[list[FastWeightsPublished], BatchCost]:
    """Sleep, then register one version per task; returns the events to publish and the cost.

    With ``blob_root`` each registered artifact is also copied there (``consolidation.blobs``)
    for the agents to swap in without a download.
    """
    import torch

    device = device or pick_device()
    wall = Stopwatch()
    c = tracking.client(tracking_uri)
    run = c.create_run(
        tracking.experiment_id(c, tracking.SLEEP_EXPERIMENT),
        run_name=run_name,
        tags={"somna.kind": "sleep-batch", "base_model_version": base.version, "device": device},
    )
    run_id = run.info.run_id
    cost = BatchCost(tokens=sum(t.tokens for t in tasks), passes=passes, scopes=len(tasks))
    c.log_param(run_id, "passes", passes)
    c.log_param(run_id, "scopes", ",".join(t.lineage.scope_id for t in tasks)[:6000])

    meter = EnergyMeter()
    meter.start()
    compute = Stopwatch()
    new_weights = sleep_states(base, tasks, passes, device)
    if device == "cuda":
        torch.cuda.synchronize()
    cost.compute_seconds = compute.seconds()
    cost.gpu_seconds = cost.compute_seconds if device == "cuda" else 0.0
    cost.joules = meter.stop()
    n_params = sum(p.numel() for p in base.lm.parameters())
    cost.flops = estimate_flops(n_params, cost.tokens, passes)

    with tempfile.TemporaryDirectory(prefix="somna-sleep-") as tmp:

        def register(item: tuple[SleepTask, dict[str, Any]]) -> FastWeightsPublished:
            task, weights = item
            lin = task.lineage
            tensors, meta = artifact_of(base, weights, lin)
            local = (
                Path(tmp)
                / fast_weights.fast_weights_model_name(lin.scope_id)
                / fast_weights.FAST_WEIGHTS_FILE
            )
            fast_weights.write_artifact(local, tensors, meta)
            pub = fast_weights.register_fast_weights(
                tracking_uri, run_id=run_id, local_file=local, lineage=lin,
                extra_tags=task.extra_tags, run_artifact_uri=run.info.artifact_uri,
                check_existing=False,  # the planner looked the job id up just before
            )  # fmt: skip
            fast_weights_load.remember(tracking_uri, pub, tensors, meta)
            if blob_root is not None:
                blobs.put(blob_root, pub, local)
            metrics.VERSIONS.inc()
            return pub

        # Registering is a few round trips to the tracking server per scope: overlap them.
        with ThreadPoolExecutor(REGISTER_THREADS) as pool:
            published = list(pool.map(register, zip(tasks, new_weights, strict=True)))
    cost.wall_seconds = wall.seconds()
    c.log_batch(run_id, metrics=_mlflow_metrics(cost))
    c.set_terminated(run_id)
    metrics.observe_batch(cost)
    log.info(
        "slept %d scope(s), %d tokens x %d passes in %.2fs on %s",
        len(tasks),
        cost.tokens,
        passes,
        cost.compute_seconds,
        device,
    )
    return published, cost


def _mlflow_metrics(cost: BatchCost) -> list:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, v, ts, 0) for k, v in cost.metrics().items()]
