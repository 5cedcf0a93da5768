"""``HybridLM``: the GDN / sliding-window-attention hybrid with wake and (batched) sleep.

    wake   one ordinary pass over new tokens: advances the running S, conv and KV caches
           (``wake_batch``: the same for many single-scope states at once, ragged rows;
           ``rebuild_states`` / ``swap_in_batch`` are built on it)
    sleep  offline recurrence over a chunk: N passes of the block stack, each starting from
           the S the previous pass ended with (pass 1 starts from the consolidated S), hidden
           states thrown away; the chunk's KV is evicted (the result has no KV)
    forward_train   the same wake/sleep cycle over a long sequence, differentiable

Layers after the last GDN layer cannot change S, so sleep passes stop there.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from model.blocks import Block, KVBuffer, RMSNorm
from model.config import HybridConfig
from model.decode import OneTokenStep
from model.exceptions import (
    DuplicateEventError,
    EmptyChunkError,
    InputError,
    StateMismatchError,
    WatermarkError,
)
from model.state import NO_WATERMARK, DecodeRows, MemoryState, PendingEvent
from model.tokenizer import EOT

TokensLike = Tensor | Sequence[int]
# Attention elements (queries x keys x rows) one piece of a batched wake may take.
WAKE_BUDGET = 1 << 22


class HybridLM(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, kind) for kind in config.layer_kinds)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        # Residual-branch outputs start small so a deep stack starts near identity.
        for block in self.blocks:
            nn.init.normal_(block.mixer.o_proj.weight, std=0.02 / (2 * config.n_layers) ** 0.5)
            nn.init.normal_(block.mlp.down.weight, std=0.02 / (2 * config.n_layers) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- the block stack --------------------------------------------------------------
    def _stack(
        self,
        tokens: Tensor,
        S: list[Tensor],
        conv: list[Tensor | None],
        kv: list[tuple[Tensor, Tensor] | None],
        pos: int | Tensor,
        lengths: Tensor | None = None,
        logits: bool = True,
    ) -> tuple[Tensor | None, list[Tensor], list[Tensor | None], list]:
        """Run the blocks over tokens ``(B, T)``; returns (logits or None, S, conv, kv).

        With ``logits=False`` (a sleep pass) it stops after the last GDN layer. Rows of a
        batched decode pass ``pos`` per row ``(B,)`` and ``KVBuffer``s, updated in place."""
        gdn = self.config.gdn_layers
        new_S: list[Tensor] = []
        new_conv: list[Tensor | None] = []
        new_kv: list = []
        if not logits and not gdn:
            return None, new_S, new_conv, new_kv
        x = self.embed(tokens)  # (B, T, D)
        for i, block in enumerate(self.blocks):
            h = block.norm1(x)
            if block.kind == "G":
                j = len(new_S)
                y, s, c = block.mixer(h, S[j], conv[j], lengths)
                new_S.append(s)
                new_conv.append(c)
                if not logits and i == gdn[-1]:
                    return None, new_S, new_conv, new_kv
            else:
                c = kv[len(new_kv)]
                if isinstance(c, KVBuffer):
                    y = block.mixer.step(h, c, pos)
                else:
                    y, c = block.mixer(h, c, pos)
                new_kv.append(c)
            x = x + y
            x = x + block.mlp(block.norm2(x))
        return self.head(self.norm(x)), new_S, new_conv, new_kv

    def _sleep_S(
        self, tokens: Tensor, S: list[Tensor], passes: int, lengths: Tensor | None
    ) -> list[Tensor]:
        """N passes over a chunk, each a fresh sequence (empty KV and conv) from the S the
        previous pass ended with."""
        for _ in range(passes):
            S = self._sleep_pass(tokens, S, lengths)
        return S

    def _sleep_pass(self, tokens: Tensor, S: list[Tensor], lengths: Tensor | None) -> list[Tensor]:
        """One sleep pass: the stack up to the last GDN layer, from S; returns the new S."""
        none_g: list = [None] * len(S)
        none_a: list = [None] * len(self.config.attn_layers)
        return self._stack(tokens, S, none_g, none_a, 0, lengths, logits=False)[1]

    def compile_sleep(self, **compile_kwargs: object) -> HybridLM:
        """Opt in to ``torch.compile`` for sleep passes (GPU: fuses the memory-bound
        elementwise ops around the matmuls and fla's kernel). Shapes that change between
        calls recompile; pad chunks to a few fixed lengths to avoid that."""
        self._sleep_pass = torch.compile(self._sleep_pass, **compile_kwargs)  # type: ignore[method-assign]
        return self

    # ---- public API -------------------------------------------------------------------
    def init_state(self, batch: int = 1) -> MemoryState:
        """Empty memory for ``batch`` scopes: S = 0, no KV, nothing pending, watermark -1."""
        return MemoryState.zeros(self.config, batch, self.device)

    def forward(self, tokens: Tensor) -> Tensor:
        """One plain pass from empty memory over ``(B, T)`` tokens -> logits ``(B, T, V)``."""
        tokens = self._tokens(tokens)
        state = self.init_state(tokens.shape[0])
        out, *_ = self._stack(tokens, state.S, state.conv, state.kv, 0)
        return out

    @torch.inference_mode()
    def wake(
        self, tokens: TokensLike, state: MemoryState | None = None, *, offset: int | None = None
    ) -> tuple[Tensor, MemoryState]:
        """One ordinary pass over new tokens ``(B, T)`` (or a list of ids for B = 1).

        Returns logits ``(B, T, V)`` and a new state (the given one is not modified). With
        ``offset`` (B = 1) the tokens are recorded as the pending event at that Kafka offset,
        so they stay available until a sleep up to a watermark >= offset is swapped in.
        Tokens woken without an offset (a prompt, a generated reply) still move the running
        S and KV but are not part of the scope's history: wake those on ``state.clone()``.
        An offset at or before the last recorded one (a redelivered event) raises
        ``DuplicateEventError`` and leaves the state as it was: skip the event.
        """
        tokens = self._tokens(tokens)
        state = state if state is not None else self.init_state(tokens.shape[0])
        self._check_state(state, tokens.shape[0])
        pending = [list(p) for p in state.pending]
        if offset is not None:
            if state.batch != 1:
                raise InputError(f"wake(offset=...) records one event; state has B={state.batch}")
            last = pending[0][-1].offset if pending[0] else state.watermarks[0]
            if offset <= last:
                raise DuplicateEventError(
                    f"event offset {offset} is not after the last one recorded ({last})"
                )
            pending[0].append(PendingEvent(int(offset), tuple(tokens[0].tolist())))
        logits, S, conv, kv = self._stack(tokens, state.S, state.conv, state.kv, state.pos)
        new = dataclasses.replace(
            state, S=S, conv=conv, kv=kv, pos=state.pos + tokens.shape[1], pending=pending
        )
        return logits, new

    @torch.inference_mode()
    def wake_batch(
        self,
        tokens: Sequence[TokensLike],
        states: Sequence[MemoryState],
        offsets: Sequence[int | None] | None = None,
    ) -> tuple[Tensor, list[MemoryState]]:
        """``wake`` for several scopes in one batched pass: tokens i into state i.

        The states are single-scope and may differ in everything (position, KV length,
        conv cache, S); each row takes its own number of tokens (right-padded: padding never
        touches S, the conv cache or the KV a row keeps). Returns the logits of each row's
        last token ``(B, V)`` and the new states, the same as ``wake(tokens[i], states[i],
        offset=offsets[i])`` one at a time; none of the given states is modified. A
        redelivered offset raises ``DuplicateEventError`` before anything is woken.
        ``wake`` stays the B = 1 path: building the ragged rows costs more than one row needs.
        """
        offsets = [None] * len(tokens) if offsets is None else list(offsets)
        if not (len(tokens) == len(states) == len(offsets)):
            raise InputError(
                f"got {len(tokens)} token rows, {len(states)} states, {len(offsets)} offsets"
            )
        toks = []
        for t in tokens:
            t = self._tokens(t)
            if t.shape[0] != 1:
                raise InputError(f"each row is one sequence, got a batch of {t.shape[0]}")
            toks.append(t[0])
        pending, config_hash = [], self.config.config_hash()
        for state, offset, t in zip(states, offsets, toks, strict=True):
            self._check_state(state, 1, config_hash)
            events = list(state.pending[0])
            if offset is not None:
                last = events[-1].offset if events else state.watermarks[0]
                if offset <= last:
                    raise DuplicateEventError(
                        f"event offset {offset} is not after the last one recorded ({last})"
                    )
                events.append(PendingEvent(int(offset), tuple(t.tolist())))
            pending.append(events)
        n = len(toks)
        out: list[MemoryState | None] = [None] * n
        last_logits: list[Tensor | None] = [None] * n
        if not n:
            return torch.empty(0, self.config.vocab_size, device=self.device), []
        rows = DecodeRows.of(list(states), list(range(n)), self.device)
        done = [0] * n  # tokens of each row woken so far
        # Long rows go in pieces: attention costs B x T x (T + window) per piece.
        piece_len = max(self.config.window, int((WAKE_BUDGET / n) ** 0.5))
        while rows.rows:
            left = [len(toks[r]) - done[r] for r in rows.rows]
            T = min(piece_len, max(left))
            ln = [min(x, T) for x in left]
            piece = torch.zeros(len(rows.rows), T, dtype=torch.long, device=self.device)
            for i, r in enumerate(rows.rows):
                piece[i, : ln[i]] = toks[r][done[r] : done[r] + ln[i]]
            lengths = None if min(ln) == T else torch.tensor(ln, device=self.device)
            logits, rows.S, rows.conv, _ = self._stack(
                piece, rows.S, rows.conv, rows.kv, rows.pos, lengths
            )
            assert logits is not None
            rows.pos = rows.pos + T
            keep = []
            for i, r in enumerate(rows.rows):
                done[r] += ln[i]
                if done[r] < len(toks[r]):
                    keep.append(i)
                    continue
                last_logits[r] = logits[i, ln[i] - 1]
                out[r] = self._row_state(rows, i, T - ln[i], states[r], pending[r], len(toks[r]))
            if len(keep) < len(rows.rows) and keep:
                rows = rows.select(keep)
            elif not keep:
                break
        return torch.stack(last_logits), out  # type: ignore[arg-type]

    def _row_state(
        self,
        rows: DecodeRows,
        i: int,
        pad: int,
        given: MemoryState,
        pending: list[PendingEvent],
        woken: int,
    ) -> MemoryState:
        """Row ``i`` of a batched wake as a B = 1 state (copies: the batch is let go of).
        ``pad``: the padded columns after the row's last token in its KV buffers."""
        keep = self.config.window - 1  # what ``forward`` keeps: the next token's window
        kv: list = []
        for buf in rows.kv:
            assert buf.k is not None and buf.v is not None
            end = buf.filled - pad
            start = max(int(buf.first[i]), end - keep)
            kv.append(
                (buf.k[i : i + 1, :, start:end].clone(), buf.v[i : i + 1, :, start:end].clone())
            )
        return MemoryState(
            config_hash=given.config_hash,
            gdn_layers=list(given.gdn_layers),
            base_S=list(given.base_S),
            S=[s[i : i + 1].clone() for s in rows.S],
            conv=[None if c is None else c[i : i + 1].clone() for c in rows.conv],
            kv=kv,
            pos=given.pos + woken,
            watermarks=list(given.watermarks),
            pending=[pending],
        )

    @torch.inference_mode()
    def sleep(
        self,
        tokens: TokensLike,
        state: MemoryState,
        passes: int | None = None,
        lengths: Tensor | Sequence[int] | None = None,
        watermarks: Sequence[int] | int | None = None,
    ) -> MemoryState:
        """Consolidate a chunk ``(B, T)`` into fast weights, batched over B scopes.

        Starts from ``state.base_S`` (S as it was at the chunk's start), runs the whole block
        stack ``passes`` times over the chunk (S accumulating, hidden states discarded) and
        returns the consolidated state: base_S = S = the result, no KV (the chunk is
        evicted), nothing pending, watermarks as given (else unchanged). Ragged chunks are
        right-padded with ``lengths[b]`` valid tokens; padding never touches S.
        For an agent-side state with more events buffered after the chunk, use
        ``consolidate`` (sleep + swap_in).
        """
        tokens = self._tokens(tokens, what="sleep chunk")
        self._check_state(state, tokens.shape[0])
        passes = self.config.sleep_passes if passes is None else passes
        if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
            raise InputError(f"passes must be an int >= 1, got {passes!r}")
        lengths = self._lengths(lengths, tokens)
        S = self._sleep_S(tokens, state.base_S, passes, lengths)
        if watermarks is None:
            marks = list(state.watermarks)
        else:
            marks = (
                [int(watermarks)] * state.batch
                if isinstance(watermarks, int)
                else [int(w) for w in watermarks]
            )
            if len(marks) != state.batch:
                raise InputError(f"got {len(marks)} watermarks for {state.batch} scopes")
        return MemoryState(
            config_hash=state.config_hash,
            gdn_layers=list(state.gdn_layers),
            base_S=S,
            S=[s.clone() for s in S],
            conv=[None] * len(S),
            kv=[None] * len(state.kv),
            pos=0,
            watermarks=marks,
            pending=[[] for _ in range(state.batch)],
        )

    def rebuild_state(
        self,
        fast_weights: dict[str, Tensor] | MemoryState,
        watermark: int,
        events: Sequence[tuple[int, Sequence[int]]] = (),
    ) -> MemoryState:
        """A B = 1 state from consolidated fast weights at ``watermark`` plus the events
        after it (offset, tokens), replayed by wake: the deterministic live state."""
        return self.rebuild_states([(fast_weights, watermark, events)])[0]

    @torch.inference_mode()
    def rebuild_states(
        self,
        scopes: Sequence[
            tuple[dict[str, Tensor] | MemoryState, int, Sequence[tuple[int, Sequence[int]]]]
        ],
    ) -> list[MemoryState]:
        """``rebuild_state`` for several scopes (fast weights, watermark, events) at once:
        each scope's remaining events are one row of a batched wake from an empty KV."""
        fresh, kept = [], []
        for fast_weights, watermark, events in scopes:
            if isinstance(fast_weights, MemoryState):
                fast_weights.check(self.config)
                fast_weights = fast_weights.fast_weights()
            fresh.append(
                MemoryState.from_fast_weights(fast_weights, self.config, watermark, self.device)
            )
            k = sorted((int(o), tuple(int(t) for t in ids)) for o, ids in events if o > watermark)
            if [o for o, _ in k] != sorted({o for o, _ in k}):
                raise DuplicateEventError(f"events repeat an offset: {[o for o, _ in k]}")
            kept.append(k)
        return self.resume_states(fresh, kept)

    @torch.inference_mode()
    def resume_states(
        self,
        states: Sequence[MemoryState],
        events: Sequence[Sequence[tuple[int, Sequence[int]]]],
    ) -> list[MemoryState]:
        """Wake events (offset, tokens) after each B = 1 state's own, all scopes in one
        batched pass, each scope's events as one row (the same result as one per event);
        returns new states recording them as pending. A swap whose first events a sleep
        worker woke already (``consolidation/prewake.py``) resumes from that state."""
        out = list(states)
        rows = [i for i, e in enumerate(events) if e]
        for i in rows:
            pending = states[i].pending_events
            offsets = [pending[-1].offset if pending else states[i].watermark]
            offsets += [int(o) for o, _ in events[i]]
            if any(b <= a for a, b in itertools.pairwise(offsets)):
                raise DuplicateEventError(f"events to resume are not after the state's: {offsets}")
        if rows:
            flat = [[int(t) for _, ids in events[i] for t in ids] for i in rows]
            _, woken = self.wake_batch(flat, [out[i] for i in rows])
            for i, state in zip(rows, woken, strict=True):
                added = [PendingEvent(int(o), tuple(int(t) for t in ids)) for o, ids in events[i]]
                state.pending = [list(states[i].pending_events) + added]
                out[i] = state
        return out

    def swap_in(
        self,
        state: MemoryState,
        fast_weights: dict[str, Tensor] | MemoryState,
        watermark: int,
    ) -> MemoryState:
        """Hot swap: take S' consolidated up to ``watermark``; drop the pending events with
        offset <= watermark and re-derive the running S and KV from S' + the rest."""
        return self.swap_in_batch([(state, fast_weights, watermark)])[0]

    def swap_in_batch(
        self,
        swaps: Sequence[tuple[MemoryState, dict[str, Tensor] | MemoryState, int]],
    ) -> list[MemoryState]:
        """``swap_in`` for several scopes (state, fast weights, watermark) in one batched
        wake of what each keeps pending."""
        for state, _, watermark in swaps:
            self._check_state(state, 1)
            if watermark < state.watermark:
                raise WatermarkError(
                    f"fast weights at watermark {watermark} are older than the state's "
                    f"{state.watermark}: events in between are no longer buffered; use "
                    f"rebuild_state with the history after {watermark}"
                )
        return self.rebuild_states(
            [
                (fw, w, [(e.offset, e.tokens) for e in s.pending_events if e.offset > w])
                for s, fw, w in swaps
            ]
        )

    def consolidate(self, state: MemoryState, upto: int, passes: int | None = None) -> MemoryState:
        """In-process sleep of the pending events with offset <= ``upto`` (B = 1), then swap
        the result in. What a sleep worker does, without Kafka and MLflow around it."""
        self._check_state(state, 1)
        chunk = state.pending_tokens(upto)
        if not chunk:
            raise EmptyChunkError(f"no pending events with offset <= {upto} to consolidate")
        slept = self.sleep([chunk], state, passes=passes)
        return self.swap_in(state, slept, upto)

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: TokensLike,
        state: MemoryState | None = None,
        max_new_tokens: int = 64,
        stop_ids: Sequence[int] = (EOT,),
    ) -> list[int]:
        """Greedy decoding with the KV cache, on a copy of ``state`` (the reply is not
        remembered). Returns the new token ids, without the stop token."""
        tokens = self._tokens(prompt_ids, what="prompt")
        if tokens.shape[0] != 1:
            raise InputError(f"generate takes one prompt, got a batch of {tokens.shape[0]}")
        return self.generate_batch([tokens[0]], [state], max_new_tokens, stop_ids)[0]

    @torch.inference_mode()
    def generate_batch(
        self,
        prompts: Sequence[TokensLike],
        states: Sequence[MemoryState | None],
        max_new_tokens: int = 64,
        stop_ids: Sequence[int] = (EOT,),
    ) -> list[list[int]]:
        """``generate`` for several scopes in one batched decode: prompt i from state i.

        The states are single-scope and may differ in everything (position, KV length,
        conv cache, S); none is modified. Prompts of the same length are woken together,
        then every step decodes one token for all rows still going: each row at its own
        position, attending to its own left-padded KV. A row that stops (stop token or
        ``max_new_tokens``) leaves the batch. Returns the replies in the order given.
        """
        if len(prompts) != len(states):
            raise InputError(f"got {len(prompts)} prompts for {len(states)} states")
        toks = []
        for p in prompts:
            t = self._tokens(p, what="prompt")
            if t.shape[0] != 1:
                raise InputError(f"each prompt is one sequence, got a batch of {t.shape[0]}")
            toks.append(t)
        given = [self.init_state(1) if s is None else s for s in states]
        for s in given:
            self._check_state(s, 1)
        out: list[list[int]] = [[] for _ in toks]
        if not toks or max_new_tokens < 1:
            return out
        by_len: dict[int, list[int]] = {}
        for i, t in enumerate(toks):
            by_len.setdefault(t.shape[1], []).append(i)
        one = OneTokenStep(self)
        parts, last = [], []
        for rows in by_len.values():
            part = DecodeRows.of([given[i] for i in rows], rows, self.device)
            last.append(self._decode_step(part, torch.cat([toks[i] for i in rows]), one)[:, -1])
            parts.append(part)
        batch, logits = DecodeRows.cat(parts), torch.cat(last)
        stops = set(int(s) for s in stop_ids)
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1).tolist()
            keep = [i for i, t in enumerate(nxt) if t not in stops]
            for i in keep:
                out[batch.rows[i]].append(nxt[i])
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(nxt):
                batch = batch.select(keep)
            ids = torch.tensor([nxt[i] for i in keep], device=self.device)[:, None]
            logits = self._decode_step(batch, ids, one)[:, -1]
        return out

    def _decode_step(self, rows: DecodeRows, tokens: Tensor, one: OneTokenStep) -> Tensor:
        """Wake ``tokens (B, T)`` into the rows (in place) -> logits ``(B, T, V)``; one
        token per row takes ``one``, the leaner path of a decode step (model/decode.py)."""
        if tokens.shape[1] == 1:
            logits = one.step(rows, tokens[:, 0])[:, None]
        else:
            out, rows.S, rows.conv, _ = self._stack(tokens, rows.S, rows.conv, rows.kv, rows.pos)
            assert out is not None
            logits = out
        rows.pos = rows.pos + tokens.shape[1]
        return logits

    def forward_train(
        self,
        tokens: Tensor,
        chunk: int | None = None,
        passes: int | None = None,
        lengths: Tensor | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Differentiable wake/sleep cycle over a long sequence ``(B, T)`` -> logits (B, T, V).

        The sequence is cut into chunks of ``chunk`` tokens (default config.chunk). Chunk i
        is woken from S_i (the consolidated S) with attention over chunk i only (sliding
        window within it), exactly what an agent sees right after swapping in S_i; then
        S_{i+1} = sleep(chunk i, from S_i, passes). The wake pass is pass 1 of that sleep,
        so a sequence costs ``passes`` forward passes. Gradients flow through all passes and
        chunks. With ``return_state`` also returns S after the last chunk's sleep.
        """
        tokens = self._tokens(tokens)
        L = chunk or self.config.chunk
        N = passes or self.config.sleep_passes
        B, T = tokens.shape
        S = self.init_state(B).S
        none_g: list = [None] * len(S)
        none_a: list = [None] * len(self.config.attn_layers)
        outs = []
        for c0 in range(0, T, L):
            piece = tokens[:, c0 : c0 + L]
            ln = (
                None
                if lengths is None
                else (lengths.to(tokens.device) - c0).clamp(0, piece.shape[1])
            )
            logits, S_wake, _, _ = self._stack(piece, S, none_g, none_a, 0, ln)
            outs.append(logits)
            if c0 + L < T or return_state:
                S = self._sleep_S(piece, S_wake, N - 1, ln)
        out = torch.cat(outs, dim=1)
        return (out, S) if return_state else out

    # ---- persistence ------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (with the config hash)."""
        from safetensors.torch import save_model

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_model(self, str(d / "model.safetensors"))
        meta = {**self.config.to_dict(), "config_hash": self.config.config_hash()}
        (d / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> HybridLM:
        from safetensors.torch import load_model

        d = Path(directory)
        try:
            meta = json.loads((d / "config.json").read_text())
        except FileNotFoundError as exc:
            raise InputError(f"no config.json in {d}") from exc
        expected_hash = meta.pop("config_hash", None)
        config = HybridConfig.from_dict(meta)
        if expected_hash is not None and expected_hash != config.config_hash():
            raise StateMismatchError(
                f"{d}/config.json says hash {expected_hash}, its fields hash to {config.config_hash()}"
            )
        lm = cls(config)
        load_model(lm, str(d / "model.safetensors"), device=str(device))
        return lm.to(device).eval()

    # ---- input checks -----------------------------------------------------------------
    def _tokens(self, tokens: TokensLike, what: str = "tokens") -> Tensor:
        if not isinstance(tokens, Tensor):
            tokens = torch.tensor(tokens, dtype=torch.long)
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise InputError(f"{what} must be an integer tensor (torch.long), got {tokens.dtype}")
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2:
            raise InputError(f"{what} must be (B, T), got shape {tuple(tokens.shape)}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise EmptyChunkError(f"{what} is empty: shape {tuple(tokens.shape)}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise InputError(
                f"{what} ids must be in [0, {self.config.vocab_size}), got [{lo}, {hi}]"
            )
        return tokens.to(self.device, torch.long)

    def _lengths(self, lengths: Tensor | Sequence[int] | None, tokens: Tensor) -> Tensor | None:
        if lengths is None:
            return None
        lengths = torch.as_tensor(lengths)
        B, T = tokens.shape
        if lengths.dtype.is_floating_point or tuple(lengths.shape) != (B,):
            raise InputError(
                f"lengths must be {B} ints, got {lengths.dtype} {tuple(lengths.shape)}"
            )
        if int(lengths.min()) < 1:
            row = int(lengths.argmin())
            raise EmptyChunkError(
                f"sleep chunk of scope row {row} is empty (length {int(lengths.min())})"
            )
        if int(lengths.max()) > T:
            raise InputError(f"lengths must be <= T={T}, got max {int(lengths.max())}")
        return lengths.to(self.device)

    def _check_state(self, state: MemoryState, batch: int, config_hash: str = "") -> None:
        """``config_hash``: the model's, when the caller checks many states (it is a
        sha256 of the config, not free)."""
        if not isinstance(state, MemoryState):
            raise InputError(f"state must be a MemoryState, got {type(state).__name__}")
        if not config_hash or state.config_hash != config_hash:
            state.check(self.config)
        if state.batch != batch:
            raise InputError(f"state holds {state.batch} scopes, tokens have batch {batch}")


__all__ = ["HybridLM", "NO_WATERMARK"]
