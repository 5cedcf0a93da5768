"""Tiny configs and helpers for the model tests (fast on a shared 2-core CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import HybridConfig, HybridLM


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _nan_filled_empty(monkeypatch):
    """torch.empty returns NaNs, so code that reads memory it never wrote fails loudly."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture
def tiny_config() -> HybridConfig:
    return HybridConfig(
        d_model=64,
        n_layers=4,
        pattern="GA",
        n_heads=2,
        head_dim=16,
        window=12,
        chunk=24,
        sleep_passes=2,
        op_chunk_size=16,
    )


@pytest.fixture
def tiny_lm(tiny_config: HybridConfig) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(tiny_config).eval()


CHECKPOINT = Path(__file__).resolve().parents[2] / "model" / "checkpoints" / "facts-n4"


@pytest.fixture
def loud_lm(tiny_lm: HybridLM) -> HybridLM:
    """Random init with full-size residual branches: the default init keeps attention's
    share of the logits so small that a wrong KV row, mask or position would hardly move
    the argmax (the batched decode and wake tests need to see those)."""
    torch.manual_seed(1)
    for module in tiny_lm.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
    return tiny_lm


@pytest.fixture(scope="module")
def trained() -> HybridLM:
    """The shipped checkpoint (facts-n4)."""
    if not (CHECKPOINT / "model.safetensors").exists():
        pytest.skip(f"no shipped checkpoint at {CHECKPOINT}")
    return HybridLM.load(CHECKPOINT)
