"""Prometheus metrics of the sleep workers (served by ``prometheus_client``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from consolidation.cost import BatchCost

JOBS = Counter("somna_sleep_jobs_total", "Sleep jobs handled, by outcome", ["outcome"])
VERSIONS = Counter("somna_sleep_versions_total", "Fast-weight versions registered")
RETRACTIONS = Counter("somna_retractions_total", "Retractions applied (history purged, rebuilt)")
TOKENS = Counter("somna_sleep_tokens_total", "Tokens consolidated")
GPU_SECONDS = Counter("somna_sleep_gpu_seconds_total", "GPU-seconds spent sleeping")
COMPUTE_SECONDS = Counter("somna_sleep_compute_seconds_total", "Seconds spent in lm.sleep")
BATCH_SECONDS = Histogram(
    "somna_sleep_batch_seconds",
    "Wall seconds of one batch (read, sleep, upload, register)",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
BATCH_SCOPES = Histogram(
    "somna_sleep_batch_scopes", "Scopes per batched sleep", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
LAST_BATCH = Gauge("somna_sleep_last_batch_timestamp_seconds", "When the last batch finished")


def observe_batch(cost: BatchCost) -> None:
    TOKENS.inc(cost.tokens)
    GPU_SECONDS.inc(cost.gpu_seconds)
    COMPUTE_SECONDS.inc(cost.compute_seconds)
    BATCH_SECONDS.observe(cost.wall_seconds)
    BATCH_SCOPES.observe(cost.scopes)
    LAST_BATCH.set_to_current_time()
