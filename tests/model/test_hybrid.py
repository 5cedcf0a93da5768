"""Wake, sleep and generate semantics of HybridLM on a tiny config."""

from __future__ import annotations

import pytest
import torch

from model import HybridConfig, HybridLM, MemoryState, render_turn
from model.exceptions import (
    EmptyChunkError,
    InputError,
    StateMismatchError,
    WatermarkError,
)
from tests.model.helpers import rel_err


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("T", [10, 40])
def test_cached_decoding_equals_full_forward(tiny_lm: HybridLM, T: int):
    x = tokens(2, T)  # 10: inside the window (12); 40: past it and the op chunk (16)
    with torch.no_grad():
        full = tiny_lm(x)
    state = tiny_lm.init_state(2)
    steps = []
    for t in range(x.shape[1]):
        logits, state = tiny_lm.wake(x[:, t : t + 1], state)
        steps.append(logits)
    assert rel_err(torch.cat(steps, 1), full) < 1e-5
    # Uneven pieces through the chunked path agree too.
    a, state = tiny_lm.wake(x[:, : T // 2 + 2], tiny_lm.init_state(2))
    b, _ = tiny_lm.wake(x[:, T // 2 + 2 :], state)
    assert rel_err(torch.cat([a, b], 1), full) < 1e-5


def test_sleep_one_pass_equals_a_plain_pass(tiny_lm: HybridLM):
    x = tokens(2, 30)
    _, woken = tiny_lm.wake(x, tiny_lm.init_state(2))
    slept = tiny_lm.sleep(x, tiny_lm.init_state(2), passes=1)
    for s_sleep, s_wake in zip(slept.base_S, woken.S, strict=True):
        assert rel_err(s_sleep, s_wake) < 1e-5
    assert all(c is None for c in slept.kv) and all(p == [] for p in slept.pending)


def test_passes_accumulate(tiny_lm: HybridLM):
    x = tokens(1, 20)
    two = tiny_lm.sleep(x, tiny_lm.init_state(1), passes=2)
    one_then_one = tiny_lm.sleep(x, tiny_lm.sleep(x, tiny_lm.init_state(1), passes=1), passes=1)
    for a, b in zip(two.base_S, one_then_one.base_S, strict=True):
        assert torch.equal(a, b)
    one = tiny_lm.sleep(x, tiny_lm.init_state(1), passes=1)
    assert not torch.allclose(two.base_S[0], one.base_S[0])


def test_batched_ragged_sleep_equals_per_scope_sleep(tiny_lm: HybridLM):
    lengths = [30, 7, 19]
    chunks = [tokens(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    # Each scope starts from its own (non-zero) consolidated S.
    starts = [tiny_lm.sleep(tokens(1, 9, seed=10 + i), tiny_lm.init_state(1), 1) for i in range(3)]
    padded = torch.full((3, max(lengths)), 256)
    for i, c in enumerate(chunks):
        padded[i, : len(c)] = c
    batched = tiny_lm.sleep(
        padded, MemoryState.stack(starts), passes=3, lengths=lengths, watermarks=[5, 6, 7]
    )
    for i, part in enumerate(batched.split()):
        alone = tiny_lm.sleep(chunks[i][None], starts[i], passes=3)
        for a, b in zip(part.base_S, alone.base_S, strict=True):
            assert rel_err(a, b) < 1e-5
        assert part.watermark == 5 + i


def test_forward_train_matches_wake_then_sleep(tiny_lm: HybridLM):
    x = tokens(2, 50)
    L, N = 24, 3
    logits, S = tiny_lm.forward_train(x, chunk=L, passes=N, return_state=True)
    assert logits.shape == (2, 50, tiny_lm.config.vocab_size)
    state = tiny_lm.init_state(2)
    pieces = []
    for c0 in range(0, 50, L):
        piece = x[:, c0 : c0 + L]
        out, _ = tiny_lm.wake(piece, MemoryState.stack(state.split()))  # fresh KV per chunk
        pieces.append(out)
        state = tiny_lm.sleep(piece, state, passes=N)
    assert rel_err(logits, torch.cat(pieces, 1)) < 1e-5
    for a, b in zip(S, state.base_S, strict=True):
        assert rel_err(a, b) < 1e-5


def test_forward_train_is_differentiable_through_sleep(tiny_lm: HybridLM):
    x = tokens(2, 48)
    tiny_lm.train()
    logits = tiny_lm.forward_train(x, chunk=24, passes=2)
    # Loss only on the second chunk: its gradient reaches the first chunk's sleep.
    loss = torch.nn.functional.cross_entropy(logits[:, 25:-1].flatten(0, 1), x[:, 26:].flatten())
    loss.backward()
    gdn = tiny_lm.blocks[0].mixer
    assert gdn.b_proj.weight.grad is not None and gdn.b_proj.weight.grad.abs().sum() > 0
    assert gdn.A_log.grad is not None and torch.isfinite(gdn.A_log.grad).all()


def test_a_model_that_answered_still_trains(tiny_lm: HybridLM):
    # Inference runs in torch's inference mode; nothing it leaves behind (cached RoPE
    # frequencies, say) may break a training step after it.
    _, state = tiny_lm.wake(render_turn("user", "alice reports to bob."), offset=3)
    tiny_lm.generate(render_turn("user", "who?"), state, max_new_tokens=3)
    tiny_lm.train()
    x = tokens(1, 48)
    logits = tiny_lm.forward_train(x, chunk=24, passes=2)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    assert all(p.grad is not None for p in tiny_lm.blocks[1].mixer.qkv.parameters())


def test_generate_is_greedy_and_leaves_state_alone(tiny_lm: HybridLM):
    _, state = tiny_lm.wake(render_turn("user", "alice reports to bob."), offset=3)
    before = state.clone()
    prompt = render_turn("user", "who?")
    reply = tiny_lm.generate(prompt, state, max_new_tokens=6, stop_ids=())
    assert len(reply) == 6
    # Greedy: each token is the argmax after the prompt and the earlier reply tokens.
    logits, _ = tiny_lm.wake(prompt + reply[:-1], state.clone())
    assert logits[0, len(prompt) - 1 :].argmax(-1).tolist() == reply
    assert torch.equal(state.S[0], before.S[0]) and state.pos == before.pos


def test_swap_in_drops_only_consolidated_events(tiny_lm: HybridLM):
    events = [
        (10, render_turn("user", "alice reports to bob.")),
        (11, render_turn("user", "bob reports to carol.")),
        (12, render_turn("user", "how are you?")),
    ]
    state = tiny_lm.init_state()
    for off, ids in events:
        _, state = tiny_lm.wake(ids, state, offset=off)
    live = tiny_lm.consolidate(state, upto=11, passes=2)
    assert live.watermark == 11 and [e.offset for e in live.pending_events] == [12]
    # The same result as sleeping the chunk alone and replaying the rest by hand.
    chunk = events[0][1] + events[1][1]
    slept = tiny_lm.sleep([chunk], tiny_lm.init_state(), passes=2)
    _, expected = tiny_lm.wake(events[2][1], slept, offset=12)
    for a, b in zip(live.S, expected.S, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(WatermarkError, match="older"):
        tiny_lm.swap_in(live, slept, watermark=10)


def test_bad_inputs_raise_clear_errors(tiny_lm: HybridLM):
    state = tiny_lm.init_state(1)
    with pytest.raises(EmptyChunkError, match="empty"):
        tiny_lm.sleep(torch.zeros(1, 0, dtype=torch.long), state)
    with pytest.raises(InputError, match="integer tensor"):
        tiny_lm.sleep(torch.zeros(1, 5), state)
    with pytest.raises(InputError, match=r"ids must be in \[0, 262\)"):
        tiny_lm.wake([300], state)
    with pytest.raises(EmptyChunkError, match="row 1"):
        tiny_lm.sleep(tokens(2, 5), tiny_lm.init_state(2), lengths=[5, 0])
    with pytest.raises(InputError, match="passes"):
        tiny_lm.sleep(tokens(1, 5), state, passes=0)
    with pytest.raises(InputError, match="batch"):
        tiny_lm.sleep(tokens(2, 5), state)
    other = HybridLM(HybridConfig(d_model=64, n_layers=2, pattern="GA", n_heads=2, head_dim=16))
    with pytest.raises(StateMismatchError, match="config"):
        other.wake([1, 2, 3], state)


def test_save_load_round_trip(tiny_lm: HybridLM, tmp_path):
    tiny_lm.save(tmp_path / "ckpt")
    loaded = HybridLM.load(tmp_path / "ckpt")
    assert loaded.config == tiny_lm.config
    for (n, a), (_, b) in zip(
        tiny_lm.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), n
    assert loaded.head.weight is loaded.embed.weight  # tying survives
    x = tokens(1, 20)
    assert torch.equal(tiny_lm(x), loaded(x))


def test_rebuild_is_deterministic_and_offsets_must_grow(tiny_lm: HybridLM):
    slept = tiny_lm.sleep(tokens(1, 30), tiny_lm.init_state(), passes=2, watermarks=4)
    events = [
        (6, render_turn("user", "x is 3.")),
        (5, render_turn("user", "y is 4.")),
        (2, render_turn("user", "already consolidated")),
    ]
    a = tiny_lm.rebuild_state(slept, 4, events)
    b = tiny_lm.rebuild_state(slept.fast_weights(), 4, list(reversed(events)))
    assert [e.offset for e in a.pending_events] == [5, 6]
    assert all(torch.equal(x, y) for x, y in zip(a.S, b.S, strict=True))
    with pytest.raises(InputError, match="not after"):
        tiny_lm.wake([1, 2], a, offset=6)


def test_window_only_model_sleeps_to_nothing():
    cfg = HybridConfig(d_model=32, n_layers=2, pattern="A", n_heads=2, head_dim=16, window=8)
    lm = HybridLM(cfg).eval()
    state = lm.sleep(tokens(2, 10), lm.init_state(2), passes=3, watermarks=[1, 2])
    assert state.base_S == [] and state.watermarks == [1, 2]
    assert state.split()[0].fast_weights() == {}
