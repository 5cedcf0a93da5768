"""The paper's k-hop graph task (Lee et al. 2026, "k-hop graph retrieval").

One chain of nodes ``n0 -> n1 -> ... -> nE`` is listed as edges ("kim>bob."), a segment
of the chain per chunk with the edges of a chunk shuffled (and the segments in random
order). After the edges have been evicted, the user asks for the k-hop successor of a node
("kim+3?") and the assistant answers with one node ("tav."). Loss is on the answer tokens.
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
class KhopConfig:
    chunk: int = 64  # tokens per chunk: the sleep/eviction unit
    edge_chunks: int = 2  # chunks of edges
    edges_per_chunk: int = 5  # edges listed in each of them
    max_hops: int = 4  # questions ask for 1..max_hops successors
    gap_chunks: int = 0  # chatter chunks between the last edges and the questions
    question_chunks: int = 1

    def __post_init__(self) -> None:
        for name in ("chunk", "edge_chunks", "edges_per_chunk", "max_hops", "question_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"KhopConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_hops > self.edges:
            raise ValueError(
                f"KhopConfig.max_hops={self.max_hops} exceeds the chain's {self.edges} edges"
            )
        if self.gap_chunks < 0:
            raise ValueError(f"KhopConfig.gap_chunks must be >= 0, got {self.gap_chunks}")

    @property
    def edges(self) -> int:
        return self.edge_chunks * self.edges_per_chunk

    @property
    def n_chunks(self) -> int:
        return self.edge_chunks + self.gap_chunks + self.question_chunks

    @property
    def seq_len(self) -> int:
        return self.n_chunks * self.chunk


def make_example(
    cfg: KhopConfig,
    rng: random.Random,
    split: str = "train",
    render: RenderTurn | None = None,
) -> Example:
    render = render or default_render()
    nodes = rng.sample(name_pool(split), cfg.edges + 1)
    b = SequenceBuilder(cfg.chunk, render)

    # The chunk where each edge (node i -> node i+1) was listed.
    edge_chunk: dict[int, int] = {}
    segments = list(range(cfg.edge_chunks))
    rng.shuffle(segments)
    for seg in segments:
        idx = list(range(seg * cfg.edges_per_chunk, (seg + 1) * cfg.edges_per_chunk))
        rng.shuffle(idx)
        text = " ".join(f"{nodes[i]}>{nodes[i + 1]}." for i in idx)
        if b.size("user", text) > cfg.chunk:
            raise ValueError(
                f"{cfg.edges_per_chunk} edges need {b.size('user', text)} tokens, "
                f"more than KhopConfig.chunk={cfg.chunk}"
            )
        for i in idx:
            edge_chunk[i] = b.current_chunk
        b.add("user", text)
        b.fill_chunk(rng)
    for _ in range(cfg.gap_chunks):
        b.chatter_chunk(rng)

    total = cfg.seq_len
    questions: list[Question] = []
    while True:
        hops = rng.randint(1, cfg.max_hops)
        i = rng.randint(0, cfg.edges - hops)
        q, a = f"{nodes[i]}+{hops}?", f"{nodes[i + hops]}."
        need = b.size("user", q) + b.size("assistant", a)
        if need > b.room() or questions:
            # One question per chunk (a second would see the first one's nodes), and a
            # question shares its chunk (and KV) with its answer.
            b.fill_chunk(rng)
        if len(b.ids) + need > total:
            break
        b.add("user", q)
        start, end = b.add_answer(a)
        latest = max(edge_chunk[j] for j in range(i, i + hops))
        questions.append(Question(hops, start // cfg.chunk - latest - 1, start, end, a))
    if not questions:
        raise ValueError(f"question_chunks={cfg.question_chunks} leaves no room for a question")
    b.pad_to(total, rng)
    return b.build(questions)


# ``make_examples(cfg, n, seed, split="train", render=None)``: n seeded examples.
make_examples = partial(seeded_examples, make_example, "khop")
