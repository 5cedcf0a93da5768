"""The whole loop on the real broker and MLflow: turns -> sleep job -> new version -> the
agent swaps it in and replies with it; rollback -> the agent replies with the older one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from consolidation import fast_weights
from consolidation.rollback import rollback_async
from consolidation.sleep_worker import run_async
from infra.settings import Settings
from infra.topics import REPLIES
from streams.records import Reply
from tests.consolidation.conftest import scope_id
from tests.consolidation.kafka_helpers import PublishWatcher, partitions_of, send_turns

pytestmark = [pytest.mark.kafka, pytest.mark.mlflow, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["kim", "bob", "tav", "lem", "sam", "dex", "vin", "rup", "nal", "mop", "ged", "hux"]
FACTS = [f"{a} reports to {b}." for a, b in zip(NAMES, NAMES[1:], strict=False)]  # ~21 tokens each
CHUNK = 160  # the polls below ("hi?", 5 tokens) rarely fill a chunk on their own


def _stream_worker(settings: Settings, log: Path) -> subprocess.Popen:
    env = dict(os.environ, SOMNA_KAFKA_BOOTSTRAP=settings.bootstrap, SOMNA_MLFLOW_URI=settings.tracking_uri,
               SOMNA_DATA_DIR=str(settings.data_dir), SOMNA_PARTITIONS=str(settings.partitions),
               SOMNA_STREAM_GROUP=f"g-{uuid.uuid4().hex[:10]}", SOMNA_STREAM_ENGINE="model",
               SOMNA_CHUNK_TOKENS=str(settings.chunk_tokens), SOMNA_SLEEP_PASSES=str(settings.sleep_passes),
               SOMNA_IDLE_SECONDS="3600", SOMNA_HISTORY_WINDOW_SECONDS="0.5", OMP_NUM_THREADS="1")  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "streams.worker"], cwd=ROOT, env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # fmt: skip


class Replies:
    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
        )

    async def start(self) -> Replies:
        await self.consumer.start()
        tps = [
            TopicPartition(REPLIES, p) for p in sorted(await partitions_of(self.bootstrap, REPLIES))
        ]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        return self

    async def reply_to(self, event_id: str, timeout: float = 240.0) -> Reply:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for records in (await self.consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    reply = Reply.model_validate_json(r.value)
                    if reply.event_id == event_id:
                        return reply
        raise TimeoutError(f"no reply to {event_id}")


async def _ask(bootstrap: str, replies: Replies, scope: str, text: str) -> Reply:
    from streams.records import Interaction, now
    from tests.consolidation.kafka_helpers import AIOKafkaProducer

    ev = Interaction(event_id=f"q-{uuid.uuid4().hex[:10]}", scope_id=scope, session_id="s1", role="user",
                     text=text, ts=now())  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait("somna.interactions", key=scope.encode(), value=ev.to_bytes())
    finally:
        await producer.stop()
    return await replies.reply_to(ev.event_id)


async def _served(
    bootstrap: str, replies: Replies, scope: str, version: str, tries: int = 60
) -> Reply:
    """Ask until a reply uses ``version``: the agent swaps asynchronously after a publish."""
    for _ in range(tries):
        reply = await _ask(bootstrap, replies, scope, "hi?")
        if reply.fast_weights_version == version:
            return reply
        await asyncio.sleep(0.5)
    raise AssertionError(
        f"the agent never replied with v{version} (last: {reply.fast_weights_version})"
    )


async def test_turns_become_a_version_the_agent_replies_with(
    settings: Settings, base_model, tmp_path
) -> None:
    settings = settings.model_copy(update={"chunk_tokens": CHUNK, "sleep_passes": 2})
    scope = scope_id("e2e")
    worker_log = tmp_path / "stream-worker.log"
    stream = _stream_worker(settings, worker_log)
    stop = asyncio.Event()
    sleeper = asyncio.create_task(run_async(settings, stop=stop, group_id=f"g-{uuid.uuid4().hex}",
                                            accept=lambda s: s == scope))  # fmt: skip
    watcher = await PublishWatcher(settings.bootstrap).start()
    replies = await Replies(settings.bootstrap).start()
    try:
        first = await _ask(settings.bootstrap, replies, scope, "hello.")  # the agent is up
        assert first.fast_weights_version is None
        await send_turns(settings.bootstrap, scope, FACTS[:8])  # > CHUNK tokens: one job
        v1 = await watcher.wait(scope, timeout=240)
        await _served(settings.bootstrap, replies, scope, v1.version)
        await send_turns(settings.bootstrap, scope, FACTS[8:] * 3)
        v2 = await watcher.wait(scope, timeout=240, min_watermark=v1.watermark + 1)
        await _served(settings.bootstrap, replies, scope, v2.version)
        # Rollback: the agent serves the older version again.
        await rollback_async(settings, scope, v1.version)
        assert fast_weights.latest_live(settings.tracking_uri, scope).version == v1.version
        # The agent reloads the scope: v1 plus the turns after v1's watermark, from the topic.
        await _served(settings.bootstrap, replies, scope, v1.version, tries=10)
    finally:
        stop.set()
        await sleeper
        await watcher.stop()
        await replies.consumer.stop()
        stream.send_signal(signal.SIGTERM)
        try:
            stream.wait(60)
        except subprocess.TimeoutExpired:
            stream.kill()
        print(worker_log.read_text(errors="replace")[-5000:])
