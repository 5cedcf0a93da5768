"""`somna worker stream`: the streaming worker, running the chosen roles in one event loop.

Roles: ``agent`` (inference), ``history`` (Parquet), ``consolidator`` (sleep jobs). The
history and consolidator roles are Faust agents of one App; the inference agent is a
plain aiokafka consumer group hosted as a service of that App (streams/agent_consumer.py;
group ``<App group>-agent``). Each worker process joins the consumer groups of its set of
roles, so more processes with the same roles split the partitions between them
(co-partitioned: a scope's interactions, fast weights and retractions always land on the
same worker). SIGTERM and SIGINT stop the worker cleanly: Faust stops the agents, flushes
the producer and commits offsets; the agent's service commits and leaves its group.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import faust

from infra.settings import Settings
from streams import metrics
from streams.app import AGENT_ROLES, ALL_ROLES, create_app, declare_topics, group_id
from streams.dead_letters import DeadLetterPolicy
from streams.engine import Engine, NullEngine
from streams.engine_thread import set_process_nice
from streams.exceptions import StreamsError
from streams.gaps import SkipCheck

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]


def model_engine(settings: Settings) -> Engine:
    """The production engine: the base model at alias ``production`` (registered if absent)."""
    from consolidation.base_model import ensure_base_model
    from streams.memory import ModelEngine

    if settings.agent_torch_threads:
        import torch

        torch.set_num_threads(settings.agent_torch_threads)
    base = ensure_base_model(settings.tracking_uri)
    log.info("serving base model version %s", base.version)
    return ModelEngine(
        base.lm, base_model_version=base.version, max_scopes=settings.agent_max_scopes
    )


def null_engine(settings: Settings) -> Engine:
    return NullEngine()


ENGINES: dict[str, EngineFactory] = {"model": model_engine, "null": null_engine}


def build(
    settings: Settings,
    roles: Sequence[str] = ALL_ROLES,
    *,
    engine: Engine | None = None,
    app_id: str | None = None,
) -> faust.App:
    """A Faust App running ``roles``; ``engine`` defaults to the engine named by
    ``SOMNA_STREAM_ENGINE`` ("model", or "null" for benchmarks)."""
    roles = tuple(roles)
    unknown = sorted(set(roles) - set(ALL_ROLES))
    if unknown or not roles:
        raise StreamsError(f"roles must be a non-empty subset of {ALL_ROLES}, got {roles}")
    app = create_app(settings, app_id=app_id or settings.stream_group or group_id(roles))
    topics = declare_topics(app)

    async def send_dead_letter(key: bytes | None, value: bytes) -> object:
        return await topics.dead_letters.send(key=key, value=value)

    dlq = DeadLetterPolicy(send_dead_letter, max_text_bytes=settings.max_text_bytes)
    skips = SkipCheck(app, settings.bootstrap)  # one committed-offsets query per rebalance
    intake = None
    # The agent claims its topics first: bad input is reported once, by the first role.
    if "agent" in roles:
        from streams import agent

        if engine is None:
            name = os.environ.get("SOMNA_STREAM_ENGINE", "model")
            if name not in ENGINES:
                raise StreamsError(
                    f"SOMNA_STREAM_ENGINE must be one of {sorted(ENGINES)}, got {name!r}"
                )
            engine = ENGINES[name](settings)
        intake = agent.install(app, dlq, settings, engine)

    if "history" in roles:
        from streams import history

        history.install(app, topics, dlq, skips, settings)
    if "consolidator" in roles:
        from streams import consolidator

        consolidator.install(app, topics, dlq, skips, settings)

    @app.timer(interval=5.0)
    async def report_lag() -> None:
        await report_consumer_lag(app.conf.id, app.consumer)
        if intake is not None and intake.consumer is not None:
            await report_consumer_lag(intake.group_id, intake.consumer)

    return app


async def report_consumer_lag(group: str, consumer: Any) -> None:
    """Lag per partition ``consumer`` (the Faust App's, or the agent's aiokafka one) is
    assigned in ``group``: the partition's end offset minus our position."""
    try:
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            position = await asyncio.wait_for(consumer.position(tp), timeout=1)
            if highwater is not None and position is not None:
                metrics.CONSUMER_LAG.labels(
                    group=group, topic=tp.topic, partition=tp.partition
                ).set(max(0, highwater - position))
    except Exception:  # lag is best-effort telemetry; never let it stop the worker
        log.debug("consumer lag of %s not available", group, exc_info=True)


def run(settings: Settings, roles: Sequence[str] = ALL_ROLES) -> None:
    """Block running ``roles`` until SIGTERM/SIGINT; serves Prometheus metrics meanwhile."""
    from infra.topics import provision
    from streams.log_limits import limit_client_logs

    if tuple(roles) == AGENT_ROLES and settings.agent_nice:
        # Before the worker starts its threads: they inherit it (settings.agent_nice).
        set_process_nice(settings.agent_nice)

    # A broker outage makes aiokafka log thousands of lines a second: a few are enough.
    limit_client_logs()
    # An unreachable tracking server must not hold a rebalance for minutes of retries:
    # a fetch that fails is a refused swap (the previous weights keep serving).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    provision(settings.bootstrap, settings.partitions)
    app = build(settings, roles)
    port = metrics.serve(settings.metrics_port)
    # What is imported and built by now lives as long as the worker: frozen, a full
    # collection no longer scans it. Torch, Faust and MLflow are ~320k objects, ~150 ms a
    # full scan, and under load the agent paused 190-230 ms twice a minute for it.
    gc.collect()
    gc.freeze()
    metrics.track_gc()
    log.info("stream worker %s (roles %s): metrics on :%d", app.conf.id, ",".join(roles), port)
    worker = faust.Worker(
        app, loglevel=logging.getLevelName(logging.getLogger().level), override_logging=False
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as e:
        if e.code not in (0, None):
            raise StreamsError(f"stream worker exited with status {e.code}") from None


def main() -> None:
    """``python -m streams.worker [roles...]``: what tests and benchmarks spawn."""
    import sys

    level = os.environ.get("SOMNA_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    roles = tuple(sys.argv[1:]) or ALL_ROLES
    run(Settings(), roles)


if __name__ == "__main__":
    main()
