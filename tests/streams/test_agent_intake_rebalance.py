"""The agent's intake across a rebalance that happens inside one ``getmany`` call.

aiokafka's ``getmany`` waits out a reassignment and then returns records of the new
assignment, with its positions already past them. An earlier intake dropped every batch
fetched by a call that began before a revoke, and the next commit skipped those turns: a
worker joining or leaving lost a few (tests/streams/test_pipeline.py caught it about one
run in six). The real broker cannot be made to hit that window on demand, so this test
drives the intake with a consumer that rebalances inside ``getmany``.
"""

from __future__ import annotations

import asyncio

from aiokafka import ConsumerRecord, TopicPartition

from infra.settings import Settings
from infra.topics import INTERACTIONS
from streams.agent_consumer import AgentConsumer, Batch


def _record(tp: TopicPartition, offset: int) -> ConsumerRecord:
    return ConsumerRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=b"v",
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=1,
        headers=(),
    )


class RebalancingConsumer:
    """Owns partitions 0 and 1; its first getmany revokes both, hands back 1 and 2 and
    returns records of 1 and 2 fetched under the new assignment."""

    def __init__(self, intake: AgentConsumer) -> None:
        self.intake = intake
        self.owned = {TopicPartition(INTERACTIONS, 0), TopicPartition(INTERACTIONS, 1)}
        self.commits: list[dict[TopicPartition, int]] = []
        self.calls = 0

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)

    async def getmany(self, timeout_ms: int, max_records: int) -> dict:
        self.calls += 1
        if self.calls > 1:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        await self.intake._revoked(set(self.owned))
        self.owned = {TopicPartition(INTERACTIONS, 1), TopicPartition(INTERACTIONS, 2)}
        await self.intake._assigned(set(self.owned))
        return {tp: [_record(tp, 5), _record(tp, 6)] for tp in sorted(self.owned)}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)


class Recorder:
    def __init__(self) -> None:
        self.answered: list[tuple[int, int]] = []
        self.partitions: set[int] = set()

    async def handle(self, batch: Batch) -> None:
        self.answered += [(r.partition, r.offset) for r in batch.get(INTERACTIONS, [])]

    async def assigned(self, partitions: set[int]) -> None:
        self.partitions = partitions


async def test_records_returned_after_a_rebalance_inside_getmany_are_answered_and_committed():
    intake = AgentConsumer(Settings(), "g-agent")
    recorder = Recorder()
    intake.handler = recorder
    fake = RebalancingConsumer(intake)
    intake.consumer = fake  # type: ignore[assignment]
    task = asyncio.create_task(intake._run())
    while fake.calls < 2:
        await asyncio.sleep(0.01)
    intake._stopping = True
    await task
    await intake._commit()  # as stop() does

    assert recorder.partitions == {1, 2}
    assert sorted(recorder.answered) == [(1, 5), (1, 6), (2, 5), (2, 6)]
    assert fake.commits[-1] == {
        TopicPartition(INTERACTIONS, 1): 7,
        TopicPartition(INTERACTIONS, 2): 7,
    }
