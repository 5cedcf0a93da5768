"""The gated delta rule, one time step at a time: slow, obvious, and the oracle.

    S_t = a_t * S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,    o_t = S_t q_t

written, as in fla, with S stored transposed as ``[K, V]`` so that o_t = S_t^T q_t and
the update reads ``S_t = a_t S_{t-1} + b_t k_t (v_t - a_t S_{t-1}^T k_t)^T``.
``g_t = log a_t`` (<= 0) and q is multiplied by ``scale`` (default K ** -0.5, as fla).
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.ops.utils import mask_padding


def naive_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Loop over time in fp32 (fp64 if the inputs are fp64).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g (log decay), beta: ``[B, T, H]``.
        initial_state: ``[B, H, K, V]`` or None (zeros).
        lengths: ``[B]`` valid steps per row (right padding); later steps leave S alone.
    Returns:
        o ``[B, T, H, V]`` in v's dtype, and the final state ``[B, H, K, V]`` (fp32/fp64)
        when ``output_final_state``.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = v.dtype
    g, beta = mask_padding(g, beta, lengths)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        S, o = recurrent_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S, scale)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (S if output_final_state else None)


def recurrent_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, S: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """One step for all batch rows and heads: q, k ``[B, H, K]``, v ``[B, H, V]``,
    g, beta ``[B, H]``, S ``[B, H, K, V]``. Returns (new S, o ``[B, H, V]``)."""
    S = S * g.exp()[..., None, None]
    # k^T S and q^T S as batched matmuls: einsum's set-up cost more than the product on
    # a decode step's tiny rows (CPU).
    v_new = (v - (k[..., None, :] @ S).squeeze(-2)) * beta[..., None]
    S = S + k[..., :, None] * v_new[..., None, :]
    o = ((q * scale)[..., None, :] @ S).squeeze(-2)
    return S, o
