"""The skipped-offsets check (streams/gaps.py): where a group resumes, which offsets a
role never saw, and reading exactly those back from the topic."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.gaps import OffsetGuard, resume_offsets
from streams.partition_reader import PartitionReader

from .conftest import produce, unique


def test_the_guard_reports_the_offsets_a_role_never_saw():
    guard = OffsetGuard("t")
    guard.reset({0: 5})
    assert guard.skipped(0, 5) is None  # where the group resumed: nothing skipped
    assert guard.skipped(0, 8) == (6, 8)  # 6 and 7 never came
    assert guard.skipped(0, 3) is None  # a redelivery is not a gap
    assert guard.expected(0) == 9  # and does not move the expectation back
    assert guard.skipped(0, 9) is None
    # A partition without a known resume point is checked from its first record on.
    assert guard.skipped(1, 40) is None
    assert guard.skipped(1, 42) == (41, 42)
    guard.reset({1: 0})  # a new assignment forgets the partitions no longer owned
    assert guard.expected(0) is None and guard.expected(1) == 0


@pytest.mark.kafka
async def test_resume_offsets_and_the_read_back_of_a_skipped_range(kafka_bootstrap):
    topic, group = unique("gaps"), unique("group")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    await produce(kafka_bootstrap, topic, [(b"k", f"v{i}".encode()) for i in range(6)])
    # Every record went to one partition (one key); the group committed 3 there.
    probe = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None)
    await probe.start()
    try:
        ends = await probe.end_offsets([TopicPartition(topic, p) for p in (0, 1)])
    finally:
        await probe.stop()
    used = next(tp.partition for tp, end in ends.items() if end == 6)
    committer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await committer.start()
    try:
        committer.assign([TopicPartition(topic, used)])
        await committer.commit({TopicPartition(topic, used): 3})
    finally:
        await committer.stop()

    # The other partition has no commit: the group starts it at the log start.
    tps = [TopicPartition(topic, p) for p in (used, 1 - used)]
    assert await resume_offsets(kafka_bootstrap, group, tps) == {tps[0]: 3, tps[1]: 0}

    reader = PartitionReader(kafka_bootstrap)
    try:
        records = await reader.records(topic, used, 3, 5)
        assert [r.offset for r in await reader.records(topic, used, 4, None)] == [4, 5]
    finally:
        await reader.close()
    assert [(r.offset, r.value) for r in records] == [(3, b"v3"), (4, b"v4")]
