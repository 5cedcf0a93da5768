"""Pieces shared by the synthetic tasks: examples, name pools, a chunk-aligned builder.

An example is one token sequence of ``n_chunks * chunk`` tokens, rendered turn by turn
with the service's ``render_turn`` so the model trains on exactly what it will see online.
Training and evaluation run it chunk by chunk: wake over a chunk, then sleep on it, then
its attention KV is evicted. A question's *distance* is how many whole chunks lie between
the chunk holding its (latest) fact and the chunk where it is asked: at distance >= 0 the
facts are certainly out of the attention window (window <= chunk) and only the fast
weights S can answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

RenderTurn = Callable[[str, str], list[int]]

# Three-letter consonant-vowel-consonant names ("kim", "tav"): 1620 of them, every
# name the same length so fact turns have a fixed size and fit a chunk exactly.
CONSONANTS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"
SPLITS = ("train", "heldout")

CHATTER = (
    "nice weather today.",
    "i had pasta for lunch.",
    "the meeting ran long again.",
    "ok, thanks!",
    "did you see the game?",
    "my train was late.",
    "coffee is ready.",
    "let us sync tomorrow.",
    "the printer is broken.",
    "sounds good to me.",
)


@dataclass(frozen=True)
class Question:
    """One answer span inside an example: ids[start:end] are the answer tokens.

    ids[:start] is the prompt a generator continues from (it ends with the assistant's
    turn header), so teacher-forced argmax over [start, end) == greedy generation.
    """

    hops: int
    distance: int  # whole chunks between the latest fact's chunk and the question's chunk
    start: int
    end: int
    answer: str


@dataclass(frozen=True)
class Example:
    ids: list[int]
    loss_mask: list[int]  # 1 on answer tokens only
    questions: list[Question]
    chunk: int

    @property
    def n_chunks(self) -> int:
        return len(self.ids) // self.chunk


def name_pool(split: str, *, length: int = 3) -> list[str]:
    """Entity names of one split. ``train`` and ``heldout`` are disjoint (every 5th name
    of a fixed enumeration is held out), so evaluation measures recall of unseen names."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if length == 3:
        names = ["".join(p) for p in product(CONSONANTS, VOWELS, CONSONANTS)]
    elif length == 2:
        names = ["".join(p) for p in product(CONSONANTS, VOWELS)]
    else:
        raise ValueError(f"name length must be 2 or 3, got {length}")
    held = split == "heldout"
    return [n for i, n in enumerate(names) if (i % 5 == 0) == held]


def seeded_examples(
    make_one: Callable[[Any, random.Random, str, RenderTurn], Example],
    task: str,
    cfg: Any,
    n: int,
    seed: int,
    split: str = "train",
    render: RenderTurn | None = None,
) -> list[Example]:
    """``n`` examples of ``task`` made by ``make_one``, reproducible from ``seed``
    (each task binds its own ``make_examples`` to this)."""
    rng = random.Random(f"{task}-{split}-{seed}")
    render = render or default_render()
    return [make_one(cfg, rng, split, render) for _ in range(n)]


def default_render() -> RenderTurn:
    from model.tokenizer import render_turn  # the one canonical rendering (model/ issue)

    return render_turn


@dataclass
class SequenceBuilder:
    """Appends rendered turns, keeping track of chunks and answer spans."""

    chunk: int
    render: RenderTurn
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)

    @property
    def current_chunk(self) -> int:
        return len(self.ids) // self.chunk

    def room(self) -> int:
        """Tokens left before the next chunk boundary."""
        return self.chunk - len(self.ids) % self.chunk

    def size(self, role: str, text: str) -> int:
        return len(self.render(role, text))

    def overhead(self, role: str) -> int:
        return self.size(role, "")

    def add(self, role: str, text: str) -> None:
        toks = self.render(role, text)
        self.ids.extend(toks)
        self.mask.extend([0] * len(toks))

    def add_answer(self, text: str, role: str = "assistant") -> tuple[int, int]:
        """Add an answer turn; loss covers the text and the turn's closing tokens."""
        toks = self.render(role, text)
        body = text.encode("utf-8")
        offset = _find(toks, list(body))
        start = len(self.ids) + offset
        self.ids.extend(toks)
        self.mask.extend([0] * offset + [1] * (len(toks) - offset))
        return start, len(self.ids)

    def fill_chunk(self, rng: random.Random) -> None:
        """Fill the rest of the current chunk with one chatter turn cut to size, so the
        next turn starts on a chunk boundary (facts of a chunk stay in that chunk)."""
        room = self.room()
        if room == self.chunk and self.ids:
            return
        over = self.overhead("user")
        if room <= over:
            # Too little room for a turn: pad the previous turn's text with spaces would
            # change its bytes, so we use a short chatter turn spilling into the next
            # chunk's slot instead, then fill that chunk.
            self.add("user", _chatter(rng, max(1, room + self.chunk - over)))
            return
        self.add("user", _chatter(rng, room - over))

    def chatter(self, rng: random.Random, tokens: int) -> None:
        """One chatter turn of exactly ``tokens`` tokens (more than a turn's overhead)."""
        over = self.overhead("user")
        if tokens <= over:
            raise ValueError(f"a chatter turn needs more than {over} tokens, got {tokens}")
        self.add("user", _chatter(rng, tokens - over))

    def chatter_chunk(self, rng: random.Random) -> None:
        """Fill the current chunk (from its start) with chatter only."""
        self.fill_chunk(rng)
        self.add("user", _chatter(rng, self.chunk - self.overhead("user")))

    def pad_to(self, total: int, rng: random.Random) -> None:
        """Fill with chatter up to exactly ``total`` tokens (cut mid-turn at the end)."""
        while len(self.ids) < total:
            self.add("user", _chatter(rng, rng.randint(8, 40)))
        del self.ids[total:]
        del self.mask[total:]

    def build(self, questions: Sequence[Question]) -> Example:
        if len(self.ids) % self.chunk:
            raise ValueError("sequence length must be a whole number of chunks")
        return Example(list(self.ids), list(self.mask), list(questions), self.chunk)


def _chatter(rng: random.Random, n_chars: int) -> str:
    """Chatter text of exactly ``n_chars`` characters (sentences, cut at the end)."""
    text = ""
    while len(text) < n_chars:
        text += rng.choice(CHATTER) + " "
    return text[:n_chars]


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    raise ValueError("render_turn does not contain the text bytes verbatim")
