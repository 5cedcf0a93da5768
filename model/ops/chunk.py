"""Chunked gated delta rule in pure torch: the CPU path and the reference for fla.

Within a chunk of C steps the recurrence is solved in closed form (the WY / UT-transform
idea of DeltaNet): with cumulative log decay gamma_r and Gamma_r = exp(gamma_r),

    U   = (I + A)^-1 (beta V  -  beta Gamma K S0)        # the values actually written
    A   = strictly-lower( beta_r Gamma_r / Gamma_j  k_r . k_j )
    O   = (Gamma Q) S0  +  tril( Gamma_r / Gamma_j  q_r . k_j ) U
    S_C = Gamma_C S0  +  (Gamma_C / Gamma  K)^T U

so only the C x C triangular solve and a few matmuls run per chunk, and one short loop
carries S from chunk to chunk. Everything is differentiable through autograd; math runs in
fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.ops.utils import mask_padding


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    lengths: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Args as ``naive_recurrent_gated_delta_rule``: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``,
    g (log decay) and beta ``[B, T, H]``, initial_state ``[B, H, K, V]``, lengths ``[B]``.

    Returns o ``[B, T, H, V]`` (v's dtype) and the final state ``[B, H, K, V]`` (fp32/fp64).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K**-0.5 if scale is None else scale
    g, beta = mask_padding(g, beta, lengths)
    C = chunk_size
    pad = (-T) % C
    # Padded steps have g = 0 and beta = 0: they change nothing.
    q, k, v = (F.pad(x.to(ct), (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x.to(ct), (0, 0, 0, pad)) for x in (g, beta))
    N = (T + pad) // C

    def blocks(x: Tensor) -> Tensor:  # [B, T', H, D] -> [B, H, N, C, D]
        return x.transpose(1, 2).reshape(B, H, N, C, x.shape[-1])

    q, k, v = blocks(q) * scale, blocks(k), blocks(v)
    g = g.transpose(1, 2).reshape(B, H, N, C)
    beta = beta.transpose(1, 2).reshape(B, H, N, C)

    gc = g.cumsum(-1)  # gamma_r within each chunk
    idx = torch.arange(C, device=q.device)
    incl = idx[:, None] >= idx[None, :]  # j <= r
    strict = idx[:, None] > idx[None, :]  # j < r
    # Gamma_r / Gamma_j on and below the diagonal; -inf above so exp gives exactly 0.
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(~incl, float("-inf")).exp()

    A = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay).masked_fill(~strict, 0.0)
    rhs = torch.cat([beta[..., None] * v, (beta * gc.exp())[..., None] * k], dim=-1)
    # (I + A) is unit lower triangular: one batched forward substitution for all chunks.
    W = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    Wv, Wk = W[..., :V], W[..., V:]  # U = Wv - Wk S0

    P = (q @ k.transpose(-1, -2)) * decay  # [B, H, N, C, C], zero above the diagonal
    q_decayed = q * gc.exp()[..., None]
    g_last = gc[..., -1]  # [B, H, N]
    k_to_end = k * (g_last[..., None] - gc).exp()[..., None]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(ct)
    outs = []
    for n in range(N):
        U = Wv[:, :, n] - Wk[:, :, n] @ S  # [B, H, C, V]
        outs.append(q_decayed[:, :, n] @ S + P[:, :, n] @ U)
        S = S * g_last[:, :, n, None, None].exp() + k_to_end[:, :, n].transpose(-1, -2) @ U
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, V)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), (S if output_final_state else None)
