"""The inference agent with a real (tiny) model, MLflow registry and broker.

A turn in gives a reply out carrying both versions; fast weights published by a real
sleep batch are verified and swapped in; a forged event pointing at another scope's
artifact is refused and the previous version keeps serving.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from consolidation.base_model import base_model_version, ensure_base_model, register_base_model
from consolidation.batch import SleepTask, run_batch
from consolidation.fast_weights import Lineage
from infra.topics import FAST_WEIGHTS, REPLIES
from model import HybridConfig, HybridLM
from model.tokenizer import render_turn
from streams.records import Reply, reply_id_for

from .conftest import TopicReader, produce, send_turns, turn, unique

pytestmark = [pytest.mark.kafka, pytest.mark.mlflow, pytest.mark.slow]

TINY = HybridConfig(
    d_model=32, n_layers=2, pattern="GA", n_heads=2, head_dim=16, window=64, chunk=64
)


@pytest.fixture
def base_model(mlflow_uri, tmp_path):
    """The registry's production model; a tiny random one is registered if there is none."""
    if base_model_version(mlflow_uri) is None:
        torch.manual_seed(0)
        HybridLM(TINY).save(tmp_path / "tiny")
        register_base_model(mlflow_uri, tmp_path / "tiny")
    return ensure_base_model(mlflow_uri)


def _sleep(mlflow_uri, base, scope, texts, to_watermark, job):
    lin = Lineage(
        scope_id=scope,
        job_id=job,
        parent_version=None,
        base_model_version=base.version,
        from_watermark=0,
        to_watermark=to_watermark,
        passes=2,
        tokens=sum(len(render_turn("system", t)) for t in texts),
    )
    chunk = [tok for t in texts for tok in render_turn("system", t)]
    published, _ = run_batch(mlflow_uri, base, [SleepTask(lin, [chunk])], passes=2, device="cpu")
    return published[0]


async def _ask_until(bootstrap, replies, scope, accept, tries=60):
    """Ask (a user turn) until a reply satisfies ``accept``; returns that reply."""
    for _ in range(tries):
        q = turn(scope, "who?")
        await send_turns(bootstrap, [q])
        got = await replies.collect(
            lambda rs, q=q: any(
                Reply.model_validate_json(r.value).event_id == q.event_id for r in rs
            ),
            keep=lambda r: r.key == scope.encode(),
        )
        reply = [Reply.model_validate_json(r.value) for r in got][-1]
        if accept(reply):
            return reply
        await asyncio.sleep(1.0)
    raise AssertionError("no reply satisfied the condition")


async def test_agent_answers_and_swaps_verified_fast_weights(
    kafka_bootstrap, mlflow_uri, base_model, stream_env, start_worker
):
    scope, other = unique("scope"), unique("other")
    stream_env.update(SOMNA_STREAM_ENGINE="model", SOMNA_MLFLOW_URI=mlflow_uri)
    worker = start_worker(stream_env, ("agent",))
    facts = ["kim reports to bob.", "bob reports to tav."]
    async with (
        TopicReader(kafka_bootstrap, REPLIES) as replies,
        TopicReader(kafka_bootstrap, "somna.interactions") as sent,
    ):
        said = [turn(scope, f, role="system") for f in facts]
        await send_turns(kafka_bootstrap, said)
        offsets = [
            r.offset
            for r in await sent.collect(
                lambda rs: len(rs) >= 2, keep=lambda r: r.key == scope.encode()
            )
        ]
        first = await _ask_until(kafka_bootstrap, replies, scope, lambda r: True)
        assert first.base_model_version == base_model.version
        assert first.fast_weights_version is None and first.reply_id == reply_id_for(first.event_id)

        # A real sleep batch consolidates the two facts; the agent swaps them in.
        pub = _sleep(mlflow_uri, base_model, scope, facts, offsets[-1], unique("job"))
        await produce(kafka_bootstrap, FAST_WEIGHTS, [(scope.encode(), pub.to_bytes())])
        swapped = await _ask_until(
            kafka_bootstrap, replies, scope, lambda r: r.fast_weights_version == pub.version
        )
        assert swapped.scope_id == scope

        # Another scope's artifact, announced as ours: refused; ours keeps serving.
        theirs = _sleep(mlflow_uri, base_model, other, ["x reports to y."], 0, unique("job"))
        forged = theirs.model_copy(
            update={"scope_id": scope, "watermark": offsets[-1] + 100, "version": "999"}
        )
        await produce(kafka_bootstrap, FAST_WEIGHTS, [(scope.encode(), forged.to_bytes())])
        for _ in range(120):
            if "refused fast weights" in worker.log():
                break
            await asyncio.sleep(0.5)
        assert "refused fast weights" in worker.log()
        after = await _ask_until(kafka_bootstrap, replies, scope, lambda r: True)
        assert after.fast_weights_version == pub.version
