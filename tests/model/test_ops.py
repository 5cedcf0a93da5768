"""The chunked gated delta rule equals the step-by-step recurrence, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.ops import (
    backend_for,
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)
from model.ops.utils import l2norm
from tests.model.helpers import rel_err


def make_inputs(B=2, T=63, H=2, K=16, V=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q = l2norm(randn(B, T, H, K))
    k = l2norm(randn(B, T, H, K))
    v = randn(B, T, H, V)
    g = F.logsigmoid(randn(B, T, H) + 2)  # log decay in (-inf, 0)
    beta = torch.sigmoid(randn(B, T, H))
    h0 = randn(B, H, K, V)
    return q, k, v, g, beta, h0


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 63, 75])
def test_chunk_matches_naive_fp64(chunk_size, T):
    q, k, v, g, beta, h0 = make_inputs(T=T)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, None, h0, True)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True, chunk_size=chunk_size)
    assert rel_err(o, o_ref) < 1e-12
    assert rel_err(s, s_ref) < 1e-12


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_ragged_rows_end_in_their_own_state(chunk_size):
    q, k, v, g, beta, h0 = make_inputs(B=3, T=75)
    lengths = torch.tensor([75, 40, 1])
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True, lengths, chunk_size)
    for b, n in enumerate(lengths.tolist()):
        cut = [x[b : b + 1, :n] for x in (q, k, v, g, beta)]
        o_b, s_b = naive_recurrent_gated_delta_rule(*cut, None, h0[b : b + 1], True)
        assert rel_err(s[b : b + 1], s_b) < 1e-12
        assert rel_err(o[b : b + 1, :n], o_b) < 1e-12


def test_zero_length_row_keeps_initial_state():
    q, k, v, g, beta, h0 = make_inputs(B=2, T=20)
    _, s = chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True, torch.tensor([20, 0]), 16)
    assert torch.equal(s[1], h0[1])


def test_gradients_match_naive():
    q, k, v, g, beta, h0 = make_inputs(B=2, T=37, K=8, V=8)
    lengths = torch.tensor([37, 29])
    grads = {}
    for name, fn in [
        ("naive", naive_recurrent_gated_delta_rule),
        ("chunk", chunk_gated_delta_rule),
    ]:
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
        extra = {"chunk_size": 16} if name == "chunk" else {}
        o, s = fn(*leaves[:5], None, leaves[5], True, lengths, **extra)
        # Weighted sums so every output element and the final state carry gradient.
        w_o = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
        w_s = torch.linspace(1, -1, s.numel(), dtype=s.dtype).view_as(s)
        ((o * w_o).sum() + (s * w_s).sum()).backward()
        grads[name] = [x.grad for x in leaves]
    for label, a, b in zip("q k v g beta h0".split(), grads["chunk"], grads["naive"], strict=True):
        assert rel_err(a, b) < 1e-10, label


def test_recurrent_form_matches_naive():
    q, k, v, g, beta, h0 = make_inputs(T=5)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, None, h0, True)
    o, s = fused_recurrent_gated_delta_rule(q, k, v, g, beta, None, h0, True)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


def test_fp32_chunk_close_to_fp64_oracle():
    q, k, v, g, beta, h0 = make_inputs(T=75)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, None, h0, True)
    o, s = chunk_gated_delta_rule(*(x.float() for x in (q, k, v, g, beta)), None, h0.float(), True)
    assert o.dtype == torch.float32
    assert rel_err(o.double(), o_ref) < 1e-4 and rel_err(s.double(), s_ref) < 1e-4


def test_dispatch_uses_torch_on_cpu_and_refuses_fla():
    q, k, v, g, beta, h0 = make_inputs(T=20, dtype=torch.float32)
    assert backend_for(q) == "torch"
    o, s = gated_delta_rule(q, k, v, g, beta, h0)
    o_ref, s_ref = chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)
    with pytest.raises(NotImplementedError, match="fla|CUDA"):
        gated_delta_rule(q, k, v, g, beta, h0, backend="fla")


def test_dispatch_rejects_bad_shapes():
    q, k, v, g, beta, h0 = make_inputs(T=8)
    with pytest.raises(ValueError, match=r"g and beta must be \[B, T, H\]"):
        gated_delta_rule(q, k, v, g[:, :4], beta, h0)


def test_env_switch_forces_torch(monkeypatch):
    from model.ops.dispatch import torch_ops_forced

    monkeypatch.setenv("SOMNA_FORCE_TORCH_OPS", "1")
    assert torch_ops_forced()
    monkeypatch.setenv("SOMNA_FORCE_TORCH_OPS", "0")
    assert not torch_ops_forced()


def test_fla_plumbing_with_a_stand_in_kernel(monkeypatch):
    """No GPU here: a stand-in with fla's signature checks what dispatch passes to fla
    (layout, keyword names, fp32 g and state, in-kernel l2norm, ragged masking)."""
    from model.ops import dispatch

    calls = []

    def fake_fla(
        q,
        k,
        v,
        g,
        beta,
        scale=None,
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=False,
        cu_seqlens=None,
    ):
        calls.append((g.dtype, initial_state.dtype, use_qk_l2norm_in_kernel))
        if use_qk_l2norm_in_kernel:
            q, k = l2norm(q), l2norm(k)
        return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)

    monkeypatch.setattr(dispatch, "_fla_chunk", lambda: fake_fla)
    monkeypatch.setattr(dispatch, "_on_cuda", lambda x: True)
    q, k, v, g, beta, h0 = make_inputs(B=2, T=40, dtype=torch.float32)
    raw_q, raw_k = q * 3, k * 2  # not normalised: the kernel must do it
    lengths = torch.tensor([40, 25])
    assert dispatch.backend_for(q.bfloat16()) == "fla"
    assert dispatch.backend_for(q) == "torch"  # fp32 stays on torch
    o, s = gated_delta_rule(
        raw_q, raw_k, v, g, beta, h0, lengths=lengths, backend="fla", use_qk_l2norm=True
    )
    o_ref, s_ref = chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True, lengths)
    assert calls == [(torch.float32, torch.float32, True)]
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_model_sleep_goes_through_fla_when_present(monkeypatch, tiny_lm):
    from model.ops import dispatch

    used = []

    def fake_fla(
        q,
        k,
        v,
        g,
        beta,
        scale=None,
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=False,
        cu_seqlens=None,
    ):
        used.append(q.dtype)
        q, k = l2norm(q), l2norm(k)
        return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)

    lm = tiny_lm.to(torch.bfloat16)
    x = torch.randint(0, 256, (3, 30))
    ref = lm.sleep(x, lm.init_state(3), passes=2, lengths=[30, 9, 17])
    monkeypatch.setattr(dispatch, "_fla_chunk", lambda: fake_fla)
    monkeypatch.setattr(dispatch, "_on_cuda", lambda x: True)
    out = lm.sleep(x, lm.init_state(3), passes=2, lengths=[30, 9, 17])
    assert used and set(used) == {torch.bfloat16}
    for a, b in zip(out.base_S, ref.base_S, strict=True):
        assert rel_err(a, b) < 1e-5


def test_training_avoids_an_fla_whose_backward_refuses_this_gpu(monkeypatch) -> None:
    # fla 0.6 raises in the gated backward on Hopper with Triton 3.4..3.7.0 (seen on the
    # lent H100): a forward that needs gradients must pick the torch ops, sleep keeps fla.
    from model.ops import dispatch

    monkeypatch.setattr(dispatch, "_fla_chunk", lambda: object())
    monkeypatch.setattr(dispatch, "_on_cuda", lambda x: True)
    monkeypatch.setattr(dispatch, "_fla_backward_ok", lambda: False)
    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    assert dispatch.backend_for(q) == "fla"
    assert dispatch.backend_for(q.requires_grad_()) == "torch"
    with torch.no_grad():
        assert dispatch.backend_for(q) == "fla"
