"""Rebuilding a scope's memory from the topic: its events after the watermark, in order,
before the turn being answered, without the events of other scopes or retracted ones."""

from __future__ import annotations

import pytest

from infra.settings import Settings
from infra.topics import RETRACTIONS
from streams.loader import ScopeLoader
from streams.records import Retraction

from .conftest import TopicReader, produce, send_turns, turn, unique

pytestmark = [pytest.mark.kafka]


async def test_loader_reads_back_the_scope_events_without_retracted_ones(kafka_bootstrap, tmp_path):
    scope, other = unique("scope"), unique("other")
    mine = [turn(scope, f"fact {i}.", role="system") for i in range(4)]
    async with TopicReader(kafka_bootstrap, "somna.interactions") as sent:
        await send_turns(kafka_bootstrap, [mine[0], turn(other, "x"), *mine[1:]])
        records = await sent.collect(lambda rs: len(rs) >= 5)
    offsets = {r.key.decode(): [] for r in records}
    for r in records:
        offsets[r.key.decode()].append(r.offset)
    retraction = Retraction(scope_id=scope, event_id=mine[1].event_id, ts=0.0)
    await produce(kafka_bootstrap, RETRACTIONS, [(scope.encode(), retraction.to_bytes())])

    partition = next(r.partition for r in records if r.key == scope.encode())
    loader = ScopeLoader(Settings(kafka_bootstrap=kafka_bootstrap, data_dir=tmp_path))
    try:
        # Up to (not including) the last event: the turn being answered.
        snap = (await loader.load(partition, {scope: offsets[scope][-1]}, with_weights=False))[
            scope
        ]
    finally:
        await loader.close()
    assert [e.event_id for _, e in snap.events] == [mine[0].event_id, mine[2].event_id]
    assert [o for o, _ in snap.events] == [offsets[scope][0], offsets[scope][2]]
    assert snap.partition == partition and snap.weights is None


@pytest.mark.mlflow
async def test_loader_skips_an_event_the_registry_retracted_before_it_is_announced(
    kafka_bootstrap, mlflow_uri, tmp_path
):
    from consolidation.retraction_record import record_retraction

    scope = unique("scope")
    mine = [turn(scope, f"fact {i}.", role="system") for i in range(3)]
    async with TopicReader(kafka_bootstrap, "somna.interactions") as sent:
        await send_turns(kafka_bootstrap, mine)
        records = await sent.collect(lambda rs: sum(r.key == scope.encode() for r in rs) >= 3)
    records = [r for r in records if r.key == scope.encode()]
    record_retraction(mlflow_uri, scope, mine[1].event_id)  # nothing on somna.retractions yet
    settings = Settings(kafka_bootstrap=kafka_bootstrap, mlflow_uri=mlflow_uri, data_dir=tmp_path)
    loader = ScopeLoader(settings)
    try:
        snap = (await loader.load(records[0].partition, {scope: records[-1].offset + 1}))[scope]
    finally:
        await loader.close()
    assert [e.event_id for _, e in snap.events] == [mine[0].event_id, mine[2].event_id]
    assert snap.weights is None  # never consolidated
