"""One-token-at-a-time gated delta rule for decoding (the recurrent form, no chunking).

Same signature as the chunked op; used by the dispatch when T is tiny (decoding), where
padding to a chunk would waste work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.ops.naive import recurrent_step


def fused_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g, beta ``[B, T, H]``; state in fp32."""
    B, T, H, K = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K**-0.5 if scale is None else scale
    S = (
        q.new_zeros(B, H, K, v.shape[-1], dtype=compute)
        if initial_state is None
        else initial_state.to(compute)
    )
    outs = []
    for t in range(T):
        S, o = recurrent_step(*(x[:, t].to(compute) for x in (q, k, v, g, beta)), S=S, scale=scale)
        outs.append(o.to(v.dtype))
    return torch.stack(outs, dim=1), (S if output_final_state else None)
