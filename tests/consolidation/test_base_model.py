"""Registering the base model against a real MLflow server: workers starting together."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from consolidation import tracking
from consolidation.base_model import (
    CHECKPOINT_SHA_TAG,
    PRODUCTION,
    BaseModel,
    checkpoint_sha256,
    ensure_base_model,
    register_base_model,
)
from consolidation.base_model_watch import BaseModelWatch
from tests.consolidation.conftest import tiny_checkpoint

pytestmark = pytest.mark.mlflow

WORKERS = 3


def test_concurrent_first_starts_register_one_version(mlflow_uri: str, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    name = f"somna-hybrid-race-{uuid.uuid4().hex[:8]}"  # an empty registered model of its own
    start = threading.Barrier(WORKERS)

    def worker(_: int) -> str:
        start.wait()  # all find no production alias, then all register
        return ensure_base_model(mlflow_uri, checkpoint_dir=ckpt, name=name).version

    with ThreadPoolExecutor(WORKERS) as pool:
        served = set(pool.map(worker, range(WORKERS)))

    c = tracking.client(mlflow_uri)
    versions = c.search_model_versions(f"name = '{name}'")
    assert len(served) == 1
    assert [mv.version for mv in versions] == list(served)
    assert c.get_model_version_by_alias(name, PRODUCTION).version in served
    assert versions[0].tags[CHECKPOINT_SHA_TAG] == checkpoint_sha256(ckpt)


def test_a_registered_checkpoint_is_reused_not_registered_again(
    mlflow_uri: str, tmp_path: Path
) -> None:
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    name = f"somna-hybrid-reuse-{uuid.uuid4().hex[:8]}"
    first = register_base_model(mlflow_uri, ckpt, alias="candidate", name=name)
    # No production alias yet: the version holding the same checkpoint becomes production.
    served = ensure_base_model(mlflow_uri, checkpoint_dir=ckpt, name=name)
    assert served.version == first
    assert len(tracking.client(mlflow_uri).search_model_versions(f"name = '{name}'")) == 1


async def test_watch_hands_over_a_new_production_version(mlflow_uri: str, tmp_path: Path) -> None:
    name = f"somna-hybrid-watch-{uuid.uuid4().hex[:8]}"
    first = tiny_checkpoint(tmp_path / "first")
    served = ensure_base_model(mlflow_uri, checkpoint_dir=first, name=name)
    taken: list[BaseModel] = []

    async def take(base: BaseModel) -> None:
        taken.append(base)

    watch = BaseModelWatch(mlflow_uri, served.version, take, name=name)
    assert await watch.check() is None  # production unchanged

    second = tiny_checkpoint(tmp_path / "second")
    (second / "note.txt").write_text("another checkpoint")  # other bytes, other sha256
    new_version = register_base_model(mlflow_uri, second, name=name)
    base = await watch.check()
    assert base is not None and base.version == new_version != served.version
    assert [b.version for b in taken] == [new_version]
    assert watch.served_version == new_version
    assert await watch.check() is None  # handed over once
