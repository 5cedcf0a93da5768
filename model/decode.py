"""``OneTokenStep``: one decode step of the whole stack for the rows of a batched decode.

The same math as ``HybridLM._stack`` over one token (blocks.py), written for the step a
reply repeats up to ``max_new_tokens`` times. On a CPU a step of this small model is
almost all per-op and per-module overhead, so this path:

- calls no ``nn.Module``: the weights are read once, when the step is built;
- fuses the projections that read the same input into one matmul: GDN's q/k/v, decay,
  write strength and output gate; the MLP's gate and up;
- keeps tokens as ``(B, D)`` rows (no time axis) and computes RoPE's angles once for
  every attention layer.

On a 2-core Intel CPU a step took 1.2-1.3 ms instead of 2.1-2.2 (B = 1), and ``somna
bench answer``'s decodes 1.3-2x less (31 tokens, 1 scope: 27-33 ms instead of 40-44).
``tests/model/test_decode.py`` checks it against ``_stack`` step by step. Build one per
``generate_batch`` call: the fused weights are copies, and a model being trained changes
its weights between calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from model.blocks import Block, GatedDeltaNet, _freqs, rms_norm, rotate_half
from model.ops.naive import recurrent_step
from model.ops.utils import l2norm
from model.state import DecodeRows

if TYPE_CHECKING:
    from model.hybrid import HybridLM


@dataclass
class _GDN:
    w_in: Tensor  # (3HD + 2H + HD, D): q, k, v | a | b | output gate
    conv: Tensor | None  # (3HD, size) depthwise taps, or None (no short conv)
    neg_A: Tensor  # (H,) fp32, -exp(A_log)
    dt_bias: Tensor
    o_norm: Tensor
    w_out: Tensor


@dataclass
class _Attention:
    w_qkv: Tensor
    w_out: Tensor


@dataclass
class _Layer:
    norm1: Tensor
    mixer: _GDN | _Attention
    norm2: Tensor
    w_gate_up: Tensor  # (2 * d_ff, D)
    w_down: Tensor


class OneTokenStep:
    """``step(rows, ids)``: wake one token per row into ``rows`` (in place) -> logits."""

    def __init__(self, lm: HybridLM) -> None:
        cfg = lm.config
        self.cfg = cfg
        self.embed: Tensor = lm.embed.weight
        self.head: Tensor = lm.head.weight
        self.norm: Tensor = lm.norm.weight
        self.layers = [self._layer(block) for block in lm.blocks]
        self.freqs = _freqs(cfg.head_dim // 2, cfg.rope_base, self.embed.device)

    @staticmethod
    def _layer(block: Block) -> _Layer:
        m = block.mixer
        mixer: _GDN | _Attention
        if isinstance(m, GatedDeltaNet):
            mixer = _GDN(
                w_in=torch.cat([m.qkv.weight, m.a_proj.weight, m.b_proj.weight, m.gate.weight]),
                conv=None if m.conv is None else m.conv.weight[:, 0],
                neg_A=-m.A_log.float().exp(),
                dt_bias=m.dt_bias,
                o_norm=m.o_norm.weight,
                w_out=m.o_proj.weight,
            )
        else:
            mixer = _Attention(w_qkv=m.qkv.weight, w_out=m.o_proj.weight)
        return _Layer(
            norm1=block.norm1.weight,
            mixer=mixer,
            norm2=block.norm2.weight,
            w_gate_up=torch.cat([block.mlp.gate.weight, block.mlp.up.weight]),
            w_down=block.mlp.down.weight,
        )

    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        return rms_norm(x, weight, self.cfg.norm_eps)

    def step(self, rows: DecodeRows, ids: Tensor) -> Tensor:
        """Token ``ids (B,)`` at each row's position ``rows.pos``; S, conv and KV of
        ``rows`` move on (``rows.pos`` is the caller's). Returns logits ``(B, V)``."""
        x = F.embedding(ids, self.embed)  # (B, D)
        angles = rows.pos.to(x.device).double()[:, None] * self.freqs  # (B, half)
        cos, sin = angles.cos()[:, None].to(x.dtype), angles.sin()[:, None].to(x.dtype)
        g = a = 0  # index of the next GDN / attention layer's state
        for layer in self.layers:
            h = self._rms(x, layer.norm1)
            if isinstance(layer.mixer, _GDN):
                y, rows.S[g], rows.conv[g] = self._gdn(layer.mixer, h, rows.S[g], rows.conv[g])
                g += 1
            else:
                y = self._attention(layer.mixer, h, rows, a, cos, sin)
                a += 1
            x = x + y
            gate, up = F.linear(self._rms(x, layer.norm2), layer.w_gate_up).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, layer.w_down)
        return F.linear(self._rms(x, self.norm), self.head)

    def _gdn(
        self, m: _GDN, h: Tensor, S: Tensor, conv: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        B = h.shape[0]
        H, Dh = self.cfg.n_heads, self.cfg.head_dim
        qkv, a, b, gate = F.linear(h, m.w_in).split([3 * H * Dh, H, H, H * Dh], -1)
        if m.conv is not None:
            # The short causal conv over this token and the size - 1 cached before it.
            if conv is None:
                xp = F.pad(qkv[:, :, None], (m.conv.shape[1] - 1, 0))
            else:
                xp = torch.cat([conv.to(qkv.dtype), qkv[:, :, None]], dim=-1)
            qkv = F.silu((xp * m.conv.to(qkv.dtype)).sum(-1))
            conv = xp[..., 1:]
        compute = torch.float64 if h.dtype == torch.float64 else torch.float32
        q, k, v = qkv.view(B, 3, H, Dh).to(compute).unbind(1)  # each (B, H, Dh)
        g = (m.neg_A * F.softplus(a.float() + m.dt_bias)).to(compute)  # log decay
        beta = torch.sigmoid(b).to(compute)
        S, o = recurrent_step(l2norm(q), l2norm(k), v, g, beta, S.to(compute), Dh**-0.5)
        o = self._rms(o.to(h.dtype), m.o_norm) * F.silu(gate.view(B, H, Dh))
        return F.linear(o.reshape(B, H * Dh), m.w_out), S, conv

    def _attention(
        self,
        m: _Attention,
        h: Tensor,
        rows: DecodeRows,
        a: int,
        cos: Tensor,
        sin: Tensor,
    ) -> Tensor:
        B = h.shape[0]
        H, Dh, W = self.cfg.n_heads, self.cfg.head_dim, self.cfg.window
        q, k, v = F.linear(h, m.w_qkv).view(B, 3, H, Dh).unbind(1)  # each (B, H, Dh)
        q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
        buf = rows.kv[a]
        buf.make_room(k[:, :, None], W)
        assert buf.k is not None and buf.v is not None
        buf.k[:, :, buf.filled] = k.to(buf.k.dtype)
        buf.v[:, :, buf.filled] = v.to(buf.v.dtype)
        buf.filled += 1
        # The token sees the last W columns, less each row's left padding.
        lo = max(0, buf.filled - W)
        cols = torch.arange(lo, buf.filled, device=h.device)
        mask = (cols >= buf.first.to(h.device)[:, None])[:, None, None]  # (B, 1, 1, n)
        keys = buf.k[:, :, lo : buf.filled].to(q.dtype)
        values = buf.v[:, :, lo : buf.filled].to(q.dtype)
        y = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask)
        return F.linear(y.reshape(B, H * Dh), m.w_out)
