"""Pre-waking (consolidation/prewake.py): the sleep worker wakes what a new version leaves
pending; the agent resumes from it only when it holds exactly those events."""

from __future__ import annotations

import pytest
import torch

from consolidation import blobs, fast_weights_load, prewake
from consolidation.fast_weights import FastWeights
from infra.settings import Settings
from model import HybridConfig, HybridLM
from model.tokenizer import render_turn
from streams import metrics
from streams.engine import Turn
from streams.memory import ModelEngine
from streams.records import FastWeightsPublished, Interaction
from tests.consolidation.conftest import scope_id
from tests.consolidation.kafka_helpers import send_job, send_turns
from tests.consolidation.test_sleep_worker import TURNS, _job, _run_worker_until

CFG = HybridConfig(
    d_model=32, n_layers=2, pattern="GA", n_heads=2, head_dim=16, window=32, chunk=32
)
SHA = "ab" * 32


@pytest.fixture
def lm() -> HybridLM:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return HybridLM(CFG).eval()


def _turn(i: int, role: str = "system", text: str | None = None) -> Turn:
    event = Interaction(event_id=f"e{i}", scope_id="u1", session_id="s", role=role,
                        text=text or f"fact number {i}.", ts=0.0)  # fmt: skip
    return Turn(event, 0, i, None)


def _events(turns: list[Turn]) -> list[tuple[int, list[int]]]:
    return [(t.offset, render_turn(t.event.role, t.event.text)) for t in turns]


def _version(lm: HybridLM, engine: ModelEngine, upto: int) -> tuple:
    state = engine.memory("u1").state
    slept = lm.sleep([state.pending_tokens(upto)], state, passes=2)
    published = FastWeightsPublished(scope_id="u1", version="1", artifact_uri="mlflow-artifacts:/x",
                                     sha256=SHA, watermark=upto, base_model_version="7",
                                     job_id="j")  # fmt: skip
    weights = FastWeights(scope_id="u1", version="1", tensors=slept.fast_weights(),
                          metadata={"config_hash": lm.config.config_hash()}, watermark=upto,
                          base_model_version="7")  # fmt: skip
    return published, weights


def _rewoken(prewoken: str) -> float:
    return metrics.SWAP_REWAKES.labels(prewoken=prewoken)._value.get()


def _assert_same_state(a, b) -> None:
    assert a.pos == b.pos and a.watermarks == b.watermarks
    assert [(e.offset, e.tokens) for e in a.pending_events] == [
        (e.offset, e.tokens) for e in b.pending_events
    ]
    for x, y in zip(a.S, b.S, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    for x, y in zip(a.kv, b.kv, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x[0], y[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(x[1], y[1], atol=1e-5, rtol=1e-4)


def test_a_prewoken_state_is_read_back_as_written(lm, tmp_path):
    fw = lm.init_state(1).fast_weights()
    turns = [_turn(i) for i in range(3, 7)]
    (state,) = prewake.wake_tails(lm, [(_published(2), fw, _events(turns))])
    prewake.write(tmp_path, SHA, prewake.Prewoken(state, woken_to=9))
    back = prewake.read(tmp_path, SHA)
    assert back is not None and back.woken_to == 9
    _assert_same_state(back.state, state)
    assert back.state.config_hash == state.config_hash and back.state.gdn_layers == [0]
    # A damaged file is no state (the agent then re-wakes by itself).
    prewake.path_for(tmp_path, SHA).write_bytes(b"\0" * 64)
    assert prewake.read(tmp_path, SHA) is None
    assert prewake.read(tmp_path, "cd" * 32) is None


def _published(watermark: int) -> FastWeightsPublished:
    return FastWeightsPublished(scope_id="u1", version="1", artifact_uri="mlflow-artifacts:/x",
                                sha256=SHA, watermark=watermark, base_model_version="7",
                                job_id="j")  # fmt: skip


def _engines_with_a_version(lm: HybridLM, turns: list[Turn], upto: int, woken_to: int) -> tuple:
    """Two engines that heard ``turns``, and a version up to offset ``upto``: the plain
    weights, and the same with the events up to ``woken_to`` pre-woken (the sleep worker
    read the topic that far)."""
    full, resumed = (ModelEngine(lm, base_model_version="7") for _ in range(2))
    for engine in (full, resumed):
        engine.answer(turns)
    published, weights = _version(lm, full, upto=upto)
    woken = [t for t in turns if upto < t.offset <= woken_to]
    (state,) = prewake.wake_tails(lm, [(published, weights.tensors, _events(woken))])
    prewoken = prewake.Prewoken(state, woken_to=woken_to)
    pre = FastWeights(**{**weights.__dict__, "prewoken": prewoken})
    return full, resumed, published, weights, pre


def test_a_swap_resumes_from_the_prewoken_state_and_wakes_only_what_came_after(lm):
    turns = [_turn(i) for i in range(8)]
    # The sleep worker read the topic up to offset 5: events 3-5 are pre-woken.
    full, resumed, published, weights, pre = _engines_with_a_version(lm, turns, 2, 5)
    yes, no = _rewoken("yes"), _rewoken("no")
    assert full.swap(published, weights) == "swapped"
    assert resumed.swap(published, pre) == "swapped"
    a, b = full.memory("u1").state, resumed.memory("u1").state
    _assert_same_state(b, a)
    assert [e.offset for e in b.pending_events] == [3, 4, 5, 6, 7]
    tail = sum(len(ids) for _, ids in _events(turns[6:]))
    assert _rewoken("yes") - yes == tail  # only events 6 and 7 were woken again
    assert _rewoken("no") - no == a.pos  # the full swap re-woke all of 3-7
    ask = [_turn(8, role="user", text="who is it?")]
    assert [r.text for r in resumed.answer(ask)] == [r.text for r in full.answer(ask)]


def test_the_question_that_applies_a_swap_is_woken_in_the_same_pass(lm, monkeypatch):
    turns = [_turn(i) for i in range(8)]
    full, resumed, published, weights, pre = _engines_with_a_version(lm, turns, 2, 5)
    full.swap(published, weights)  # staged: applied by the next answer call
    resumed.swap(published, pre)
    batch = [_turn(8, role="user", text="who is it?"), _turn(9), _turn(10, role="user")]
    expected = [r.text for r in full.answer(batch)]
    passes = []
    wake_batch = lm.wake_batch
    monkeypatch.setattr(lm, "wake_batch", lambda *a: passes.append(1) or wake_batch(*a))
    yes = _rewoken("yes")
    assert [r.text for r in resumed.answer(batch)] == expected
    # Events 6-7 and the question in one pass; turns 9 and 10 in a round each.
    assert len(passes) == 3
    assert _rewoken("yes") - yes == sum(len(ids) for _, ids in _events(turns[6:]))
    _assert_same_state(resumed.memory("u1").state, full.memory("u1").state)
    assert resumed.memory("u1").offsets == full.memory("u1").offsets
    assert resumed.memory("u1").last_offset == 10


def test_a_question_that_a_sleep_folded_in_already_is_not_woken_again(lm):
    turns = [*(_turn(i) for i in range(8)), _turn(8, role="user", text="who is it?")]
    # A version up to the question itself (redelivered after it was consolidated).
    full, resumed, published, weights, pre = _engines_with_a_version(lm, turns, 8, 8)
    full.swap(published, weights)
    resumed.swap(published, pre)
    again = [_turn(8, role="user", text="who is it?")]
    assert [r.text for r in resumed.answer(again)] == [r.text for r in full.answer(again)]
    assert resumed.memory("u1").state.pending_events == []


@pytest.mark.parametrize("case", ["unseen event", "other text", "other weights"])
def test_a_prewoken_state_that_differs_from_the_memory_is_not_used(lm, case):
    turns = [_turn(i) for i in range(6)]
    full, checked = (ModelEngine(lm, base_model_version="7") for _ in range(2))
    for engine in (full, checked):
        engine.answer(turns)
    published, weights = _version(lm, full, upto=2)
    woken, tensors = turns[3:], weights.tensors
    if case == "unseen event":  # the sleep worker read an event the agent has not seen yet
        woken = [*woken, _turn(6)]
    elif case == "other text":  # e.g. a retracted event, replaced at the same offset
        woken = [woken[0], _turn(4, text="something else."), woken[2]]
    else:
        tensors = {k: v + 1.0 for k, v in tensors.items()}
    (state,) = prewake.wake_tails(lm, [(published, tensors, _events(woken))])
    pre = FastWeights(**{**weights.__dict__, "prewoken": prewake.Prewoken(state, woken_to=6)})
    yes = _rewoken("yes")
    full.swap(published, weights)
    checked.swap(published, pre)
    _assert_same_state(checked.memory("u1").state, full.memory("u1").state)
    assert _rewoken("yes") == yes


@pytest.mark.kafka
@pytest.mark.mlflow
async def test_the_sleep_worker_prewakes_what_its_version_leaves_pending(
    settings: Settings, base_model
) -> None:
    scope = scope_id("prewake")
    sent = await send_turns(settings.bootstrap, scope, TURNS)
    job = _job(scope, sent[:2])  # two turns slept, two left pending after the watermark

    async def publish(watcher):
        await send_job(settings.bootstrap, job)
        return await watcher.wait(scope)

    pub = await _run_worker_until(settings, {scope}, publish)
    pre = prewake.read(blobs.root(settings.data_dir), pub.sha256)
    assert pre is not None and pre.woken_to >= sent[-1][1]
    events = [
        (offset, render_turn("user", text))
        for (_, offset, _), text in zip(sent, TURNS, strict=True)
    ]
    assert [(e.offset, list(e.tokens)) for e in pre.state.pending_events] == events[2:]
    fw = fast_weights_load.load_fast_weights(settings.tracking_uri, pub, scope)
    (expected,) = base_model.lm.rebuild_states([(fw.tensors, pub.watermark, events[2:])])
    _assert_same_state(pre.state, expected)


def test_bench_prewake_answers_the_same_from_prewoken_states(tmp_path):
    from benchmarks import prewake as bench

    result = bench.run(quick=True, json_path=tmp_path / "prewake.json")
    assert [r["scopes"] for r in result["rows"]] == [1, 10]
    assert all(r["same_replies"] for r in result["rows"])
    assert (tmp_path / "prewake.json").is_file()
