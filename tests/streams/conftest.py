"""Helpers of the streaming tests: worker processes, a producer, and a reader of topics.

Workers run as real processes (``python -m streams.worker``), as in production: each is
one Faust worker in its own event loop, stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.topics import INTERACTIONS
from streams.records import Interaction, now

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 4  # tests/conftest.py provisions the topics with this many


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def turn(scope: str, text: str, role: str = "user", event_id: str | None = None) -> Interaction:
    return Interaction(
        event_id=event_id or unique("e"),
        scope_id=scope,
        session_id="s1",
        role=role,
        text=text,
        ts=now(),
    )


class Worker:
    """One `python -m streams.worker` process; its log is kept for failures."""

    def __init__(self, env: dict[str, str], roles: tuple[str, ...], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.worker", *roles],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def stream_env(kafka_bootstrap: str, mlflow_uri: str, tmp_path: Path) -> dict[str, str]:
    """Environment of worker processes: the test broker and tracking server (the history
    role asks it for retracted events), a fresh data dir, a unique group."""
    env = dict(os.environ)
    env.update(
        SOMNA_KAFKA_BOOTSTRAP=kafka_bootstrap,
        SOMNA_MLFLOW_URI=mlflow_uri,
        SOMNA_DATA_DIR=str(tmp_path / "somna"),
        SOMNA_PARTITIONS="4",
        SOMNA_STREAM_GROUP=unique("g"),
        SOMNA_STREAM_ENGINE="null",
        SOMNA_HISTORY_WINDOW_SECONDS="0.5",
        SOMNA_LOG_LEVEL="INFO",
        OMP_NUM_THREADS="1",
    )
    return env


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(env: dict[str, str], roles: tuple[str, ...] = ()) -> Worker:
        w = Worker(env, roles, tmp_path / f"worker-{len(workers)}.log")
        workers.append(w)
        return w

    yield start
    for i, w in enumerate(workers):
        if w.proc.poll() is None:
            w.stop()
        print(f"--- worker {i} log (tail) ---\n{w.log()[-6000:]}")  # shown when the test fails


async def produce(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in items:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


async def send_turns(bootstrap: str, turns: list[Interaction]) -> None:
    await produce(bootstrap, INTERACTIONS, [(t.scope_id.encode(), t.to_bytes()) for t in turns])


class TopicReader:
    """Reads a topic from its end at creation on: the records this test caused."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> TopicReader:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False
        )
        await self.consumer.start()
        tps = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now, before anything is produced
            await self.consumer.position(tp)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.consumer is not None
        await self.consumer.stop()

    async def collect(
        self, until: Callable[[list], bool], timeout: float = 120.0, keep: Callable = lambda r: True
    ) -> list:
        """Records (aiokafka ConsumerRecord) that ``keep`` accepts, until ``until`` holds."""
        assert self.consumer is not None
        out: list = []
        deadline = time.monotonic() + timeout
        while not until(out):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out on {self.topic}: got {len(out)} records")
            batches = await self.consumer.getmany(timeout_ms=500)
            for records in batches.values():
                out += [r for r in records if keep(r)]
        return out


async def answered(bootstrap: str, scope: str, timeout: float = 300.0) -> None:
    """Send a user turn and wait for its reply: the agent is up and past its backlog."""
    async with TopicReader(bootstrap, "somna.replies") as replies:
        await send_turns(bootstrap, [turn(scope, "ready?")])
        await replies.collect(
            lambda rs: len(rs) >= 1, timeout, keep=lambda r: r.key == scope.encode()
        )
