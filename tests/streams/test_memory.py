"""The agent's model engine on a tiny random model: remember, answer, swap, retract, reload."""

from __future__ import annotations

import pytest
import torch

from consolidation.fast_weights import FastWeights
from model import HybridConfig, HybridLM
from model.tokenizer import ASSISTANT, render_turn
from streams.engine import ScopeSnapshot, Turn
from streams.memory import ModelEngine
from streams.records import FastWeightsPublished, Interaction, Retraction, reply_id_for

CFG = HybridConfig(
    d_model=32, n_layers=2, pattern="GA", n_heads=2, head_dim=16, window=32, chunk=32
)


@pytest.fixture
def lm() -> HybridLM:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return HybridLM(CFG).eval()


def _turn(i: int, role: str = "system", scope: str = "u1") -> Turn:
    event = Interaction(
        event_id=f"e{i}", scope_id=scope, session_id="s", role=role, text=f"fact {i}.", ts=0.0
    )
    return Turn(event, 0, i, None)


def _weights(lm: HybridLM, engine: ModelEngine, upto: int, version: str = "1") -> tuple:
    state = engine.memory("u1").state
    slept = lm.sleep([state.pending_tokens(upto)], state, passes=2)
    published = FastWeightsPublished(
        scope_id="u1",
        version=version,
        artifact_uri="mlflow-artifacts:/x",
        sha256="0" * 64,
        watermark=upto,
        base_model_version="7",
        job_id="j",
    )
    weights = FastWeights(
        scope_id="u1",
        version=version,
        tensors=slept.fast_weights(),
        metadata={"config_hash": CFG.config_hash()},
        watermark=upto,
        base_model_version="7",
    )
    return published, weights


def _two_versions(lm: HybridLM, engine: ModelEngine) -> tuple[tuple, tuple]:
    """Five turns remembered, then versions "1" (up to offset 1) and "2" (up to 3) of them."""
    engine.answer([_turn(i) for i in range(5)])
    return _weights(lm, engine, upto=1), _weights(lm, engine, upto=3, version="2")


def test_turns_are_remembered_and_user_turns_answered(lm):
    engine = ModelEngine(lm, base_model_version="7", max_new_tokens=4)
    replies = engine.answer([_turn(0), _turn(1), _turn(2, role="user")])
    assert [r.reply_id for r in replies] == [reply_id_for("e2")]
    assert replies[0].base_model_version == "7" and replies[0].fast_weights_version is None
    pending = engine.memory("u1").state.pending_events
    assert [e.offset for e in pending] == [0, 1, 2]
    # A redelivery does not remember twice, and answers with the same reply_id.
    again = engine.answer([_turn(2, role="user")])
    assert again[0].reply_id == replies[0].reply_id
    assert len(engine.memory("u1").state.pending_events) == 3


def test_swap_drops_only_what_the_weights_cover_and_stale_ones_are_refused(lm):
    engine = ModelEngine(lm, base_model_version="7")
    engine.answer([_turn(i) for i in range(5)])
    published, weights = _weights(lm, engine, upto=2)
    assert engine.swap(published, weights) == "swapped"
    mem = engine.memory("u1")
    assert [e.offset for e in mem.state.pending_events] == [3, 4]  # no gap (invariant 1)
    assert mem.fast_weights_version == "1" and mem.state.watermark == 2
    assert engine.swap(published, weights) == "stale"  # the same version again
    older = published.model_copy(update={"version": "0", "watermark": 1})
    # A late publish, or a rollback: the agent asks the registry which (streams/swaps.py).
    assert engine.swap(older, weights) == "older"
    other = FastWeights(**{**weights.__dict__, "base_model_version": "8"})
    assert (
        engine.swap(published.model_copy(update={"version": "2", "watermark": 3}), other)
        == "refused"
    )
    assert engine.memory("u1").fast_weights_version == "1"


def test_a_rollback_reloads_the_scope_from_the_older_version_without_a_gap(lm):
    engine = ModelEngine(lm, base_model_version="7")
    (v1, w1), (v2, w2) = _two_versions(lm, engine)
    assert engine.swap(v2, w2) == "swapped"
    assert engine.swap(v1, w1) == "older"  # the registry says v1 is live: the agent reloads
    engine.reload("u1")
    assert not engine.loaded("u1")  # the agent's next batch rebuilds it before answering
    assert engine.memory("u1").fast_weights_version == "2"  # kept until then
    events = [(i, _turn(i).event) for i in range(5)]  # the loader reads them from the topic
    engine.install({"u1": ScopeSnapshot(weights=w1, published=v1, events=events)})
    mem = engine.memory("u1")
    assert engine.loaded("u1") and mem.fast_weights_version == v1.version
    assert mem.state.watermark == 1
    assert [e.offset for e in mem.state.pending_events] == [2, 3, 4]  # no gap (invariant 1)


def test_a_reloaded_scope_has_the_same_memory_as_the_live_one(lm):
    live = ModelEngine(lm, base_model_version="7")
    live.answer([_turn(i) for i in range(6)])
    published, weights = _weights(lm, live, upto=3)
    live.swap(published, weights)
    reloaded = ModelEngine(lm, base_model_version="7")
    events = [(i, _turn(i).event) for i in range(4, 6)]
    reloaded.install({"u1": ScopeSnapshot(weights=weights, published=published, events=events)})
    a, b = live.memory("u1").state, reloaded.memory("u1").state
    for sa, sb in zip(a.S, b.S, strict=True):
        torch.testing.assert_close(sa, sb)
    assert [e.offset for e in b.pending_events] == [4, 5]


def test_retraction_drops_the_event_and_lru_evicts(lm):
    engine = ModelEngine(lm, base_model_version="7", max_scopes=2)
    engine.answer([_turn(i) for i in range(3)])
    assert engine.retract(Retraction(scope_id="u1", event_id="e1", ts=0.0))
    state = engine.memory("u1").state
    assert [e.offset for e in state.pending_events] == [0, 2]
    expected = lm.rebuild_state(
        lm.init_state(1).fast_weights(),
        -1,
        [(0, render_turn("system", "fact 0.")), (2, render_turn("system", "fact 2."))],
    )
    torch.testing.assert_close(state.S[0], expected.S[0])
    engine.answer([_turn(0, scope="u2"), _turn(0, scope="u3")])
    assert not engine.loaded("u1") and engine.live_scopes() == 2


def test_loading_never_evicts_a_scope_with_turns_queued(lm):
    engine = ModelEngine(lm, base_model_version="7", max_scopes=2)
    engine.answer([_turn(0, scope="u1"), _turn(0, scope="u2")])
    engine.install({"u3": ScopeSnapshot(None, None)}, busy=lambda s: s == "u1")
    assert engine.loaded("u1") and engine.loaded("u3") and not engine.loaded("u2")
    engine.install({"u4": ScopeSnapshot(None, None)}, busy=lambda s: s in {"u1", "u3"})
    assert engine.live_scopes() == 3, "over max_scopes while every older scope is busy"


def test_a_rebalance_forgets_the_scopes_of_lost_partitions(lm):
    engine = ModelEngine(lm, base_model_version="7")
    engine.answer([_turn(0, scope="a"), Turn(_turn(1, scope="b").event, 3, 1, None)])
    assert engine.keep_partitions({3}) == 1
    assert not engine.loaded("a") and engine.loaded("b")


def test_a_stale_user_turn_is_remembered_but_not_answered(lm):
    engine = ModelEngine(lm, base_model_version="7")
    old = Turn(_turn(0, role="user").event, 0, 0, produced_at=1.0)  # 1970: nobody waits
    assert engine.answer([old]) == []
    assert [e.offset for e in engine.memory("u1").state.pending_events] == [0]


def test_a_new_base_model_drops_every_scope_and_refuses_the_old_fast_weights(lm):
    engine = ModelEngine(lm, base_model_version="7", max_new_tokens=2)
    engine.answer([_turn(0), _turn(1, scope="b")])
    published, weights = _weights(lm, engine, upto=0)  # consolidated under base "7"
    torch.manual_seed(1)
    assert engine.set_base_model(HybridLM(CFG), "8") == 2
    assert not engine.loaded("u1") and not engine.loaded("b")
    engine.install({"u1": ScopeSnapshot(weights, published, [(1, _turn(1).event)], 0)})
    assert engine.memory("u1").fast_weights_version is None  # base 7's S is not served on 8
    [reply] = engine.answer([_turn(2, role="user")])
    assert reply.base_model_version == "8"


def test_swaps_are_applied_at_the_next_turn_newest_first_without_a_gap(lm):
    engine = ModelEngine(lm, base_model_version="7", max_new_tokens=2)
    (v1, w1), (v2, w2) = _two_versions(lm, engine)
    assert engine.swap(v1, w1) == "swapped"
    assert engine.swap(v2, w2) == "swapped"  # both before the scope speaks again
    assert engine.swap(v2, w2) == "stale"  # staged already
    [reply] = engine.answer([_turn(5, role="user")])
    assert reply.fast_weights_version == "2"
    mem = engine.memory("u1")
    assert mem.state.watermark == 3
    assert [e.offset for e in mem.state.pending_events] == [4, 5]  # no gap (invariant 1)


def test_a_staged_swap_waits_for_the_next_question_and_facts_meanwhile_are_kept(lm, monkeypatch):
    deferred = ModelEngine(lm, base_model_version="7", max_new_tokens=2)
    (_, _), (v2, w2) = _two_versions(lm, deferred)
    eager = ModelEngine(lm, base_model_version="7", max_new_tokens=2)
    _two_versions(lm, eager)
    assert deferred.swap(v2, w2) == "swapped" and eager.swap(v2, w2) == "swapped"
    eager.memory("u1")  # applied now, as at any use before
    assert deferred.answer([_turn(5), _turn(6)]) == eager.answer([_turn(5), _turn(6)]) == []
    mem = deferred._scopes["u1"]
    assert mem.staged is not None and mem.fast_weights_version is None  # facts: still staged
    assert [e.offset for e in mem.state.pending_events] == list(range(7))
    [reply] = deferred.answer([_turn(7, role="user")])
    assert reply.fast_weights_version == "2" and mem.staged is None
    [expected] = eager.answer([_turn(7, role="user")])
    got, ref = deferred.memory("u1").state, eager.memory("u1").state
    assert [e.offset for e in got.pending_events] == [e.offset for e in ref.pending_events]
    assert [e.offset for e in got.pending_events] == [4, 5, 6, 7]  # no gap (invariant 1)
    for a, b in zip(got.S, ref.S, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert reply.text == expected.text
    # A scope that only states facts applies it once too much is pending beside S.
    (v3, w3) = _weights(lm, deferred, upto=6, version="3")
    monkeypatch.setattr("streams.memory.MAX_DEFERRED_EVENTS", 3)
    assert deferred.swap(v3, w3) == "swapped"
    deferred.answer([_turn(8)])
    assert mem.fast_weights_version == "3" and mem.staged is None
    assert [e.offset for e in mem.state.pending_events] == [7, 8]


def test_a_swap_staged_while_the_engine_applies_an_older_one_is_kept(lm):
    # The agent stages swaps from its event loop while the engine thread may be applying
    # the scope's previous one (streams/swaps.py); the newer one must survive that.
    engine = ModelEngine(lm, base_model_version="7", max_new_tokens=2)
    (v1, w1), (v2, w2) = _two_versions(lm, engine)
    assert engine.swap(v1, w1) == "swapped"
    swap_in_batch = lm.swap_in_batch

    def swap_in_batch_meanwhile(swaps):
        assert engine.swap(v2, w2) == "swapped"  # as if the event loop ran now
        return swap_in_batch(swaps)

    lm.swap_in_batch = swap_in_batch_meanwhile
    [reply] = engine.answer([_turn(5, role="user")])
    assert reply.fast_weights_version == "1"  # v2 came after this turn's swap began
    lm.swap_in_batch = swap_in_batch
    [reply] = engine.answer([_turn(6, role="user")])
    assert reply.fast_weights_version == "2"
    assert [e.offset for e in engine.memory("u1").state.pending_events] == [4, 5, 6]


def test_a_batch_answers_each_user_turn_from_its_own_moment(lm):
    # Full-size random weights, so a reply depends on what the scope has seen.
    for module in lm.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
    turns = [
        _turn(0, scope="a"),
        _turn(1, role="user", scope="a"),
        _turn(2, role="user", scope="b"),
        _turn(3, scope="a"),
        _turn(4, role="user", scope="a"),  # a's second question, after one more fact
        _turn(5, role="user", scope="c"),
    ]
    batched = ModelEngine(lm, base_model_version="7", max_new_tokens=8)
    replies = batched.answer(turns)
    one_by_one = ModelEngine(lm, base_model_version="7", max_new_tokens=8)
    expected = [r for t in turns for r in one_by_one.answer([t])]
    assert [r.event_id for r in replies] == ["e1", "e2", "e4", "e5"]
    assert [r.text for r in replies] == [r.text for r in expected]
    assert replies[0].text != replies[2].text  # a's first reply is not from its later state
    assert [e.offset for e in batched.memory("a").state.pending_events] == [0, 1, 3, 4]
    # A redelivered user turn in the batch is asked again with its tokens, beside new ones.
    again = batched.answer([_turn(1, role="user", scope="a"), _turn(6, role="user", scope="b")])
    state = batched.memory("a").state
    prompt = render_turn("user", "fact 1.") + [ASSISTANT]
    assert again[0].text == batched._tok.decode(lm.generate(prompt, state, max_new_tokens=8))
    assert len(batched.memory("a").state.pending_events) == 4


def test_many_scopes_in_one_call_equal_one_call_per_turn(lm):
    for module in lm.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
    # 12 scopes, 1 to 4 turns each (some long, some user), interleaved; then a round with
    # redeliveries, and staged swaps applied together at the scopes' next use.
    turns, offset = [], 0
    for k in range(4):
        for s in range(12):
            if k <= s % 4:
                role = "user" if (s + k) % 3 == 0 else "system"
                event = Interaction(
                    event_id=f"e{offset}", scope_id=f"s{s}", session_id="s", role=role,
                    text=f"fact {offset}. " * (1 + (s * k) % 5), ts=0.0,
                )  # fmt: skip
                turns.append(Turn(event, 0, offset, None))
                offset += 1
    batched = ModelEngine(lm, base_model_version="7", max_new_tokens=6)
    one_by_one = ModelEngine(lm, base_model_version="7", max_new_tokens=6)
    replies = batched.answer(turns)
    expected = [r for t in turns for r in one_by_one.answer([t])]
    assert [(r.event_id, r.text) for r in replies] == [(r.event_id, r.text) for r in expected]
    assert len({r.text for r in replies}) > 1
    for engine in (batched, one_by_one):
        for s in (0, 5, 11):  # swaps staged for some scopes, applied at their next turn
            mem = engine.memory(f"s{s}")
            upto = mem.state.pending_events[0].offset
            slept = lm.sleep([mem.state.pending_tokens(upto)], mem.state, passes=2)
            published = FastWeightsPublished(
                scope_id=f"s{s}", version="1", artifact_uri="mlflow-artifacts:/x",
                sha256="0" * 64, watermark=upto, base_model_version="7", job_id="j",
            )  # fmt: skip
            weights = FastWeights(
                scope_id=f"s{s}", version="1", tensors=slept.fast_weights(),
                metadata={"config_hash": CFG.config_hash()}, watermark=upto,
                base_model_version="7",
            )  # fmt: skip
            assert engine.swap(published, weights) == "swapped"
    more = [turns[1], turns[-1]]  # redelivered
    for s in range(12):
        event = Interaction(
            event_id=f"e{offset}", scope_id=f"s{s}", session_id="s", role="user",
            text="who?", ts=0.0,
        )  # fmt: skip
        more.append(Turn(event, 0, offset, None))
        offset += 1
    replies = batched.answer(more)
    expected = [r for t in more for r in one_by_one.answer([t])]
    assert [(r.event_id, r.text, r.fast_weights_version) for r in replies] == [
        (r.event_id, r.text, r.fast_weights_version) for r in expected
    ]
    for s in range(12):
        got, ref = batched.memory(f"s{s}"), one_by_one.memory(f"s{s}")
        assert got.state.pending_events == ref.state.pending_events
        assert got.state.watermark == ref.state.watermark and got.offsets == ref.offsets
        assert got.last_offset == ref.last_offset and got.state.pos == ref.state.pos
        for a, b in zip(got.state.S, ref.state.S, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
