"""Tiny configs and helpers for the model tests (fast on a shared 2-core CPU)."""

from __future__ import annotations

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
