"""The lean one-token decode step (model/decode.py) computes what the block stack does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model import HybridLM
from model.decode import OneTokenStep
from model.state import DecodeRows

from .test_generate_batch import scopes


def _rows(lm: HybridLM) -> tuple[DecodeRows, DecodeRows]:
    """The same ragged rows twice (left-padded KV, conv caches not started, pos >> W)."""
    states = scopes(lm)
    return (
        DecodeRows.of(states, list(range(len(states))), lm.device),
        DecodeRows.of(states, list(range(len(states))), lm.device),
    )


@pytest.mark.parametrize("conv_size", [4, 0])
def test_one_token_step_equals_the_block_stack(loud_lm: HybridLM, conv_size: int):
    lm = loud_lm
    if conv_size != lm.config.conv_size:
        torch.manual_seed(2)
        lm = HybridLM(dataclasses.replace(lm.config, conv_size=conv_size)).eval()
    one = OneTokenStep(lm)
    fast, ref = _rows(lm)
    ids = torch.arange(len(fast.rows)) + 65
    # 3 windows' worth: the KV buffers wrap and reallocate on both paths.
    with torch.inference_mode():
        for _ in range(3 * lm.config.window):
            want, ref.S, ref.conv, _ = lm._stack(ids[:, None], ref.S, ref.conv, ref.kv, ref.pos)
            ref.pos = ref.pos + 1
            got = one.step(fast, ids)
            fast.pos = fast.pos + 1
            torch.testing.assert_close(got, want[:, -1], rtol=1e-5, atol=1e-5)
            for s, r in zip(fast.S, ref.S, strict=True):
                torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5)
            for c, r in zip(fast.conv, ref.conv, strict=True):
                assert (c is None) == (r is None)
                if c is not None:
                    torch.testing.assert_close(c, r)
            for b, r in zip(fast.kv, ref.kv, strict=True):
                assert b.filled == r.filled and torch.equal(b.first, r.first)
                torch.testing.assert_close(b.k[:, :, : b.filled], r.k[:, :, : r.filled])
            ids = want[:, -1].argmax(-1)


def test_the_step_reads_the_weights_it_was_built_from(tiny_lm: HybridLM):
    """Fused weights are copies: a step built before a weight update does not see it, one
    built after does (generate_batch builds one per call)."""
    before = OneTokenStep(tiny_lm)
    with torch.no_grad():
        tiny_lm.blocks[0].mlp.up.weight.mul_(2)
    after = OneTokenStep(tiny_lm)
    a, b = _rows(tiny_lm)
    ids = torch.full((len(a.rows),), 70)
    with torch.inference_mode():
        want, *_ = tiny_lm._stack(ids[:, None], b.S, b.conv, b.kv, b.pos)
        torch.testing.assert_close(after.step(a, ids), want[:, -1], rtol=1e-5, atol=1e-5)
        a, _ = _rows(tiny_lm)
        assert not torch.allclose(before.step(a, ids), want[:, -1], rtol=1e-3, atol=1e-3)
