"""The streaming worker end to end on the real broker (null engine: no model needed)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from pathlib import Path

import pytest

from infra.topics import DEAD_LETTERS, FAST_WEIGHTS, INTERACTIONS, REPLIES, RETRACTIONS, SLEEP_JOBS
from streams.agent_consumer import agent_group_id
from streams.consolidator import TABLE_NAME
from streams.history import read_history
from streams.records import FastWeightsPublished, Reply, Retraction, SleepJob, reply_id_for

from .conftest import PARTITIONS, TopicReader, answered, produce, send_turns, turn, unique

pytestmark = [pytest.mark.kafka]


async def test_turn_in_reply_out_with_the_right_ids(kafka_bootstrap, stream_env, start_worker):
    scope = unique("scope")
    # The agent's priority (settings.agent_nice); raising a nice value needs no privilege.
    nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 1)
    worker = start_worker({**stream_env, "SOMNA_AGENT_NICE": str(nice)}, ("agent",))
    async with TopicReader(kafka_bootstrap, REPLIES) as replies:
        said = turn(scope, "hello")
        await send_turns(kafka_bootstrap, [turn(scope, "a fact.", role="system"), said])
        got = await replies.collect(lambda rs: len(rs) >= 1, keep=lambda r: r.key == scope.encode())
    reply = Reply.model_validate_json(got[0].value)
    assert reply.event_id == said.event_id and reply.reply_id == reply_id_for(said.event_id)
    assert reply.scope_id == scope and reply.base_model_version == "null"
    assert reply.latency_ms >= 0
    # An agent alone in its worker: every thread of it runs at the agent's priority.
    assert _thread_nices(worker.proc.pid) == {nice}
    # The worker's Prometheus endpoint counts it.
    import re
    import urllib.request

    port = re.search(r"metrics on :(\d+)", worker.log()).group(1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert re.search(r"^somna_replies_total [1-9]", text, re.M)
    assert "somna_turn_latency_seconds_bucket" in text
    # Consumer lag is sampled by a timer: wait for its first report.
    url = f"http://127.0.0.1:{port}/metrics"
    await _wait_for(lambda: "somna_consumer_lag{" in urllib.request.urlopen(url).read().decode())


async def test_demo_users_get_answers(kafka_bootstrap, stream_env, start_worker, tmp_path):
    from infra.settings import Settings
    from streams.demo import run_demo

    start_worker(stream_env, ("agent",))
    await answered(kafka_bootstrap, unique("probe"))  # the worker is up and caught up
    settings = Settings(kafka_bootstrap=kafka_bootstrap, partitions=4, data_dir=tmp_path)
    stats = await run_demo(settings, users=2, duration=8, think=0.05, chunk=64, live=False)
    assert stats.sent > 0 and stats.replies > 0 and stats.asked >= 0


BAD = {
    "bad JSON": b"{not json",
    "invalid UTF-8": b'{"text": "\xff\xfe"}',
    "missing fields": json.dumps({"schema_version": 1, "text": "x"}).encode(),
    "unknown version": json.dumps({"schema_version": 99}).encode(),
    "oversize text": None,  # filled in below
    "unsafe scope": None,
    "key mismatch": None,
    "tombstone": None,  # a null value (Kafka's tombstone)
}


async def test_bad_input_goes_to_dead_letters_and_the_next_event_is_answered(
    kafka_bootstrap, stream_env, start_worker
):
    scope = unique("scope")
    stream_env["SOMNA_MAX_TEXT_BYTES"] = "64"
    start_worker(stream_env)  # all roles: each bad payload must still be reported once
    good = turn(scope, "still there?")
    payloads = dict(BAD)
    payloads["oversize text"] = turn(scope, "x" * 65).to_bytes()
    unsafe = json.loads(turn(scope, "hi").to_bytes())
    unsafe["scope_id"] = "../etc"
    payloads["unsafe scope"] = json.dumps(unsafe).encode()
    payloads["key mismatch"] = turn(unique("other"), "hi").to_bytes()
    payloads["tombstone"] = None
    items = [(scope.encode(), raw) for raw in payloads.values()]
    async with (
        TopicReader(kafka_bootstrap, DEAD_LETTERS) as dead,
        TopicReader(kafka_bootstrap, REPLIES) as replies,
    ):
        await produce(kafka_bootstrap, INTERACTIONS, [*items, (scope.encode(), good.to_bytes())])
        letters = await dead.collect(
            lambda rs: len(rs) >= len(items), keep=lambda r: r.key == scope.encode()
        )
        answered = await replies.collect(
            lambda rs: len(rs) >= 1, keep=lambda r: r.key == scope.encode()
        )
    assert Reply.model_validate_json(answered[0].value).event_id == good.event_id
    decoded = [json.loads(r.value) for r in letters]
    assert len({d["offset"] for d in decoded}) == len(decoded) == len(items)
    assert [base64.b64decode(d["payload"]) for d in decoded] == [
        raw or b"" for raw in payloads.values()
    ]
    assert all(d["source_topic"] == INTERACTIONS and d["offset"] >= 0 for d in decoded)
    reasons = " | ".join(d["error"] for d in decoded)
    for word in (
        "not JSON",
        "UTF-8",
        "Field required",
        "schema_version",
        "over the limit",
        "scope_id",
        "Kafka key",
        "tombstone",
    ):
        assert word in reasons, (word, reasons)


async def test_a_full_chunk_emits_a_sleep_job_then_idle_and_retraction_jobs(
    kafka_bootstrap, stream_env, start_worker
):
    scope = unique("scope")
    stream_env.update(SOMNA_CHUNK_TOKENS="40", SOMNA_IDLE_SECONDS="2")
    start_worker(stream_env, ("consolidator",))
    turns = [turn(scope, f"fact number {i}.", role="system") for i in range(4)]  # 17 tokens each
    mine = lambda r: r.key == scope.encode()  # noqa: E731
    async with (
        TopicReader(kafka_bootstrap, SLEEP_JOBS) as jobs,
        TopicReader(kafka_bootstrap, INTERACTIONS) as sent,
    ):
        await send_turns(kafka_bootstrap, turns)
        offsets = [r.offset for r in await sent.collect(lambda rs: len(rs) >= 4, keep=mine)]
        got = await jobs.collect(lambda rs: len(rs) >= 1, keep=mine)
        job = SleepJob.model_validate_json(got[0].value)
        assert (job.scope_id, job.reason) == (scope, "chunk_full")
        assert (job.from_watermark, job.to_watermark) == (offsets[0], offsets[2])  # 51 >= 40
        # Its fast weights come back: the idle rest (offset 3) is consolidated next.
        done = FastWeightsPublished(
            scope_id=scope,
            version="1",
            artifact_uri="mlflow-artifacts:/x",
            sha256="0" * 64,
            watermark=job.to_watermark,
            base_model_version="1",
            job_id=job.job_id,
        )
        await produce(kafka_bootstrap, FAST_WEIGHTS, [(scope.encode(), done.to_bytes())])
        got = await jobs.collect(lambda rs: len(rs) >= 1, keep=mine)
        idle = SleepJob.model_validate_json(got[0].value)
        assert (idle.reason, idle.from_watermark, idle.to_watermark) == (
            "idle",
            offsets[3],
            offsets[3],
        )
        assert idle.parent_version == "1"
        # A retraction rebuilds what was consolidated, once the idle job's weights are back.
        done2 = done.model_copy(
            update={"version": "2", "watermark": offsets[3], "job_id": idle.job_id}
        )
        retraction = Retraction(scope_id=scope, event_id=turns[0].event_id, ts=0.0)
        await produce(kafka_bootstrap, FAST_WEIGHTS, [(scope.encode(), done2.to_bytes())])
        await produce(kafka_bootstrap, RETRACTIONS, [(scope.encode(), retraction.to_bytes())])
        got = await jobs.collect(lambda rs: len(rs) >= 1, keep=mine)
        rebuild = SleepJob.model_validate_json(got[0].value)
        assert (rebuild.reason, rebuild.to_watermark, rebuild.parent_version) == (
            "retraction",
            offsets[3],
            None,
        )


async def test_history_holds_each_event_once_after_a_restart(
    kafka_bootstrap, stream_env, start_worker, tmp_path
):
    scope = unique("scope")
    history_dir = tmp_path / "somna" / "history"
    first = start_worker(stream_env, ("history",))
    batch1 = [turn(scope, f"one {i}") for i in range(5)]
    await send_turns(kafka_bootstrap, batch1)
    await _wait_for(lambda: read_history(history_dir, scope).num_rows >= 5)
    first.kill()  # no clean stop: offsets of the last window may not be committed
    start_worker(stream_env, ("history",))
    batch2 = [turn(scope, f"two {i}") for i in range(5)]
    await send_turns(kafka_bootstrap, batch2)
    await _wait_for(lambda: read_history(history_dir, scope).num_rows >= 10)
    files = list(history_dir.rglob("*.parquet"))
    import pyarrow.dataset as ds

    table = ds.dataset([str(f) for f in files], format="parquet").to_table()
    rows = [r for r in table.to_pylist() if r["scope_id"] == scope]
    assert sorted(r["event_id"] for r in rows) == sorted(t.event_id for t in batch1 + batch2)


async def test_a_retracted_event_stays_out_of_the_history_after_a_replay(
    kafka_bootstrap, mlflow_uri, stream_env, start_worker, tmp_path
):
    import pyarrow.parquet as pq

    from consolidation.retraction_record import record_retraction

    scope = unique("scope")
    history_dir = tmp_path / "somna" / "history"
    first = start_worker(stream_env, ("history",))
    turns = [turn(scope, f"{scope} private fact {i}") for i in range(4)]
    ids = lambda: read_history(history_dir, scope)["event_id"].to_pylist()  # noqa: E731
    await send_turns(kafka_bootstrap, turns[:3])
    await _wait_for(lambda: len(ids()) >= 3)
    # `somna memory retract`: recorded in the registry, then announced on somna.retractions
    # (its purge of the Parquet files is left to the history role here).
    gone = turns[1]
    record_retraction(mlflow_uri, scope, gone.event_id)
    retraction = Retraction(scope_id=scope, event_id=gone.event_id, ts=0.0)
    await produce(kafka_bootstrap, RETRACTIONS, [(scope.encode(), retraction.to_bytes())])
    await _wait_for(lambda: gone.event_id not in ids())
    first.stop()
    # A new group: the restarted history role replays the whole topic from the start.
    start_worker({**stream_env, "SOMNA_STREAM_GROUP": unique("g")}, ("history",))
    await send_turns(kafka_bootstrap, turns[3:])
    await _wait_for(lambda: turns[3].event_id in ids())
    texts = []
    for path in history_dir.rglob("*.parquet"):
        texts += [t for t in pq.read_table(path)["text"].to_pylist() if scope in t]
        assert gone.text.encode() not in path.read_bytes()
    assert sorted(texts) == sorted(t.text for t in turns if t is not gone)


async def _keyed_records(bootstrap: str, topic: str, key: bytes, n: int) -> None:
    """Until ``topic`` (made by a worker, maybe not yet) holds ``n`` records keyed ``key``."""
    import time

    from aiokafka import AIOKafkaConsumer, TopicPartition

    deadline = time.monotonic() + 180
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        while topic not in await consumer.topics():
            assert time.monotonic() < deadline, f"{topic} never appeared"
            await asyncio.sleep(0.5)
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        seen = 0
        while seen < n:
            assert time.monotonic() < deadline, f"{seen} of {n} records keyed {key!r} in {topic}"
            batches = await consumer.getmany(timeout_ms=500)
            seen += sum(r.key == key for records in batches.values() for r in records)
    finally:
        await consumer.stop()


async def _wait_for(cond, timeout: float = 120.0) -> None:
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.5)


async def _group_members(bootstrap: str, group: str) -> int:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import GroupCoordinatorNotAvailableError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group])
        return len(described[0].groups[0][5]) if described and described[0].groups else 0
    except GroupCoordinatorNotAvailableError:
        return 0  # a fresh broker has no offsets topic (no coordinator) until a group joins
    finally:
        await admin.close()


async def test_workers_split_partitions_and_lose_nothing_when_one_joins_or_leaves(
    kafka_bootstrap, stream_env, start_worker
):
    import asyncio

    group = agent_group_id(stream_env["SOMNA_STREAM_GROUP"])  # the agent's own group
    scopes = [unique(f"s{i}") for i in range(12)]  # spread over the 4 partitions
    sent: list = []

    async def phase(n: int) -> None:
        turns = [turn(scopes[i % len(scopes)], f"turn {len(sent) + i}") for i in range(n)]
        await send_turns(kafka_bootstrap, turns)
        sent.extend(turns)

    async def wait_members(n: int) -> None:
        for _ in range(240):
            if await _group_members(kafka_bootstrap, group) == n:
                return
            await asyncio.sleep(0.5)
        raise AssertionError(f"group never had {n} members")

    async with TopicReader(kafka_bootstrap, REPLIES) as replies:
        w1 = start_worker(stream_env, ("agent",))
        start_worker(stream_env, ("agent",))
        await wait_members(2)
        await phase(24)
        start_worker(stream_env, ("agent",))  # a third joins: rebalance while traffic flows
        await phase(24)
        await wait_members(3)
        await phase(24)
        w1.stop()  # one leaves cleanly
        await phase(24)
        await wait_members(2)
        await phase(24)
        wanted = {t.event_id for t in sent}
        ours = {s.encode() for s in scopes}
        got = await replies.collect(
            lambda rs: wanted <= {Reply.model_validate_json(r.value).event_id for r in rs},
            keep=lambda r: r.key in ours,
            timeout=180,
        )
    answered = [Reply.model_validate_json(r.value) for r in got]
    assert {r.event_id for r in answered} == wanted
    # Redeliveries (at least once) repeat the same reply_id, never a new one.
    assert all(r.reply_id == reply_id_for(r.event_id) for r in answered)


async def test_the_consolidation_table_survives_a_restart(
    kafka_bootstrap, stream_env, start_worker
):
    scope = unique("scope")
    stream_env.update(SOMNA_CHUNK_TOKENS="40", SOMNA_IDLE_SECONDS="600")
    mine = lambda r: r.key == scope.encode()  # noqa: E731
    turns = [turn(scope, f"fact number {i}.", role="system") for i in range(3)]  # 17 tokens each
    async with (
        TopicReader(kafka_bootstrap, SLEEP_JOBS) as jobs,
        TopicReader(kafka_bootstrap, INTERACTIONS) as sent,
    ):
        first = start_worker(stream_env, ("consolidator",))
        await send_turns(kafka_bootstrap, turns[:2])  # 34 tokens: not a full chunk yet
        offsets = [r.offset for r in await sent.collect(lambda rs: len(rs) >= 2, keep=mine)]
        # Stopped once the table's changelog holds both turns (the worker may first work
        # through what other tests left on the topic: a fixed sleep was too short on a
        # loaded machine).
        changelog = f"{stream_env['SOMNA_STREAM_GROUP']}-{TABLE_NAME}-changelog"
        # The table's changelog keys are JSON strings.
        await _keyed_records(kafka_bootstrap, changelog, json.dumps(scope).encode(), 2)
        await asyncio.sleep(1)  # and has committed the offsets of those turns
        assert first.stop() == 0
        second = start_worker(stream_env, ("consolidator",))  # recovers the table
        await send_turns(kafka_bootstrap, turns[2:])
        offsets += [r.offset for r in await sent.collect(lambda rs: len(rs) >= 1, keep=mine)]
        got = await jobs.collect(lambda rs: len(rs) >= 1, keep=mine)
    job = SleepJob.model_validate_json(got[0].value)
    assert (job.from_watermark, job.to_watermark) == (offsets[0], offsets[2])
    assert "Restore complete" in second.log() and "Error in recovery" not in second.log()


def _thread_nices(pid: int) -> set[int]:
    """The nice values of a process's threads (Linux keeps one per thread)."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            out.add(os.getpriority(os.PRIO_PROCESS, int(task.name)))
    return out
