"""Small helpers shared by the gated delta rule implementations."""

from __future__ import annotations

import torch
from torch import Tensor


def mask_padding(g: Tensor, beta: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """Make steps at and after ``lengths[b]`` no-ops: g = 0 (decay 1) and beta = 0 (no write).

    g, beta: ``[B, T, H]``; lengths: ``[B]`` ints. With both zero, S_t = S_{t-1} exactly, so a
    right-padded row ends with the same state as the unpadded row (any kernel, fla too).
    """
    if lengths is None:
        return g, beta
    T = g.shape[1]
    valid = torch.arange(T, device=g.device)[None, :] < lengths.to(g.device)[:, None]
    valid = valid[..., None]  # [B, T, 1]
    return g * valid, beta * valid


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Unit vectors along the last dim (fp32 math, input dtype out)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)
