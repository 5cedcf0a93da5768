"""The dialogue memory task (DESIGN.md "The benchmark task").

A user states facts in a small fact language ("kim reports to bob."), one reporting chain
per chunk, in random order. Other chunks of facts (and optional chatter) push them out of
the attention window. Then the user asks 1-, 2- and 3-hop questions ("who is kim's boss's
boss?") and the assistant answers with one name ("tav."). Loss is on the answer tokens.
A chain is asked about at most once per chunk, so no answer is visible in the window.

Why random order matters: reading "kim reports to bob." before "bob reports to tav." in
one pass cannot write kim -> tav into S; a second sleep pass over the same chunk can,
because S then already holds bob -> tav. Each pass buys one more hop of composition.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial

from model.tasks.common import (
    Example,
    Question,
    RenderTurn,
    SequenceBuilder,
    default_render,
    name_pool,
    seeded_examples,
)


@dataclass(frozen=True)
class FactsConfig:
    chunk: int = 64  # tokens per chunk: the sleep/eviction unit
    fact_chunks: int = 3  # chunks holding one reporting chain each
    chain: int = 3  # edges per chain, so questions have 1..chain hops
    gap_chunks: int = 0  # chatter chunks between the last facts and the questions
    question_chunks: int = 2  # chunks of question/answer turns at the end
    relation: str = "reports to"
    boss: str = "boss"  # "who is kim's boss's boss?"
    # Where a chain's facts sit in their chunk: "start" (the benchmark layout) or "random"
    # (after a chatter turn of random length). Online, a chunk starts wherever the idle
    # trigger fired, and a rebuild after a retraction re-chunks the later turns, so a
    # model trained only on "start" lost facts that no longer opened a chunk.
    fact_offset: str = "start"

    def __post_init__(self) -> None:
        for name in ("chunk", "fact_chunks", "chain", "question_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"FactsConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.gap_chunks < 0:
            raise ValueError(f"FactsConfig.gap_chunks must be >= 0, got {self.gap_chunks}")
        if self.fact_offset not in ("start", "random"):
            raise ValueError(
                f"FactsConfig.fact_offset must be start or random, got {self.fact_offset!r}"
            )

    @property
    def n_chunks(self) -> int:
        return self.fact_chunks + self.gap_chunks + self.question_chunks

    @property
    def seq_len(self) -> int:
        return self.n_chunks * self.chunk


def fact_text(person: str, boss: str, cfg: FactsConfig) -> str:
    return f"{person} {cfg.relation} {boss}."


def question_text(person: str, hops: int, cfg: FactsConfig) -> str:
    return f"who is {person}'s " + f"{cfg.boss}'s " * (hops - 1) + f"{cfg.boss}?"


def make_example(
    cfg: FactsConfig,
    rng: random.Random,
    split: str = "train",
    render: RenderTurn | None = None,
) -> Example:
    render = render or default_render()
    names = rng.sample(name_pool(split), cfg.fact_chunks * (cfg.chain + 1))
    b = SequenceBuilder(cfg.chunk, render)

    chains: list[tuple[int, list[str]]] = []  # (chunk index, [p0, p1, ...] p_i reports to p_i+1)
    for c in range(cfg.fact_chunks):
        people = names[c * (cfg.chain + 1) : (c + 1) * (cfg.chain + 1)]
        facts = [fact_text(people[i], people[i + 1], cfg) for i in range(cfg.chain)]
        rng.shuffle(facts)
        text = " ".join(facts)
        if b.size("user", text) > cfg.chunk:
            raise ValueError(
                f"a chain of {cfg.chain} facts needs {b.size('user', text)} tokens, "
                f"more than FactsConfig.chunk={cfg.chunk}"
            )
        if cfg.fact_offset == "random":
            # Chatter before and after must each be a whole turn (or nothing).
            slack, over = cfg.chunk - b.size("user", text), b.overhead("user")
            leads = [n for n in range(slack + 1) if _fits(n, over) and _fits(slack - n, over)]
            lead = rng.choice(leads)
            if lead:
                b.chatter(rng, lead)
        chains.append((b.current_chunk, people))
        b.add("user", text)
        b.fill_chunk(rng)
    for _ in range(cfg.gap_chunks):
        b.chatter_chunk(rng)

    total = cfg.seq_len
    questions: list[Question] = []
    # Each chain is asked about at most once per chunk: a second question would see the
    # first one's names in the attention window and could be answered without memory.
    asked: dict[int, set[int]] = {}
    while len(b.ids) < total:
        fresh = [c for c in range(len(chains)) if c not in asked.get(b.current_chunk, set())]
        if not fresh:
            b.fill_chunk(rng)
            continue
        c = rng.choice(fresh)
        fact_chunk, people = chains[c]
        hops = rng.randint(1, cfg.chain)
        i = rng.randint(0, cfg.chain - hops)
        answer = people[i + hops] + "."
        q, a = question_text(people[i], hops, cfg), answer
        need = b.size("user", q) + b.size("assistant", a)
        if need > b.room():
            b.fill_chunk(rng)  # a question and its answer share a chunk (and its KV)
        if len(b.ids) + need > total:
            break
        asked.setdefault(b.current_chunk, set()).add(c)
        b.add("user", q)
        start, end = b.add_answer(a)
        distance = start // cfg.chunk - fact_chunk - 1
        questions.append(Question(hops, distance, start, end, answer))
    if not questions:
        raise ValueError(f"question_chunks={cfg.question_chunks} leaves no room for a question")
    b.pad_to(total, rng)
    return b.build(questions)


def _fits(tokens: int, overhead: int) -> bool:
    return tokens == 0 or tokens > overhead


# ``make_examples(cfg, n, seed, split="train", render=None)``: n seeded examples.
make_examples = partial(seeded_examples, make_example, "facts")
