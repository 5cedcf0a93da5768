"""The embedded broker as a client sees it: groups, idempotence, transactions, restarts."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from infra.errors import SetupError
from infra.kafka import EmbeddedKafka, broker_answers
from infra.ports import free_ports

pytestmark = pytest.mark.kafka


async def new_topic(bootstrap: str, partitions: int = 2) -> str:
    """A topic of this test alone (the broker does not create topics on first use)."""
    name = f"test.infra-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def consume_all(
    bootstrap: str,
    topic: str,
    expected: int,
    *,
    isolation_level: str = "read_uncommitted",
    patience_polls: int = 20,
) -> list[tuple[bytes | None, bytes]]:
    """Read a topic from the start through a fresh consumer group: ``expected`` messages
    and one quiet poll after them (to catch extras), or whatever came before the topic
    stayed quiet for ``patience_polls`` seconds."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    got: list[tuple[bytes | None, bytes]] = []
    quiet = 0
    try:
        while quiet < patience_polls and not (len(got) >= expected and quiet >= 1):
            batch = await consumer.getmany(timeout_ms=1000)
            records = [r for rs in batch.values() for r in rs]
            got += [(r.key, r.value) for r in records]
            quiet = 0 if records else quiet + 1
        await consumer.commit()
    finally:
        await consumer.stop()
    return got


async def test_produce_and_consume_through_a_group(kafka_bootstrap: str) -> None:
    topic = await new_topic(kafka_bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(20):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=f"scope-{i % 3}".encode())
    finally:
        await producer.stop()
    got = await consume_all(kafka_bootstrap, topic, 20)
    assert sorted(v for _, v in got) == sorted(f"v{i}".encode() for i in range(20))
    # Keyed messages keep their order within a key (one partition per key).
    for key in (b"scope-0", b"scope-1", b"scope-2"):
        values = [int(v[1:]) for k, v in got if k == key]
        assert values == sorted(values)


async def test_idempotent_producer(kafka_bootstrap: str) -> None:
    topic = await new_topic(kafka_bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        batch = [await producer.send(topic, f"m{i}".encode(), key=b"k") for i in range(50)]
        offsets = [(await f).offset for f in batch]
    finally:
        await producer.stop()
    assert offsets == sorted(offsets) and len(set(offsets)) == 50
    got = await consume_all(kafka_bootstrap, topic, 50)
    assert [v for _, v in got] == [f"m{i}".encode() for i in range(50)]


async def test_read_committed_sees_committed_not_aborted(kafka_bootstrap: str) -> None:
    topic = await new_topic(kafka_bootstrap)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex}"
    )
    await producer.start()
    try:
        async with producer.transaction():
            for i in range(3):
                await producer.send(topic, f"committed-{i}".encode(), key=b"k")
        await producer.begin_transaction()
        for i in range(3):
            await producer.send(topic, f"aborted-{i}".encode(), key=b"k")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topic, b"committed-last", key=b"k")
    finally:
        await producer.stop()

    committed = await consume_all(kafka_bootstrap, topic, 4, isolation_level="read_committed")
    assert [v for _, v in committed] == [
        b"committed-0",
        b"committed-1",
        b"committed-2",
        b"committed-last",
    ]
    everything = await consume_all(kafka_bootstrap, topic, 7)
    assert {v for _, v in everything} >= {b"aborted-0", b"aborted-1", b"aborted-2"}


async def produce_numbers(bootstrap: str, topic: str, start: int, stop: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for i in range(start, stop):
            await producer.send(topic, f"{i}".encode(), key=f"s{i % 7}".encode())
        await producer.flush()
    finally:
        await producer.stop()


@pytest.mark.slow
async def test_restart_on_the_same_data_dir_keeps_every_message(tmp_path: Path) -> None:
    kafka = EmbeddedKafka(tmp_path, *free_ports(2))
    kafka.start(timeout=240)
    try:
        topic = await new_topic(kafka.bootstrap, partitions=3)
        await produce_numbers(kafka.bootstrap, topic, 0, 300)
        cluster_id = kafka.cluster_id
        with pytest.raises(SetupError, match="already runs on"):  # one broker per data dir
            EmbeddedKafka(tmp_path, *free_ports(2)).start()
    finally:
        kafka.stop()
    assert not broker_answers(kafka.bootstrap)

    # Same data dir, new ports: the cluster and its messages are back.
    again = EmbeddedKafka(tmp_path, *free_ports(2))
    again.start(timeout=240)
    try:
        assert again.cluster_id == cluster_id
        got = await consume_all(again.bootstrap, topic, 300)
    finally:
        again.stop()
    assert sorted(int(v) for _, v in got) == list(range(300))


@pytest.mark.slow
async def test_a_killed_broker_loses_no_acknowledged_message(fresh_kafka: EmbeddedKafka) -> None:
    topic = await new_topic(fresh_kafka.bootstrap, partitions=3)
    await produce_numbers(fresh_kafka.bootstrap, topic, 0, 200)
    fresh_kafka.kill()
    fresh_kafka.start(timeout=240)
    await produce_numbers(fresh_kafka.bootstrap, topic, 200, 250)
    got = await consume_all(fresh_kafka.bootstrap, topic, 250)
    assert sorted(int(v) for _, v in got) == list(range(250))
