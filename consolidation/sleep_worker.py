"""The sleep worker: a Kafka consumer group on ``somna.sleep-jobs`` (and ``somna.retractions``).

Loop: fetch what is there, plan each job (``planner``), gather the plans of distinct scopes
up to a token budget, run them as one batched sleep (``batch.run_batch``: one MLflow run,
one version per scope, ``live`` moved), publish ``FastWeightsPublished`` keyed by scope,
and only then commit the jobs' offsets. A crash anywhere before the commit redelivers
the job; the planner then finds the version the job already registered (by its job id)
and publishes it again instead of registering a second one.

Retractions are applied here too (``retraction.apply``): purge the event from the Parquet
history, record it on the scope's registered model, rebuild from the last version before it.

Sleep runs on the GPU when there is one, in a worker thread so the consumer's heartbeats
keep going. Bad job payloads go to ``somna.dead-letters``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from consolidation import blobs, fast_weights, metrics, prewake
from consolidation.base_model import BASE_MODEL_NAME, BaseModel, ensure_base_model
from consolidation.base_model_watch import BaseModelWatch
from consolidation.batch import pick_device, run_batch
from consolidation.exceptions import HistoryError
from consolidation.planner import Plan, plan_job
from consolidation.publish import make_producer, send_all
from consolidation.retraction_record import retracted_in
from consolidation.turns import TopicReader
from infra.settings import Settings
from infra.topics import DEAD_LETTERS, RETRACTIONS, SLEEP_JOBS
from streams.records import FastWeightsPublished, Retraction, SleepJob

log = logging.getLogger(__name__)

GROUP_ID = "somna-sleep"
MAX_BATCH_TOKENS = 32_768  # tokens of all scopes in one batched sleep
PLAN_RETRIES = 5  # a job whose events are not readable yet is retried this often, 1 s apart
PLAN_CONCURRENCY = 8  # jobs planned at once (registry round trips, artifact downloads)
MAX_FAILURES = 3  # a batch whose first record fails this often: that record is dead-lettered


@dataclass
class _Group:
    plans: list[Plan] = field(default_factory=list)
    tokens: int = 0
    offsets: dict = field(default_factory=dict)  # TopicPartition -> next offset to commit
    partitions: dict[str, int] = field(default_factory=dict)  # scope -> its partition
    retracted: dict[str, set[str]] = field(default_factory=dict)  # scope -> event ids


class SleepWorker:
    def __init__(
        self,
        settings: Settings,
        base: BaseModel,
        consumer,
        producer,
        *,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        accept: Callable[[str], bool] | None = None,
        device: str | None = None,
    ) -> None:
        from streams.dead_letters import DeadLetterPolicy

        self.settings = settings
        self.base = base
        self.consumer = consumer
        self.producer = producer
        self.max_batch_tokens = max_batch_tokens
        self.accept = accept or (lambda scope: True)
        self.device = device or pick_device()
        self.reader = TopicReader(settings.bootstrap)
        self.dlq = DeadLetterPolicy(
            lambda key, value: producer.send_and_wait(DEAD_LETTERS, key=key, value=value),
            max_text_bytes=settings.max_text_bytes,
        )

    async def handle(self, records: list) -> None:
        """Handle fetched records in offset order.

        Jobs of distinct scopes form a wave, planned concurrently (planning is mostly round
        trips to the registry) and slept in batches of up to ``max_batch_tokens``; a second
        job of a scope starts the next wave, since its parent is the first one's result.
        Offsets are committed once a wave is published.
        """
        wave: list[tuple[Any, SleepJob | None]] = []
        scopes: set[str] = set()
        for rec in records:
            if rec.topic == RETRACTIONS:
                await self._run_wave(wave)
                wave, scopes = [], set()
                await self.retract(rec)
                await self.consumer.commit({_tp(rec): rec.offset + 1})
                continue
            job = await self.dlq.decode(
                rec.value, SleepJob, key=rec.key, topic=rec.topic,
                partition=rec.partition, offset=rec.offset,
            )  # fmt: skip
            if job is not None and not self.accept(job.scope_id):
                job = None
            if job is not None and job.scope_id in scopes:
                await self._run_wave(wave)
                wave, scopes = [], set()
            wave.append((rec, job))
            if job is not None:
                scopes.add(job.scope_id)
        await self._run_wave(wave)

    async def _run_wave(self, wave: list[tuple[Any, SleepJob | None]]) -> None:
        if not wave:
            return
        limit = asyncio.Semaphore(PLAN_CONCURRENCY)
        jobs = [(rec, job) for rec, job in wave if job is not None]
        retracted = await self._retracted([job.scope_id for _, job in jobs])

        async def plan(rec, job: SleepJob) -> Plan | None:
            async with limit:
                return await self._plan(job, rec.partition, retracted.get(job.scope_id))

        t0 = time.perf_counter()
        plans = await asyncio.gather(*(plan(rec, job) for rec, job in jobs))
        if jobs:
            log.info("planned %d job(s) in %.2fs", len(jobs), time.perf_counter() - t0)
        partitions = {job.scope_id: rec.partition for rec, job in jobs}  # co-partitioned
        group = _Group(partitions=partitions, retracted=retracted)
        for p in plans:
            tokens = p.task.tokens if p is not None and p.task else 0
            if group.plans and group.tokens + tokens > self.max_batch_tokens:
                await self.flush(group)
                group = _Group(partitions=partitions, retracted=retracted)
            if p is not None:
                group.plans.append(p)
                group.tokens += tokens
        for rec, _ in wave:
            group.offsets[_tp(rec)] = rec.offset + 1  # records come in offset order
        await self.flush(group)

    async def _retracted(self, scopes: list[str]) -> dict[str, set[str]]:
        """The retracted events of a wave's scopes, from one registry search per 100 scopes
        (the registry is the consolidation's bottleneck on a CPU box: every call costs the
        tracking server 10-50 ms of CPU, and a version takes ~7 of them). {} if it fails:
        each plan then asks for its own scope."""
        if not scopes:
            return {}
        try:
            models = await asyncio.to_thread(
                fast_weights.registered_models, self.settings.tracking_uri, scopes
            )
        except Exception as e:  # noqa: BLE001 (an optimisation: the plans look it up)
            log.warning("registry search for %d scopes failed: %s", len(scopes), e)
            return {}
        return {s: retracted_in(models[s].tags) if s in models else set() for s in scopes}

    async def _plan(
        self, job: SleepJob, partition: int, retracted: set[str] | None = None
    ) -> Plan | None:
        for attempt in range(PLAN_RETRIES):
            try:
                t0 = time.perf_counter()
                plan = await plan_job(
                    self.settings, self.base, job, partition, self.reader, retracted=retracted
                )
                log.debug(
                    "planned %s (%s) in %.3fs", job.job_id, plan.outcome, time.perf_counter() - t0
                )
                return plan
            except HistoryError as e:
                log.info("job %s not ready (%s), try %d", job.job_id, e, attempt + 1)
                await asyncio.sleep(1.0)
        # The consolidation processor sends an in-flight job again after a while.
        log.warning("job %s deferred: its events are not readable yet", job.job_id)
        metrics.JOBS.labels(outcome="deferred").inc()
        return None

    async def flush(self, group: _Group) -> None:
        """Sleep the group's tasks in one batch, publish everything, then commit."""
        done = [p.done for p in group.plans if p.done is not None]
        tasks = [p.task for p in group.plans if p.task is not None]
        published: list[FastWeightsPublished] = []
        t0 = time.perf_counter()
        if tasks:
            published, _ = await asyncio.to_thread(
                run_batch, self.settings.tracking_uri, self.base, tasks,
                passes=self.settings.sleep_passes, device=self.device,
                blob_root=blobs.root(self.settings.data_dir),
            )  # fmt: skip
            fault_point("after_register")
        for p in group.plans:
            metrics.JOBS.labels(outcome=p.outcome).inc()
        t1 = time.perf_counter()
        prewoken = await self._prewake(published, group)
        t2 = time.perf_counter()
        if done or published:
            await send_all(self.producer, [*done, *published])
        if group.offsets:
            await self.consumer.commit(dict(group.offsets))
        if group.plans:
            log.info(
                "batch of %d job(s): %d slept and registered in %.2fs, %d pre-woken in %.2fs, "
                "published+committed in %.2fs",
                len(group.plans), len(tasks), t1 - t0, prewoken, t2 - t1,
                time.perf_counter() - t2,
            )  # fmt: skip

    async def _prewake(self, published: list[FastWeightsPublished], group: _Group) -> int:
        """Wake what each new version leaves pending, for the agents (consolidation/prewake.py).
        Best effort: a failure costs the agents their own re-wake, never the publish."""
        if not published or not self.settings.sleep_prewake:
            return 0
        try:
            return await prewake.prewake(
                self.base.lm, self.settings.tracking_uri, self.reader,
                blobs.root(self.settings.data_dir), published, group.partitions, group.retracted,
            )  # fmt: skip
        except Exception:  # noqa: BLE001 (see above)
            log.exception("pre-waking %d version(s)", len(published))
            return 0

    async def retract(self, rec) -> None:
        from consolidation.retraction import apply

        event = await self.dlq.decode(
            rec.value, Retraction, key=rec.key, topic=rec.topic,
            partition=rec.partition, offset=rec.offset,
        )  # fmt: skip
        if event is None or not self.accept(event.scope_id):
            return
        result = await apply(
            self.settings, self.base, event.scope_id, event.event_id, event.reason,
            partition=rec.partition, device=self.device, reader=self.reader,
        )  # fmt: skip
        if result.published is not None:
            await send_all(self.producer, [result.published])


def fault_point(name: str) -> None:
    """Fault injection for the crash tests: with ``SOMNA_FAULT=<name>`` the worker stops
    dead here (blocks until killed), e.g. after registering and before publishing."""
    if os.environ.get("SOMNA_FAULT") == name:
        log.warning("fault injection: blocking at %s until killed", name)
        while True:
            time.sleep(3600)


def _tp(rec):
    from aiokafka import TopicPartition

    return TopicPartition(rec.topic, rec.partition)


async def run_async(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    group_id: str = GROUP_ID,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    accept: Callable[[str], bool] | None = None,
    started: asyncio.Event | None = None,
) -> None:
    """Consume and sleep until ``stop`` is set."""
    from aiokafka import AIOKafkaConsumer

    stop = stop or asyncio.Event()
    base = await asyncio.to_thread(ensure_base_model, settings.tracking_uri)
    log.info("sleep worker: base model %s v%s", BASE_MODEL_NAME, base.version)
    consumer = AIOKafkaConsumer(
        SLEEP_JOBS, RETRACTIONS,
        bootstrap_servers=settings.bootstrap, group_id=group_id,
        enable_auto_commit=False, auto_offset_reset="earliest",
        max_poll_interval_ms=600_000,
    )  # fmt: skip
    producer = make_producer(settings.bootstrap)
    await producer.start()
    await consumer.start()
    worker = SleepWorker(
        settings, base, consumer, producer, max_batch_tokens=max_batch_tokens, accept=accept
    )
    if started is not None:
        started.set()
    failures: dict[tuple[str, int, int], int] = {}

    async def take_base(new: BaseModel) -> None:
        worker.base = new  # between batches: a batch never mixes two base models

    watch = BaseModelWatch(settings.tracking_uri, base.version, take_base)
    next_poll = time.monotonic() + watch.interval
    try:
        while not stop.is_set():
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + watch.interval
                await watch.poll()
            fetched = await consumer.getmany(timeout_ms=500, max_records=256)
            records = [r for tp in sorted(fetched, key=str) for r in fetched[tp]]
            if not records:
                continue
            try:
                await worker.handle(records)
                failures.clear()
            except Exception as e:  # MLflow or the broker away, or a job that cannot run
                first = records[0]
                key = (first.topic, first.partition, first.offset)
                failures[key] = failures.get(key, 0) + 1
                log.exception(
                    "sleep batch failed (%d time(s)); retrying from the last commit", failures[key]
                )
                if failures[key] >= MAX_FAILURES:
                    # Poison: the same first record keeps failing. Divert it, move past it.
                    await worker.dlq.divert(
                        first.value, key=first.key, reason=f"sleep failed {failures[key]} times: {e}",
                        topic=first.topic, partition=first.partition, offset=first.offset,
                    )  # fmt: skip
                    await consumer.commit({_tp(first): first.offset + 1})
                    metrics.JOBS.labels(outcome="dead_letter").inc()
                await _rewind(consumer)
                await asyncio.sleep(min(30.0, 2.0 * failures[key]))
    finally:
        await worker.reader.stop()
        await consumer.stop()
        await producer.stop()


async def _rewind(consumer) -> None:
    for tp in consumer.assignment():
        committed = await consumer.committed(tp)
        if committed is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, committed)


def apply_scheduling(settings: Settings, device: str) -> str:
    """Put this process's sleeps below everything else on the machine (``sleep_sched``).

    On the CPU, sleep shares the cores with the agent, whose turns someone waits for:
    under SCHED_IDLE (settable without privileges) the kernel only runs it on CPU time
    that no other task wants, and one torch thread keeps it from holding both cores.
    Applied to every thread now and inherited by those started later (torch's, the
    to_thread pool's). Returns the policy in effect: "idle" or "normal"."""
    mode = settings.sleep_sched
    if mode == "auto":
        mode = "idle" if device == "cpu" else "normal"
    if mode != "idle" or not hasattr(os, "SCHED_IDLE"):
        return "normal"
    import torch

    torch.set_num_threads(1)
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
    log.info("sleep worker: SCHED_IDLE, 1 torch thread (sleep_sched=%s)", settings.sleep_sched)
    return "idle"


def run(settings: Settings) -> None:
    """`somna worker sleep`: serve metrics, consume until SIGTERM/SIGINT, stop cleanly."""
    from prometheus_client import start_http_server

    from streams.log_limits import limit_client_logs

    limit_client_logs()  # a broker outage: a few aiokafka lines a second, not thousands
    apply_scheduling(settings, pick_device())
    server = start_http_server(settings.metrics_port)
    port = server[0].server_port if isinstance(server, tuple) else settings.metrics_port
    log.info("sleep worker metrics on :%s/metrics", port)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_async(settings, stop=stop)

    asyncio.run(main())


if __name__ == "__main__":  # `python -m consolidation.sleep_worker`: what benchmarks spawn
    logging.basicConfig(
        level=os.environ.get("SOMNA_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run(Settings())
