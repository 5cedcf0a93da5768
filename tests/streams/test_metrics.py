"""The stream worker's own metrics that need no broker: garbage-collection pauses."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from streams import metrics


def _count(generation: str) -> float:
    value = REGISTRY.get_sample_value("somna_gc_pause_seconds_count", {"generation": generation})
    return value or 0.0


def test_gc_pauses_are_timed_by_one_callback() -> None:
    before = len(gc.callbacks)
    metrics.track_gc()
    metrics.track_gc()  # a second call must not time every collection twice
    try:
        assert len(gc.callbacks) <= before + 1
        seen = _count("2")
        gc.collect()
        assert _count("2") == seen + 1
    finally:
        gc.callbacks[:] = [c for c in gc.callbacks if c is not metrics._time_gc]
