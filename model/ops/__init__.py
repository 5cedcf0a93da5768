"""Gated delta rule kernels: naive (oracle), chunked (torch), recurrent (decode), dispatch."""

from model.ops.chunk import chunk_gated_delta_rule
from model.ops.dispatch import backend_for, gated_delta_rule
from model.ops.fused_recurrent import fused_recurrent_gated_delta_rule
from model.ops.naive import naive_recurrent_gated_delta_rule

__all__ = [
    "backend_for",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
]
