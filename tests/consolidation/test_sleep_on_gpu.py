"""The sleep worker's batched sleep on CUDA (``consolidation.batch.sleep_states``, what
``run_batch`` calls on a GPU machine) gives the fast weights the CPU gives, and its
artifact serves the CPU agent: same answers; the state it pre-wakes there serves that agent
too. Skipped where there is no CUDA (CI); run it on a GPU machine
(``benchmarks/gpu_sleep_session.sh``)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from consolidation.base_model import BaseModel, shipped_checkpoint
from consolidation.batch import SleepTask, artifact_of, sleep_states
from consolidation.fast_weights import Lineage, write_artifact
from tests.consolidation.conftest import CHAINS, answer, chain_chunk_texts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Max |gpu - cpu| / max |cpu| of a fast-weight tensor. The batch sleeps in fp32, so the
# gated delta rule takes the torch ops there too (fla's kernels are bf16/fp16 only); cuDNN
# may still run the short convolutions in TF32 (about 1e-3).
TOLERANCE = 5e-3


def _tasks(chunk: int) -> list[SleepTask]:
    """A ragged batch: one chain per scope, a scope with all three (three rounds), and
    scopes whose chunks are cut short."""
    from model.tokenizer import render_turn

    chunks = [
        render_turn("user", facts) + render_turn("user", filler)
        for facts, filler in chain_chunk_texts(chunk)
    ]

    def task(scope: str, cs: list[list[int]]) -> SleepTask:
        lin = Lineage(scope, f"job-{scope}", None, "test", 0, len(cs), 4, sum(map(len, cs)))
        return SleepTask(lineage=lin, chunks=cs)

    return [
        *(task(f"chain{c}", [cs]) for c, cs in enumerate(chunks)),
        task("all", chunks),
        task("short", [chunks[0][: chunk // 3], chunks[1][: chunk // 2]]),
    ]


def test_batched_sleep_on_cuda_matches_the_cpu_and_serves_the_cpu_agent(tmp_path: Path) -> None:
    from model import HybridLM
    from model.artifact import load_artifact, state_from_artifact

    ckpt = shipped_checkpoint("facts-n4")
    # Two loads: sleep_states moves the model it is given to the batch's device.
    cpu = BaseModel(HybridLM.load(ckpt, device="cpu"), "test", ckpt)
    gpu = BaseModel(HybridLM.load(ckpt, device="cpu"), "test", ckpt)
    cfg = cpu.lm.config
    passes = cfg.sleep_passes
    tasks = _tasks(cfg.chunk)
    on_cpu = sleep_states(cpu, tasks, passes, "cpu")
    on_gpu = sleep_states(gpu, tasks, passes, "cuda")
    assert gpu.lm.device.type == "cuda"

    for task, c, g in zip(tasks, on_cpu, on_gpu, strict=True):
        assert c.keys() == g.keys()
        for name in c:
            assert g[name].device.type == "cpu"  # what the artifact writer and the agent take
            err = float((g[name] - c[name]).abs().max() / c[name].abs().max().clamp_min(1e-12))
            assert err < TOLERANCE, (task.lineage.scope_id, name, err)

    # The agent (on the CPU) answers from GPU-slept weights as from CPU-slept ones.
    lm = cpu.lm
    for task, c, g in zip(tasks, on_cpu, on_gpu, strict=True):
        for people in CHAINS:
            assert answer(lm, g, people[0]) == answer(lm, c, people[0]), task.lineage.scope_id

    # Its artifact, written as run_batch writes it, verifies and loads on the CPU.
    tensors, meta = artifact_of(gpu, on_gpu[3], tasks[3].lineage)
    path = tmp_path / "fast_weights.safetensors"
    write_artifact(path, tensors, meta)
    loaded, loaded_meta = load_artifact(path, expected_sha256=meta["sha256"])
    state = state_from_artifact(loaded, loaded_meta, cfg)
    for people in CHAINS:
        assert answer(lm, state.fast_weights(), people[0]) == answer(lm, on_gpu[3], people[0])


def test_a_state_prewoken_on_cuda_serves_the_cpu_agent(tmp_path: Path) -> None:
    """The sleep worker pre-wakes with its base model where the batch slept (on a GPU
    machine, CUDA: ``run_batch`` moved it there); the CPU agent must accept that state
    (its S' is the artifact's, bit for bit), resume from it, and answer as after its own
    full re-wake."""
    from consolidation import prewake
    from consolidation.fast_weights import FastWeights
    from model import HybridLM
    from streams.memory import ModelEngine
    from tests.consolidation.test_prewake import SHA, _events, _rewoken, _turn, _version

    ckpt = shipped_checkpoint("facts-n4")
    cpu_lm, gpu_lm = HybridLM.load(ckpt, device="cpu"), HybridLM.load(ckpt, device="cuda")
    facts = [f"{a} reports to {b}." for people in CHAINS for a, b in itertools.pairwise(people)]
    turns = [_turn(i, text=text) for i, text in enumerate(facts)]
    full, resumed = (ModelEngine(cpu_lm, base_model_version="7") for _ in range(2))
    for engine in (full, resumed):
        engine.answer(turns)
    # The version folds in the first chain; the other two are pending after it.
    published, fw = _version(cpu_lm, full, upto=2)
    tail = [t for t in turns if t.offset > published.watermark]
    (woken,) = prewake.wake_tails(gpu_lm, [(published, fw.tensors, _events(tail))])
    prewake.write(tmp_path, SHA, prewake.Prewoken(woken, woken_to=turns[-1].offset))
    back = prewake.read(tmp_path, SHA)
    assert back is not None and back.state.S[0].device.type == "cpu"

    assert full.swap(published, fw) == "swapped"
    assert resumed.swap(published, FastWeights(**{**fw.__dict__, "prewoken": back})) == "swapped"
    # The swaps are applied by each engine's next answer call: the resumed one from the
    # pre-woken state (no full re-wake), with nothing after it left to wake again.
    for k, people in enumerate(CHAINS):
        ask = [_turn(100 + k, role="user", text=f"who is {people[0]}'s boss?")]
        rewoken = [_rewoken("yes"), _rewoken("no")]
        replies = [r.text for r in resumed.answer(ask)]
        if k == 0:
            assert [_rewoken("yes"), _rewoken("no")] == rewoken
        assert replies == [r.text for r in full.answer(ask)]
    a, b = full.memory("u1").state, resumed.memory("u1").state
    assert [e.offset for e in b.pending_events] == [e.offset for e in a.pending_events]
    for x, y in zip(a.S, b.S, strict=True):
        err = float((y - x).abs().max() / x.abs().max().clamp_min(1e-12))
        assert err < TOLERANCE, err
