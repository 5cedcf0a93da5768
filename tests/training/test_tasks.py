"""The task generators: reproducible, well-formed, held-out names never seen in training."""

from __future__ import annotations

import random
import re

import pytest

from model.tasks import facts, khop
from model.tasks.common import name_pool
from model.tokenizer import ByteTokenizer, render_turn

TASKS = [
    (facts, facts.FactsConfig()),
    (facts, facts.FactsConfig(gap_chunks=2, fact_chunks=2)),
    (facts, facts.FactsConfig(chain=2, fact_chunks=2, question_chunks=1, fact_offset="random")),
    (khop, khop.KhopConfig()),
]


def test_name_pools_are_disjoint_and_large() -> None:
    train, held = set(name_pool("train")), set(name_pool("heldout"))
    assert not train & held
    assert len(train) > 1000 and len(held) > 300


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="split"):
        name_pool("test")


@pytest.mark.parametrize(("mod", "cfg"), TASKS)
def test_same_seed_same_examples(mod, cfg) -> None:
    a = mod.make_examples(cfg, 4, seed=7)
    b = mod.make_examples(cfg, 4, seed=7)
    c = mod.make_examples(cfg, 4, seed=8)
    assert a == b
    assert a != c


@pytest.mark.parametrize(("mod", "cfg"), TASKS)
def test_examples_are_whole_chunks_with_answers_masked(mod, cfg) -> None:
    tok = ByteTokenizer()
    for ex in mod.make_examples(cfg, 8, seed=1):
        assert len(ex.ids) == cfg.seq_len == len(ex.loss_mask)
        assert ex.questions
        masked = sum(ex.loss_mask)
        assert masked == sum(q.end - q.start for q in ex.questions)
        for q in ex.questions:
            assert tok.decode(ex.ids[q.start : q.end]) == q.answer
            assert ex.ids[q.end - 1] == tok.eot_id
            assert ex.ids[q.start - 1] == tok.role_ids["assistant"]
            assert q.distance >= 0 and q.hops >= 1


def test_facts_answers_follow_the_chain() -> None:
    cfg = facts.FactsConfig()
    tok = ByteTokenizer()
    for ex in facts.make_examples(cfg, 8, seed=3):
        text = tok.decode(ex.ids, show_specials=True)
        boss = dict(re.findall(r"\b(\w+) reports to (\w+)\.", text))
        for q in ex.questions:
            prompt = tok.decode(ex.ids[: q.start - 2]).rsplit("who is ", 1)[1]
            person = prompt.split("'")[0]
            for _ in range(q.hops):
                person = boss[person]
            assert person + "." == q.answer
            assert prompt.count("boss") == q.hops


def test_heldout_examples_use_only_heldout_names() -> None:
    held = set(name_pool("heldout"))
    for ex in facts.make_examples(facts.FactsConfig(), 8, seed=0, split="heldout"):
        for q in ex.questions:
            assert q.answer[:-1] in held


def test_facts_fit_their_chunk() -> None:
    with pytest.raises(ValueError, match="chunk"):
        facts.make_example(facts.FactsConfig(chunk=32), random.Random(0), render=render_turn)


def test_distance_counts_chunks_between_facts_and_question() -> None:
    cfg = facts.FactsConfig(fact_chunks=1, gap_chunks=3, question_chunks=1)
    for ex in facts.make_examples(cfg, 4, seed=0):
        assert {q.distance for q in ex.questions} == {3}


def test_random_fact_offset_moves_the_facts_within_their_chunk() -> None:
    cfg = facts.FactsConfig(chain=2, fact_chunks=2, question_chunks=1, fact_offset="random")
    tok = ByteTokenizer()
    offsets = set()
    for ex in facts.make_examples(cfg, 32, seed=5):
        for c in range(cfg.fact_chunks):
            chunk = tok.decode(ex.ids[c * cfg.chunk : (c + 1) * cfg.chunk], show_specials=True)
            first = re.search(r"\w+ reports to", chunk)
            assert first is not None, chunk  # the chain stays whole in its own chunk
            assert chunk.count(" reports to ") == cfg.chain
            offsets.add(first.start())
    assert len(offsets) > 5  # not always at the chunk's start
