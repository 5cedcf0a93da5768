"""Shared yardsticks of the model tests."""

from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error: max |a - e| / max(max |e|, tiny), the one yardstick of these tests."""
    denom = expected.detach().abs().max().clamp_min(1e-12)
    return float((actual.detach() - expected.detach()).abs().max() / denom)
