"""Fixtures of the consolidation tests: a registered base model, history helpers, and the
reporting chains the shipped checkpoint recalls."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest

from infra.topics import INTERACTIONS


def tiny_checkpoint(directory: Path) -> Path:
    """A small random HybridLM (CPU-friendly) saved as a checkpoint dir."""
    import torch

    from model import HybridConfig, HybridLM

    torch.manual_seed(0)
    cfg = HybridConfig(d_model=64, n_layers=2, pattern="GA", n_heads=2, head_dim=16, window=64,
                       chunk=64, sleep_passes=2, conv_size=0, d_ff=128)  # fmt: skip
    return HybridLM(cfg).save(directory)


@pytest.fixture(scope="session")
def base_model(mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory):
    """The production base model of the session's MLflow server: the shipped checkpoint
    when there is one (registered by ``ensure_base_model``), else a tiny random model."""
    import torch

    from consolidation.base_model import ensure_base_model
    from consolidation.exceptions import BaseModelMissing

    torch.set_num_threads(1)
    try:
        return ensure_base_model(mlflow_uri)
    except BaseModelMissing:
        ckpt = tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))
        return ensure_base_model(mlflow_uri, checkpoint_dir=ckpt)


def scope_id(prefix: str = "cons") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def history_rows(
    scope: str, texts: list[str], *, first_offset: int, partition: int = 0
) -> list[dict]:
    from streams.history import row_of
    from streams.records import Interaction

    rows = []
    for i, text in enumerate(texts):
        ev = Interaction(event_id=f"{scope}-e{first_offset + i}", scope_id=scope, session_id="s1",
                         role="user", text=text, ts=1_760_000_000.0 + i)  # fmt: skip
        rows.append(row_of(ev, topic=INTERACTIONS, partition=partition, offset=first_offset + i))
    return rows


# Who reports to whom: each chain's facts make one chunk (``chain_chunk_texts``), the shape
# the shipped checkpoint was trained on (two facts per chunk, model/checkpoints/README.md).
CHAINS = [["kim", "bob", "tav"], ["sam", "dex", "vin"], ["nal", "mop", "ged"]]


def chain_chunk_texts(chunk: int) -> list[list[str]]:
    """Per chain: its facts (shuffled) in one turn, then a filler turn up to ``chunk`` tokens."""
    from model.tasks.common import _chatter
    from model.tokenizer import render_turn

    rng = random.Random(0)
    out = []
    for people in CHAINS:
        facts = [f"{a} reports to {b}." for a, b in zip(people, people[1:], strict=False)]
        rng.shuffle(facts)
        text = " ".join(facts)
        room = chunk - len(render_turn("user", text)) - 2
        out.append([text, _chatter(rng, max(1, room))])
    return out


def answer(lm, weights: dict, person: str) -> str:
    """What ``lm`` answers from these fast weights to "who is PERSON's boss?"."""
    from model import MemoryState
    from model.tokenizer import ASSISTANT, ByteTokenizer, render_turn

    state = MemoryState.from_fast_weights(weights, lm.config)
    prompt = render_turn("user", f"who is {person}'s boss?") + [ASSISTANT]
    return ByteTokenizer().decode(lm.generate(prompt, state, max_new_tokens=8)).strip()
