"""`somna bench prewake`: what pre-waking (consolidation/prewake.py) takes off a question.

In process, no Kafka: the shipped checkpoint (``model/checkpoints/facts-n4``) serves S
scopes, each holding E fact events after its consolidated watermark (~40 tokens each:
``--quick`` ~110 tokens a scope, else ~400, what a 30-50 s consolidation lag leaves in
`somna bench swap`). Every scope gets a new version at its watermark, then every scope
asks a question in one engine call (``ModelEngine.answer``: the swaps are applied there,
then the replies decoded), the way a burst of publishes meets its questions:

- full: the agent re-wakes every event after the watermark (``swap_in_batch``);
- pre-woken: the sleep worker woke all but the last event already (``prewake.wake_tails``,
  timed too: that work moves to the sleep worker); the agent wakes the last one only.

Both must give the same replies (checked). Median of a few repeats, wall time.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import machine
from benchmarks.answer_batch import NAMES, _fact, _turn  # the same scopes and turns
from consolidation import prewake
from consolidation.fast_weights import FastWeights
from model import HybridLM
from model.tokenizer import render_turn
from streams.memory import ModelEngine
from streams.records import FastWeightsPublished

console = Console()
CHECKPOINT = Path(__file__).resolve().parents[1] / "model" / "checkpoints" / "facts-n4"
FULL = {"scopes": [1, 10, 30], "events": 14, "repeats": 5}
QUICK = {"scopes": [1, 10], "events": 4, "repeats": 3}
CHUNK_EVENTS = 3  # events folded into the version (before its watermark)


def _setup(lm: HybridLM, n_scopes: int, n_events: int) -> tuple[ModelEngine, list, list]:
    """An engine whose scopes hold CHUNK_EVENTS + n_events facts, a version per scope at
    offset CHUNK_EVENTS - 1, and each scope's events after it (offset, tokens)."""
    engine = ModelEngine(lm, base_model_version="bench")
    scopes = [f"s{i:03d}" for i in range(n_scopes)]
    texts = {s: [_fact(i, k) for k in range(CHUNK_EVENTS + n_events)] for i, s in enumerate(scopes)}
    engine.answer([_turn(s, k, "system", t) for s in scopes for k, t in enumerate(texts[s])])
    watermark = CHUNK_EVENTS - 1
    versions, after = [], []
    for s in scopes:
        state = engine.memory(s).state
        slept = lm.sleep([state.pending_tokens(watermark)], state, passes=2)
        pub = FastWeightsPublished(scope_id=s, version="1", artifact_uri="mlflow-artifacts:/x",
                                   sha256="0" * 64, watermark=watermark,
                                   base_model_version="bench", job_id=f"j-{s}")  # fmt: skip
        fw = FastWeights(scope_id=s, version="1", tensors=slept.fast_weights(),
                         metadata={"config_hash": lm.config.config_hash()}, watermark=watermark,
                         base_model_version="bench")  # fmt: skip
        events = [
            (k, render_turn("system", texts[s][k])) for k in range(watermark + 1, len(texts[s]))
        ]
        versions.append((pub, fw))
        after.append(events)
    return engine, versions, after


def _ask(engine: ModelEngine, scopes: list[str], offset: int) -> tuple[float, list[str]]:
    turns = [
        _turn(s, offset, "user", f"who does {NAMES[i % 7]} report to?")
        for i, s in enumerate(scopes)
    ]
    t0 = time.perf_counter()
    replies = engine.answer(turns)
    return time.perf_counter() - t0, [r.text for r in replies]


def _measure(lm: HybridLM, n_scopes: int, n_events: int, repeats: int) -> dict:
    full_s, pre_s, wake_s, same = [], [], [], True
    for _ in range(repeats):
        engine, versions, after = _setup(lm, n_scopes, n_events)
        for pub, fw in versions:
            engine.swap(pub, fw)
        seconds, full_replies = _ask(engine, [p.scope_id for p, _ in versions], 10_000)
        full_s.append(seconds)
        # The sleep worker read the topic up to the next-to-last event: the last came after.
        engine, versions, after = _setup(lm, n_scopes, n_events)
        tails = [events[:-1] for events in after]
        t0 = time.perf_counter()
        states = prewake.wake_tails(
            lm, [(p, fw.tensors, t) for (p, fw), t in zip(versions, tails, strict=True)]
        )
        wake_s.append(time.perf_counter() - t0)
        for (pub, fw), state, tail in zip(versions, states, tails, strict=True):
            pre = prewake.Prewoken(state, woken_to=tail[-1][0])
            engine.swap(pub, dataclasses.replace(fw, prewoken=pre))
        seconds, pre_replies = _ask(engine, [p.scope_id for p, _ in versions], 10_000)
        pre_s.append(seconds)
        same = same and pre_replies == full_replies
    full, pre = statistics.median(full_s), statistics.median(pre_s)
    tokens = sum(len(ids) for events in after for _, ids in events)
    return {
        "scopes": n_scopes,
        "events_after_watermark": n_events,
        "tokens_after_watermark_per_scope": round(tokens / n_scopes),
        "question_call_full_ms": full * 1000,
        "question_call_prewoken_ms": pre * 1000,
        "speedup": full / pre,
        "sleep_worker_wake_ms": statistics.median(wake_s) * 1000,
        "same_replies": same,
    }


def run(quick: bool = False, json_path: Path | None = None) -> dict:
    cfg = QUICK if quick else FULL
    torch.set_num_threads(1)  # as the agent's engine (SOMNA_AGENT_TORCH_THREADS)
    torch.manual_seed(0)
    lm = HybridLM.load(CHECKPOINT).eval()
    rows = [_measure(lm, n, cfg["events"], cfg["repeats"]) for n in cfg["scopes"]]
    table = Table(title="A burst of swapped scopes asked at once: one engine call (ms, median)")
    for col in (
        "scopes",
        "tokens/scope after W",
        "full re-wake",
        "pre-woken",
        "x",
        "sleep worker's wake",
        "same replies",
    ):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["scopes"]), str(r["tokens_after_watermark_per_scope"]),
            f"{r['question_call_full_ms']:.1f}", f"{r['question_call_prewoken_ms']:.1f}",
            f"{r['speedup']:.1f}", f"{r['sleep_worker_wake_ms']:.1f}", str(r["same_replies"]),
        )  # fmt: skip
    console.print(table)
    result = {"bench": "prewake", "quick": quick, "checkpoint": CHECKPOINT.name,
              "machine": machine.describe(), "rows": rows}  # fmt: skip
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    return result
