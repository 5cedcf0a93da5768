"""The layers of the hybrid: RMSNorm, SwiGLU MLP, Gated DeltaNet, sliding-window attention.

Each mixer takes its slice of the running state and returns the updated slice, so the
model (hybrid.py) can run a sequence in one go, token by token, or chunk by chunk.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import HybridConfig
from model.ops import gated_delta_rule


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim: fp32 math, the input's dtype out."""
    xf = x.float()
    # By hand: on CPU, F.rms_norm took ~50 us a call on a decode step's tiny rows (11
    # calls a step, a quarter of its time); these five ops take ~15 (same result).
    scale = torch.rsqrt((xf * xf).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return (xf * scale).to(x.dtype) * weight


class SwiGLU(nn.Module):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ShortConv(nn.Module):
    """Depthwise causal conv over time with a cache of the last (size - 1) inputs."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.randn(channels, 1, size) / math.sqrt(size))

    def forward(
        self, x: Tensor, cache: Tensor | None, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        # x: (B, T, C); cache: (B, C, size - 1) or None (zeros: the start of a sequence).
        # Right-padded rows (``lengths``): the new cache is each row's last size - 1 valid
        # inputs (the conv is causal, so padding never reaches a valid output).
        xt = x.transpose(1, 2)
        if cache is None:
            xp = F.pad(xt, (self.size - 1, 0))
        else:
            xp = torch.cat([cache.to(xt.dtype), xt], dim=-1)
        if xp.shape[-1] == self.size:
            # One token (a decode step): a weighted sum over the window. conv1d's set-up
            # made it the dearest op of a step on CPU (0.15 ms of ~2.5).
            y = (xp * self.weight[:, 0].to(xt.dtype)).sum(-1, keepdim=True)
        else:
            y = F.conv1d(xp, self.weight.to(xt.dtype), groups=xt.shape[1])
        if lengths is None:
            new_cache = xp[..., xp.shape[-1] - (self.size - 1) :]
        else:
            cols = lengths.to(xp.device)[:, None] + torch.arange(self.size - 1, device=xp.device)
            new_cache = xp.gather(-1, cols[:, None].expand(-1, xp.shape[1], -1))
        return F.silu(y).transpose(1, 2), new_cache


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet mixer; its per-head state S ``(B, H, K, V)`` is the fast-weight memory."""

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        H, Dh = cfg.n_heads, cfg.head_dim
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * H * Dh, bias=False)
        self.conv = ShortConv(3 * H * Dh, cfg.conv_size) if cfg.conv_size else None
        self.a_proj = nn.Linear(cfg.d_model, H, bias=False)  # decay input
        self.b_proj = nn.Linear(cfg.d_model, H, bias=False)  # write strength beta
        self.gate = nn.Linear(cfg.d_model, H * Dh, bias=False)  # output gate
        self.o_norm = RMSNorm(Dh, cfg.norm_eps)
        self.o_proj = nn.Linear(H * Dh, cfg.d_model, bias=False)
        # Mamba2-style decay init: A in [1, 16], dt in [1e-3, 1e-1], so a_t spans ~0.2..0.999.
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(
        self,
        x: Tensor,
        S: Tensor,
        conv_cache: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """x ``(B, T, D)``, S ``(B, H, K, V)`` fp32 -> (y, new S, new conv cache)."""
        B, T, _ = x.shape
        H, Dh = self.cfg.n_heads, self.cfg.head_dim
        qkv = self.qkv(x)
        new_cache = None
        if self.conv is not None:
            qkv, new_cache = self.conv(qkv, conv_cache, lengths)
        q, k, v = qkv.view(B, T, 3, H, Dh).unbind(2)  # each (B, T, H, Dh)
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias)
        beta = torch.sigmoid(self.b_proj(x))
        o, S = gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            S,
            lengths=lengths,
            chunk_size=self.cfg.op_chunk_size,
            use_qk_l2norm=True,
        )
        o = self.o_norm(o) * F.silu(self.gate(x).view(B, T, H, Dh))
        return self.o_proj(o.reshape(B, T, H * Dh)), S, new_cache


@functools.cache
def _freqs(half: int, base: float, device: torch.device) -> Tensor:
    # fp64 angles: a long-lived scope reaches positions where fp32 would lose the phase.
    # Cached: rebuilding them took three of rope's ops on every decode step. Made in
    # inference mode they are still usable outside it: no gradient ever flows into them.
    return base ** (-torch.arange(half, device=device, dtype=torch.float64) / half)


def rope(q: Tensor, k: Tensor, positions: Tensor, base: float) -> tuple[Tensor, Tensor]:
    """Rotate pairs of channels of q and k ``(B, H, T, Dh)`` by position (rotate-half
    form); positions ``(T,)``, or ``(B, T)`` when each row is at its own position. The
    angles are computed once for both."""
    half = q.shape[-1] // 2
    angles = positions.double()[..., None] * _freqs(half, base, q.device)  # (T|B, T, half)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, half): the same angle for every head
    cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
    return rotate_half(q, cos, sin), rotate_half(k, cos, sin)


def rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE's rotation of ``x``'s channel pairs (i, i + half) by angles given as their
    cos and sin (broadcast to ``x`` without its last dim halved)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class KVBuffer:
    """The KV cache of one attention layer for the rows of a batched decode.

    Rows have different histories, so their caches are left-padded to a common width;
    all rows take the same number of tokens per step, so new keys go to the same columns
    for every row and are written in place into spare capacity (no copy of the cache per
    step). Column c holds a key of row b iff ``first[b] <= c < filled``.
    """

    k: Tensor | None  # (B, H, capacity, Dh), rotated keys; None: nothing cached yet
    v: Tensor | None
    filled: int  # columns in use
    first: Tensor  # (B,) the first column that holds a key of the row

    def make_room(self, k: Tensor, window: int) -> None:
        """Room for the T new columns of ``k (B, H, T, Dh)``: when full, keep only the
        last window - 1 columns (older keys are out of every later token's window)."""
        T = k.shape[2]
        if self.k is not None and self.filled + T <= self.k.shape[2]:
            return
        keep = min(self.filled, window - 1)
        start = self.filled - keep
        spare = max(T, 16)  # decode steps before the next copy: wider costs attention time
        if self.k is None or self.v is None:
            shape = (k.shape[0], k.shape[1], spare, k.shape[3])
            self.k, self.v = k.new_zeros(shape), k.new_zeros(shape)
        else:
            self.k = F.pad(self.k[:, :, start : self.filled], (0, 0, 0, spare))
            self.v = F.pad(self.v[:, :, start : self.filled], (0, 0, 0, spare))
        self.first = (self.first - start).clamp(min=0)
        self.filled = keep


class SlidingWindowAttention(nn.Module):
    """Causal attention over the last ``window`` tokens, with RoPE and a KV cache."""

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.n_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self, x: Tensor, cache: tuple[Tensor, Tensor] | None, pos: int
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x ``(B, T, D)`` at absolute positions pos..pos+T-1; cache k, v ``(B, H, Tc, Dh)``
        holding the Tc tokens before pos (already rotated). Returns y and the trimmed cache."""
        B, T, _ = x.shape
        H, Dh, W = self.cfg.n_heads, self.cfg.head_dim, self.cfg.window
        q, k, v = self.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        qpos = torch.arange(pos, pos + T, device=x.device)
        q, k = rope(q, k, qpos, self.cfg.rope_base)
        if cache is not None and cache[0].shape[2]:
            k = torch.cat([cache[0].to(k.dtype), k], dim=2)
            v = torch.cat([cache[1].to(v.dtype), v], dim=2)
        if k.shape[2] == T and T <= W:
            # No cache and the window covers everything: plain causal (flash kernels).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            kpos = torch.arange(pos + T - k.shape[2], pos + T, device=x.device)
            delta = qpos[:, None] - kpos[None, :]
            mask = (delta >= 0) & (delta < W)  # (T, Tk), True = attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        start = max(0, k.shape[2] - (W - 1))  # the next token sees at most W - 1 earlier ones
        new_cache = (k[:, :, start:], v[:, :, start:])
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * Dh)), new_cache

    def step(self, x: Tensor, buf: KVBuffer, pos: Tensor) -> Tensor:
        """``forward`` for the rows of a batched decode: x ``(B, T, D)``, row b at positions
        pos[b]..pos[b]+T-1, its earlier keys in ``buf`` (updated in place). Returns y."""
        B, T, _ = x.shape
        H, Dh, W = self.cfg.n_heads, self.cfg.head_dim, self.cfg.window
        q, k, v = self.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        cols = torch.arange(T, device=x.device)
        qpos = pos.to(x.device)[:, None] + cols  # (B, T)
        q, k = rope(q, k, qpos, self.cfg.rope_base)
        buf.make_room(k, W)
        assert buf.k is not None and buf.v is not None
        end = buf.filled + T
        buf.k[:, :, buf.filled : end] = k.to(buf.k.dtype)
        buf.v[:, :, buf.filled : end] = v.to(buf.v.dtype)
        buf.filled = end
        col = torch.arange(end, device=x.device)
        delta = qpos[:, :, None] - (qpos[:, -1:, None] + 1 - end + col)  # qpos - kpos
        mask = (delta >= 0) & (delta < W) & (col >= buf.first.to(x.device)[:, None, None])
        keys, values = buf.k[:, :, :end].to(q.dtype), buf.v[:, :, :end].to(v.dtype)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * Dh))


class Block(nn.Module):
    """Pre-norm residual block: mixer (G or A), then SwiGLU."""

    def __init__(self, cfg: HybridConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer: nn.Module = GatedDeltaNet(cfg) if kind == "G" else SlidingWindowAttention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
