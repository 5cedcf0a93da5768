"""The one entry point every layer calls: ``gated_delta_rule``.

On CUDA with fla importable and a bf16/fp16 input, fla's Triton ``chunk_gated_delta_rule``
runs; everywhere else the pure-torch chunked op (or, for a handful of steps, the recurrent
form). ``SOMNA_FORCE_TORCH_OPS=1`` forces the torch path (parity checks, debugging).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch
from torch import Tensor

from model.ops.chunk import chunk_gated_delta_rule
from model.ops.fused_recurrent import fused_recurrent_gated_delta_rule
from model.ops.utils import l2norm, mask_padding

# Fewer steps than this go through the recurrent form: padding 1 decode step to a 64-step
# chunk would be waste.
RECURRENT_MAX_T = 4
FLA_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _fla_chunk() -> Any | None:
    """fla's chunk kernel, or None when fla is not installed (imported lazily: fla pulls
    in Triton, which only exists on GPU machines)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except Exception:  # ImportError, or a Triton that cannot initialise
        return None
    return fla_chunk


@functools.cache
def _fla_backward_ok() -> bool:
    """False where fla's gated backward refuses to run: Hopper with Triton >= 3.4 and
    < 3.7.1 (fla 0.6 raises there, its issue #640). Seen on the lent H100 (Triton 3.6):
    forward (sleep) ran, training raised in backward."""
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except Exception:  # an fla without these flags has no such guard
        return True
    return not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _on_cuda(x: Tensor) -> bool:
    return x.is_cuda  # one place, so tests can stand in a fake fla on CPU


def torch_ops_forced() -> bool:
    return os.environ.get("SOMNA_FORCE_TORCH_OPS", "") not in ("", "0", "false", "False")


def backend_for(q: Tensor) -> str:
    """Which implementation ``gated_delta_rule`` picks for this input: "fla" or "torch"."""
    if not _on_cuda(q) or torch_ops_forced():
        return "torch"
    if q.dtype not in FLA_DTYPES:
        return "torch"  # fla's chunk kernel asserts on fp32 inputs
    if _fla_chunk() is None:
        _warn_once("fla is not importable: the gated delta rule falls back to pure torch on CUDA")
        return "torch"
    if torch.is_grad_enabled() and q.requires_grad and not _fla_backward_ok():
        _warn_once("fla's backward refuses this GPU's Triton: training uses the torch ops")
        return "torch"
    return "fla"


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    *,
    scale: float | None = None,
    output_final_state: bool = True,
    lengths: Tensor | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """o, S_final for q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g, beta ``[B, T, H]``.

    q and k must be L2-normalised, or pass ``use_qk_l2norm=True`` to have it done here (fla
    fuses it into its kernel, saving memory-bound passes). g is the log decay (<= 0). initial_state is
    ``[B, H, K, V]`` (fp32); lengths ``[B]`` marks right padding (steps past it are no-ops).
    ``backend`` ("torch", "fla", "recurrent") overrides the automatic choice (an explicit
    "fla" with fp32 inputs is passed through, for parity checks of fla versions that take it).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must be [B, T, H, K] and v [B, T, H, V]: got {q.shape}, {k.shape}, {v.shape}"
        )
    if g.shape != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(
            f"g and beta must be [B, T, H] = {tuple(q.shape[:3])}: "
            f"got {tuple(g.shape)}, {tuple(beta.shape)}"
        )
    if backend is None and q.shape[1] <= RECURRENT_MAX_T:
        backend = "recurrent"  # decoding: a few steps, on any device
    choice = backend or backend_for(q)
    if choice == "fla":
        return _run_fla(
            q, k, v, g, beta, initial_state, scale, output_final_state, lengths, use_qk_l2norm
        )
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if choice == "recurrent":
        g, beta = mask_padding(g, beta, lengths)
        return fused_recurrent_gated_delta_rule(
            q, k, v, g, beta, scale, initial_state, output_final_state
        )
    if choice != "torch":
        raise NotImplementedError(f"unknown gated delta rule backend {choice!r}")
    return chunk_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, lengths, chunk_size
    )


def _run_fla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None,
    scale: float | None,
    output_final_state: bool,
    lengths: Tensor | None,
    use_qk_l2norm: bool,
) -> tuple[Tensor, Tensor | None]:
    fla_chunk = _fla_chunk()
    if fla_chunk is None:
        raise NotImplementedError("backend 'fla' asked for but fla is not importable")
    if not _on_cuda(q):
        raise NotImplementedError("fla's Triton kernels run on CUDA tensors only")
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        raise NotImplementedError("fla's chunk kernel takes head dims up to 256")
    # Ragged rows: the same zero-g, zero-beta padding as the torch path; fla then leaves S
    # untouched past each row's length, so no cu_seqlens repacking is needed.
    g, beta = mask_padding(g.float(), beta, lengths)
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    o, S = fla_chunk(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        g.contiguous(),
        beta.contiguous(),
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
    )
    return o, S
