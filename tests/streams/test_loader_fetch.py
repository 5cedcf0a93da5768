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
