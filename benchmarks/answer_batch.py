"""`somna bench answer`: ms to answer a micro-batch of user turns from 1, 10, 100 scopes.

The shipped checkpoint (``model/checkpoints/facts-n4``) serves scopes whose histories
differ (1 to 7 facts each: different positions, KV lengths, S). Two levels, each timed
sequential vs batched in the same run:
- decode: per scope, the old ``generate`` (``wake`` one token at a time) and today's
  ``lm.generate`` (a batch of one), vs one ``lm.generate_batch`` over all scopes, from
  ``<assistant>``, 32 new tokens at most;
- engine: ``ModelEngine.answer`` called once per turn (each reply decoded alone) vs once
  for the whole batch (the turns woken in rounds of one batched wake, all replies in one
  batched decode), for three batches: a question per scope (user), a fact per scope
  (system: wake only, what most of `somna bench swap` sends), a fact each and a question
  from every other scope (mixed). Replies and the memories left must be the same.
Both sides must give the same replies (checked, reported). Best of a few repeats, wall
and process CPU time; the load average is recorded with the figures (a shared CPU).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.sleep_throughput import device_name
from model import HybridLM
from model.tokenizer import ASSISTANT, EOT
from streams.engine import Turn
from streams.memory import MAX_NEW_TOKENS, ModelEngine
from streams.records import Interaction

CHECKPOINT = Path(__file__).resolve().parents[1] / "model" / "checkpoints" / "facts-n4"
FULL = {"scopes": [1, 10, 100], "repeats": 3}
QUICK = {"scopes": [1, 10], "repeats": 2}
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"]
QUESTION = "who does alice report to?"
# The turns each scope sends in one batch, by kind: a question (woken, then answered); a
# fact (a system turn: woken, not answered); mixed: a fact, then every other scope asks.
KINDS = {
    "user": lambda i: [("user", QUESTION)],
    "system": lambda i: [("system", _fact(i, 9))],
    "mixed": lambda i: [("system", _fact(i, 8))] + ([("user", QUESTION)] if i % 2 else []),
}


def _turn(scope: str, offset: int, role: str, text: str) -> Turn:
    event = Interaction(
        event_id=f"{scope}-{offset}", scope_id=scope, session_id="bench", role=role, text=text,
        ts=time.time(),
    )  # fmt: skip
    return Turn(event, 0, offset, None)


def _fact(i: int, k: int) -> str:
    return f"{NAMES[(i + k) % 7]} reports to {NAMES[(i + 2 * k + 1) % 7]}."


def _engine(lm: HybridLM, n: int) -> ModelEngine:
    """An engine serving n scopes; scope i has stated (i % 7) + 1 facts."""
    engine = ModelEngine(lm, base_model_version="bench", max_scopes=n + 1)
    for i in range(n):
        facts = [_turn(f"s{i}", k, "system", _fact(i, k)) for k in range(i % 7 + 1)]
        engine.answer(facts)
    return engine


def _wake_loop(lm: HybridLM, prompt: list[int], state: Any) -> list[int]:
    """How ``generate`` decoded before ``generate_batch``: ``wake`` one token at a time."""
    logits, state = lm.wake(prompt, state.clone())
    out: list[int] = []
    for _ in range(MAX_NEW_TOKENS):
        nxt = int(logits[0, -1].argmax())
        if nxt == EOT:
            break
        out.append(nxt)
        logits, state = lm.wake([nxt], state)
    return out


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Best (wall, process CPU) seconds over ``repeats`` runs after a warm-up, and the
    last result."""
    out = fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu, out


def _measure(lm: HybridLM, n: int, repeats: int) -> dict[str, Any]:
    engine = _engine(lm, n)
    states = [engine.memory(f"s{i}").state for i in range(n)]
    prompts = [[ASSISTANT]] * n
    old = _timed(lambda: [_wake_loop(lm, p, s) for p, s in zip(prompts, states, strict=True)], repeats)  # fmt: skip
    seq = _timed(lambda: [lm.generate(p, s, MAX_NEW_TOKENS) for p, s in zip(prompts, states, strict=True)], repeats)  # fmt: skip
    bat = _timed(lambda: lm.generate_batch(prompts, states, MAX_NEW_TOKENS), repeats)
    # Engine level, three kinds of batch, each engine call once per turn vs once per batch
    # (the same two engines throughout: every run adds turns to every scope).
    engines = {"sequential": engine, "batched": _engine(lm, n)}
    offsets = {"sequential": 100, "batched": 100}

    def answer(which: str, kind: str) -> list[str]:
        turns = []
        for i in range(n):
            for role, text in KINDS[kind](i):
                offsets[which] += 1
                turns.append(_turn(f"s{i}", offsets[which], role, text))
        e = engines[which]
        if which == "sequential":
            return [r.text for t in turns for r in e.answer([t])]
        return [r.text for r in e.answer(turns)]

    row: dict[str, Any] = {"scopes": n}
    for kind in KINDS:
        eng_seq = _timed(lambda k=kind: answer("sequential", k), repeats)
        eng_bat = _timed(lambda k=kind: answer("batched", k), repeats)
        row[f"engine_{kind}_sequential_ms"] = eng_seq[0] * 1e3
        row[f"engine_{kind}_batched_ms"] = eng_bat[0] * 1e3
        row[f"engine_{kind}_batched_cpu_ms"] = eng_bat[1] * 1e3
        row[f"engine_{kind}_same_replies"] = eng_seq[2] == eng_bat[2]
    mems = [(engines[w].memory(f"s{i}").state for w in engines) for i in range(n)]
    row["engine_same_memory"] = all(a.pending == b.pending and a.pos == b.pos for a, b in mems)
    return {
        **row,
        "decode_wake_loop_ms": old[0] * 1e3,
        "decode_sequential_ms": seq[0] * 1e3,
        "decode_batched_ms": bat[0] * 1e3,
        "decode_sequential_cpu_ms": seq[1] * 1e3,
        "decode_batched_cpu_ms": bat[1] * 1e3,
        "decode_same_replies": old[2] == seq[2] == bat[2],
        "tokens_generated": sum(len(r) for r in bat[2]),
        "load_avg_1m": os.getloadavg()[0],
    }


def run(quick: bool = False, json_path: Path | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    sizes = QUICK if quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # what the agent's engine thread gets on a shared CPU
    lm = HybridLM.load(CHECKPOINT, device=device)
    console = Console(width=max(Console().width, 110))
    rows = []
    for n in sizes["scopes"]:
        rows.append(_measure(lm, n, sizes["repeats"]))
        console.log(f"{n} scopes: {rows[-1]}")
    result = {
        "benchmark": "answer_batch",
        "quick": quick,
        "device": device_name(device),
        "torch": torch.__version__,
        "checkpoint": str(CHECKPOINT.name),
        "max_new_tokens": MAX_NEW_TOKENS,
        "load_avg_start": os.getloadavg(),
        "results": rows,
    }
    table = Table(title=f"Answering a micro-batch, {CHECKPOINT.name} on {result['device']}")
    for col in ["scopes", "tokens", "wake loop ms", "generate seq ms", "decode batched ms", "speedup",
                *(f"{k} seq / batched ms" for k in KINDS), "same", "load 1m"]:  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        same = r["decode_same_replies"] and r["engine_same_memory"]
        same = same and all(r[f"engine_{k}_same_replies"] for k in KINDS)
        table.add_row(
            str(r["scopes"]),
            str(r["tokens_generated"]),
            f"{r['decode_wake_loop_ms']:.1f}",
            f"{r['decode_sequential_ms']:.1f}",
            f"{r['decode_batched_ms']:.1f}",
            f"{r['decode_sequential_ms'] / r['decode_batched_ms']:.1f}x",
            *(
                f"{r[f'engine_{k}_sequential_ms']:.0f} / {r[f'engine_{k}_batched_ms']:.1f}"
                for k in KINDS
            ),
            "yes" if same else "NO",
            f"{r['load_avg_1m']:.2f}",
        )
    console.print(table)
    console.print(
        "decode: the old wake-per-token loop and generate, per scope, vs one generate_batch "
        "(speedup: generate seq / batched); engine: ModelEngine.answer per turn vs per batch "
        "(wakes included) for a batch of one question per scope (user), one fact per scope "
        "(system: wake only), a fact each and a question from every other scope (mixed); "
        "best wall time of the repeats"
    )
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
