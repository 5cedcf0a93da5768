"""A state round-trips through its fast-weight artifact bit for bit; tampering is caught."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from model import HybridConfig, HybridLM, MemoryState
from model.artifact import load_artifact, save_artifact, state_from_artifact, to_artifact
from model.exceptions import ArtifactError, StateMismatchError


@pytest.fixture
def slept(tiny_lm: HybridLM) -> MemoryState:
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    return tiny_lm.sleep(x, tiny_lm.init_state(), passes=2, watermarks=41)


def test_state_round_trips_bit_for_bit(tiny_lm, slept, tmp_path):
    cfg = tiny_lm.config
    meta = save_artifact(
        tmp_path / "fw.safetensors", slept, base_model_version="3", watermark=41, config=cfg
    )
    tensors, loaded_meta = load_artifact(
        tmp_path / "fw.safetensors", expected_sha256=meta["sha256"]
    )
    assert loaded_meta == meta
    assert loaded_meta["watermark"] == "41" and loaded_meta["base_model_version"] == "3"
    assert loaded_meta["config_hash"] == cfg.config_hash()
    state = state_from_artifact(tensors, loaded_meta, cfg)
    assert state.watermark == 41
    for a, b in zip(state.base_S, slept.base_S, strict=True):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))
    # Same content, same hash: the sha256 does not depend on the file layout.
    assert to_artifact(state, base_model_version="3", watermark=41, config=cfg)[1] == meta


def test_tampering_and_wrong_sha_are_rejected(tiny_lm, slept, tmp_path):
    path = tmp_path / "fw.safetensors"
    meta = save_artifact(path, slept, base_model_version="3", watermark=41, config=tiny_lm.config)
    with pytest.raises(ArtifactError, match="expected"):
        load_artifact(path, expected_sha256="0" * 64)
    tensors, _ = load_artifact(path)
    forged = dict(meta, watermark="99")  # claims more history than was consolidated
    save_file(tensors, str(tmp_path / "forged.safetensors"), metadata=forged)
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(tmp_path / "forged.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="readable"):
        load_artifact(tmp_path / "junk.safetensors")


def test_artifact_of_another_config_is_refused(tiny_lm, slept, tmp_path):
    tensors, meta = to_artifact(slept, base_model_version="3", watermark=41, config=tiny_lm.config)
    other = HybridConfig(d_model=64, n_layers=4, pattern="GA", n_heads=2, head_dim=16, window=8)
    with pytest.raises(StateMismatchError, match="config"):
        state_from_artifact(tensors, meta, other)
    with pytest.raises(StateMismatchError, match="config"):
        to_artifact(slept, base_model_version="3", watermark=41, config=other)
