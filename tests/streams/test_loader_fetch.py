"""A burst of published fast weights read from the sleep worker's local copies
(ScopeLoader.fetch_many): the scopes a question waits for first."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from consolidation import blobs, fast_weights
from consolidation.tracking import sha256_file
from infra.settings import Settings
from streams.loader import ScopeLoader
from streams.records import FastWeightsPublished


def _burst(data_dir: Path, n: int) -> list[FastWeightsPublished]:
    """``n`` scopes' publishes whose copies a sleep worker of ``data_dir`` recorded."""
    out = []
    for k in range(n):
        scope = f"user:{k}"
        f = data_dir / "made" / f"{k}.safetensors"
        fast_weights.write_artifact(f, {"s0": torch.full((2, 3), float(k))}, {"scope_id": scope})
        pub = FastWeightsPublished(
            scope_id=scope, version="1", artifact_uri=f"mlflow-artifacts:/{k}",
            sha256=sha256_file(f), watermark=10, base_model_version="1", job_id=f"j{k}",
        )  # fmt: skip
        blobs.put(blobs.root(data_dir), pub, f)
        out.append(pub)
    return out


async def _fetch_all(loader: ScopeLoader, burst: list, wanted) -> list[tuple[int, object]]:
    return [got async for got in loader.fetch_many(burst, wanted=wanted)]


def test_the_scopes_waited_for_are_read_first_and_each_copy_once(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr("streams.loader.FETCH_CONCURRENCY", 1)  # the order they start in
    # Unreachable tracking server: local copies recorded here need no registry lookup.
    loader = ScopeLoader(Settings(data_dir=tmp_path, mlflow_uri="http://127.0.0.1:9"))
    burst = _burst(tmp_path, 6)
    got = asyncio.run(_fetch_all(loader, burst, wanted=lambda s: s in {"user:4", "user:2"}))
    assert [i for i, _ in got] == [2, 4, 0, 1, 3, 5]
    for i, weights in got:
        assert weights.scope_id == f"user:{i}"
        assert torch.equal(weights.tensors["s0"], torch.full((2, 3), float(i)))


def test_a_fetch_that_fails_unexpectedly_refuses_only_its_own_scope(
    tmp_path: Path, monkeypatch
) -> None:
    loader = ScopeLoader(Settings(data_dir=tmp_path, mlflow_uri="http://127.0.0.1:9"))
    burst = _burst(tmp_path, 3)
    fetch_weights = loader.fetch_weights

    async def broken_for_one(published, **kw):
        if published.scope_id == "user:1":
            raise RuntimeError("a bug")
        return await fetch_weights(published, **kw)

    monkeypatch.setattr(loader, "fetch_weights", broken_for_one)
    got = dict(asyncio.run(_fetch_all(loader, burst, wanted=lambda s: False)))
    assert got[1] is None  # refused: the previous version keeps serving
    assert got[0].scope_id == "user:0" and got[2].scope_id == "user:2"


def test_the_others_wait_unless_a_question_comes_for_them(tmp_path: Path) -> None:
    loader = ScopeLoader(Settings(data_dir=tmp_path, mlflow_uri="http://127.0.0.1:9"))
    burst = _burst(tmp_path, 4)
    defer = 2.0

    async def scenario() -> list[tuple[int, float]]:
        wanted: set[str] = set()
        nudged = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: failures.append(context))
        start, got = loop.time(), []

        async def question_for_scope_2() -> None:
            await asyncio.sleep(0.05)
            wanted.add("user:2")
            nudged.set()

        asker = asyncio.create_task(question_for_scope_2())
        async for i, weights in loader.fetch_many(
            burst, wanted=wanted.__contains__, defer=defer, nudged=nudged
        ):
            assert weights.scope_id == f"user:{i}"
            got.append((i, loop.time() - start))
        await asker
        return got

    failures: list[dict] = []  # a worker's error would only be logged, at its end
    got = asyncio.run(scenario())
    assert not failures
    assert got[0][0] == 2 and got[0][1] < defer / 2, "read as soon as a question waits"
    assert sorted(i for i, _ in got[1:]) == [0, 1, 3]
    assert all(t >= defer for _, t in got[1:]), "the others only after the deferral"
