"""Prometheus metrics of the streaming workers (one registry per process, the default one).

Names follow Prometheus conventions: ``_total`` for counters, base units (seconds).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

EVENTS = Counter(
    "somna_stream_events_total", "Events consumed by a streaming role.", ["role", "topic"]
)
REPLIES = Counter("somna_replies_total", "Replies produced by the inference agent.")
TURN_LATENCY = Histogram(
    "somna_turn_latency_seconds",
    "From consuming a user turn to producing its reply.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DEAD_LETTERS = Counter(
    "somna_dead_letters_total", "Payloads sent to somna.dead-letters.", ["source_topic"]
)
# ``group``: a worker's Faust roles and its inference agent consume in groups of their own.
CONSUMER_LAG = Gauge(
    "somna_consumer_lag",
    "Messages behind the end of the partition.",
    ["group", "topic", "partition"],
)
READ_BACK = Counter(
    "somna_read_back_total",
    "Records a role's consumer skipped and the role read back from the topic.",
    ["role", "topic"],
)
SLEEP_JOBS = Counter("somna_sleep_jobs_emitted_total", "Sleep jobs emitted.", ["reason"])
SWAPS = Counter("somna_fast_weight_swaps_total", "Fast-weight artifacts swapped in.", ["outcome"])
SWAP_REWAKES = Counter(
    "somna_swap_rewoken_tokens_total",
    "Tokens the agent woke again to apply fast-weight swaps, by whether it resumed from a "
    "sleep worker's pre-woken state.",
    ["prewoken"],
)
HISTORY_ROWS = Counter("somna_history_rows_written_total", "Rows written to Parquet history.")
LIVE_SCOPES = Gauge("somna_live_scopes", "Scopes whose memory state is loaded in the agent.")


GC_PAUSE = Histogram(
    "somna_gc_pause_seconds",
    "Python garbage collections of a worker: the whole process waits for them.",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
GC_LOG_SECONDS = 0.05  # a pause this long is logged: it delays every turn in flight


_gc_started: list[float] = []  # when the collection in progress began


def _time_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_started[:] = [time.perf_counter()]
    elif _gc_started:
        pause = time.perf_counter() - _gc_started[0]
        GC_PAUSE.labels(str(info["generation"])).observe(pause)
        if pause >= GC_LOG_SECONDS:
            log.info("gc generation %d paused the worker %.0f ms (%d collected)",
                     info["generation"], pause * 1000, info["collected"])  # fmt: skip


def track_gc() -> None:
    """Time every garbage collection of this process (a second call changes nothing)."""
    if _time_gc not in gc.callbacks:
        gc.callbacks.append(_time_gc)


def serve(port: int) -> int:
    """Start the /metrics endpoint; port 0 picks a free one. Returns the bound port."""
    server, _thread = start_http_server(port)
    return int(server.server_port)
