"""Publishing ``FastWeightsPublished`` to ``somna.fast-weights``, keyed by scope."""

from __future__ import annotations

from collections.abc import Iterable

from infra.topics import FAST_WEIGHTS
from streams.records import FastWeightsPublished


def make_producer(bootstrap: str):  # -> aiokafka.AIOKafkaProducer
    from aiokafka import AIOKafkaProducer

    # Idempotent producer: a retried send after a broker hiccup is written once.
    return AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")


async def send_all(producer, events: Iterable[FastWeightsPublished]) -> None:
    """Send and wait for every event to be acknowledged (all in flight at once)."""
    futures = [
        await producer.send(FAST_WEIGHTS, key=e.scope_id.encode("utf-8"), value=e.to_bytes())
        for e in events
    ]
    for f in futures:
        await f


async def publish(bootstrap: str, events: Iterable[FastWeightsPublished]) -> None:
    """One-shot publish with a short-lived producer (CLI commands)."""
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        await send_all(producer, events)
    finally:
        await producer.stop()
