"""``MemoryState``: everything a scope's model remembers between calls.

    base_S     fast weights consolidated up to the watermark (what a sleep produces and
               what the artifact stores), one (B, H, K, V) fp32 tensor per GDN layer
    S          the running fast weights: base_S advanced by wake over the pending tokens
    conv       the short-conv caches of the GDN layers (running)
    kv         the sliding-window KV cache of each attention layer (running)
    pending    per scope, the not-yet-consolidated events (Kafka offset, tokens)
    watermarks per scope, the offset of the last event folded into base_S (-1: none)

Invariant (no gap): the scope's history = events <= watermark (in base_S) + pending.
A state is batched over B scopes (sleep workers stack many); agents hold B = 1.
``DecodeRows`` batches B = 1 states of different lengths (positions, KV caches) for one
greedy decode of their replies (``HybridLM.generate_batch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from model.blocks import KVBuffer
from model.config import HybridConfig
from model.exceptions import InputError, StateMismatchError

NO_WATERMARK = -1


class PendingEvent(NamedTuple):
    offset: int  # Kafka offset in the scope's partition of somna.interactions
    tokens: tuple[int, ...]  # render_turn(...) of the event


def fast_weight_name(layer: int) -> str:
    """Artifact tensor name of the S of GDN layer ``layer`` (index in the full stack)."""
    return f"layers.{layer}.S"


@dataclass
class MemoryState:
    config_hash: str
    gdn_layers: list[int]
    base_S: list[Tensor]
    S: list[Tensor]
    conv: list[Tensor | None]
    kv: list[tuple[Tensor, Tensor] | None]
    pos: int = 0
    watermarks: list[int] = field(default_factory=list)
    pending: list[list[PendingEvent]] = field(default_factory=list)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def zeros(
        cls, config: HybridConfig, batch: int = 1, device: torch.device | str | None = None
    ) -> MemoryState:
        shape = (batch, config.n_heads, config.head_dim, config.head_dim)
        base = [torch.zeros(shape, device=device) for _ in config.gdn_layers]
        return cls(
            config_hash=config.config_hash(),
            gdn_layers=list(config.gdn_layers),
            base_S=base,
            S=[s.clone() for s in base],
            conv=[None] * len(base),
            kv=[None] * len(config.attn_layers),
            watermarks=[NO_WATERMARK] * batch,
            pending=[[] for _ in range(batch)],
        )

    @classmethod
    def from_fast_weights(
        cls,
        fast_weights: dict[str, Tensor],
        config: HybridConfig,
        watermark: int = NO_WATERMARK,
        device: torch.device | str | None = None,
    ) -> MemoryState:
        """A B = 1 state whose base and running S are ``fast_weights`` (as returned by
        ``fast_weights()``), with an empty KV and nothing pending."""
        state = cls.zeros(config, 1, device)
        expected = {fast_weight_name(i) for i in config.gdn_layers}
        if set(fast_weights) != expected:
            raise StateMismatchError(
                f"fast weights have tensors {sorted(fast_weights)}, config "
                f"{config.config_hash()} expects {sorted(expected)}"
            )
        shape = tuple(state.base_S[0].shape[1:]) if state.base_S else ()
        for j, layer in enumerate(config.gdn_layers):
            t = fast_weights[fast_weight_name(layer)]
            if tuple(t.shape) != shape:
                raise StateMismatchError(
                    f"fast weight {fast_weight_name(layer)} has shape {tuple(t.shape)}, "
                    f"config expects {shape}"
                )
            if t.dtype != torch.float32:
                raise InputError(
                    f"fast weight {fast_weight_name(layer)} must be float32, got {t.dtype}"
                )
            state.base_S[j] = t.to(state.base_S[j].device).clone()[None]
            state.S[j] = state.base_S[j].clone()
        state.watermarks = [int(watermark)]
        return state

    # ---- views ----------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return len(self.watermarks)

    @property
    def watermark(self) -> int:
        """The watermark of a single-scope state."""
        self._require_single("watermark")
        return self.watermarks[0]

    @property
    def pending_events(self) -> list[PendingEvent]:
        self._require_single("pending_events")
        return self.pending[0]

    def pending_tokens(self, upto: int | None = None) -> list[int]:
        """Tokens of the pending events with offset <= upto (all when None), in order."""
        return [
            t for e in self.pending_events if upto is None or e.offset <= upto for t in e.tokens
        ]

    def fast_weights(self) -> dict[str, Tensor]:
        """The consolidated S of a single-scope state: ``{layers.<i>.S: (H, K, V) fp32}``."""
        self._require_single("fast_weights")
        return {
            fast_weight_name(i): s[0].detach().clone()
            for i, s in zip(self.gdn_layers, self.base_S, strict=True)
        }

    def nbytes(self) -> dict[str, int]:
        """Memory held, by part (the memory benchmark reports it)."""
        kv = sum(t.numel() * t.element_size() for c in self.kv if c is not None for t in c)
        fw = sum(s.numel() * s.element_size() for s in self.S)
        conv = sum(c.numel() * c.element_size() for c in self.conv if c is not None)
        pending = sum(len(e.tokens) for p in self.pending for e in p) * 4
        return {"fast_weights": fw, "kv": kv, "conv": conv, "pending_tokens": pending}

    def check(self, config: HybridConfig) -> None:
        """Raise StateMismatchError if this state was not made for ``config``."""
        if self.config_hash != config.config_hash():
            raise StateMismatchError(
                f"state was made for config {self.config_hash}, model has {config.config_hash()}"
            )

    # ---- copies, batching -----------------------------------------------------------
    def clone(self) -> MemoryState:
        return MemoryState(
            config_hash=self.config_hash,
            gdn_layers=list(self.gdn_layers),
            base_S=[s.clone() for s in self.base_S],
            S=[s.clone() for s in self.S],
            conv=[None if c is None else c.clone() for c in self.conv],
            kv=[None if c is None else (c[0].clone(), c[1].clone()) for c in self.kv],
            pos=self.pos,
            watermarks=list(self.watermarks),
            pending=[list(p) for p in self.pending],
        )

    def to(self, device: torch.device | str) -> MemoryState:
        out = self.clone()
        out.base_S = [s.to(device) for s in out.base_S]
        out.S = [s.to(device) for s in out.S]
        out.conv = [None if c is None else c.to(device) for c in out.conv]
        out.kv = [None if c is None else (c[0].to(device), c[1].to(device)) for c in out.kv]
        return out

    @staticmethod
    def stack(states: list[MemoryState]) -> MemoryState:
        """Batch single- or multi-scope states for a batched sleep. Only states without a
        running KV/conv cache can be stacked (sleep starts from base_S anyway)."""
        if not states:
            raise InputError("MemoryState.stack needs at least one state")
        first = states[0]
        for s in states:
            if s.config_hash != first.config_hash:
                raise StateMismatchError(
                    f"cannot stack states of configs {first.config_hash} and {s.config_hash}"
                )
        n = len(first.base_S)
        return MemoryState(
            config_hash=first.config_hash,
            gdn_layers=list(first.gdn_layers),
            base_S=[torch.cat([s.base_S[j] for s in states]) for j in range(n)],
            S=[torch.cat([s.S[j] for s in states]) for j in range(n)],
            conv=[None] * n,
            kv=[None] * len(first.kv),
            pos=0,
            watermarks=[w for s in states for w in s.watermarks],
            pending=[list(p) for s in states for p in s.pending],
        )

    def split(self) -> list[MemoryState]:
        """One B = 1 state per scope (inverse of ``stack`` for cache-free states)."""
        out = []
        for b in range(self.batch):
            out.append(
                MemoryState(
                    config_hash=self.config_hash,
                    gdn_layers=list(self.gdn_layers),
                    base_S=[s[b : b + 1].clone() for s in self.base_S],
                    S=[s[b : b + 1].clone() for s in self.S],
                    conv=[None if c is None else c[b : b + 1].clone() for c in self.conv],
                    kv=[
                        None if c is None else (c[0][b : b + 1].clone(), c[1][b : b + 1].clone())
                        for c in self.kv
                    ],
                    pos=self.pos,
                    watermarks=[self.watermarks[b]],
                    pending=[list(self.pending[b])],
                )
            )
        return out

    def _require_single(self, what: str) -> None:
        if self.batch != 1:
            raise InputError(
                f"MemoryState.{what} needs a single-scope state, this one has B={self.batch}; split() it first"
            )


@dataclass
class DecodeRows:
    """The running memory of several single-scope states, batched for a greedy decode.

    Unlike a ``MemoryState`` batch, each row keeps its own position and its own KV length
    (``KVBuffer``: left-padded, written in place). Only what decoding reads is kept (no
    base S, no pending events): replies are never remembered.
    """

    rows: list[int]  # each row's index in the caller's list
    S: list[Tensor]  # (B, H, K, V) per GDN layer
    conv: list[Tensor | None]  # (B, C, size - 1) per GDN layer; None: all rows at start
    kv: list[KVBuffer]  # per attention layer
    pos: Tensor  # (B,) each row's next position

    @classmethod
    def of(cls, states: list[MemoryState], rows: list[int], device: torch.device) -> DecodeRows:
        """Rows from single-scope states (copied; the states are left alone)."""
        parts = []
        for state, row in zip(states, rows, strict=True):
            if state.batch != 1:
                raise InputError(f"a decode row needs a single-scope state, got B={state.batch}")
            zero = torch.zeros(1, dtype=torch.long, device=device)
            parts.append(
                cls(
                    rows=[row],
                    S=list(state.S),
                    conv=list(state.conv),
                    kv=[
                        KVBuffer(None, None, 0, zero)
                        if c is None or not c[0].shape[2]
                        else KVBuffer(c[0], c[1], c[0].shape[2], zero)
                        for c in state.kv
                    ],
                    pos=torch.tensor([state.pos], device=device),
                )
            )
        return cls.cat(parts)

    @classmethod
    def cat(cls, parts: list[DecodeRows]) -> DecodeRows:
        """Rows of all parts in order (new tensors); conv caches a row has not started yet
        become zeros (what the conv pads with), KV caches are left-padded to the widest."""
        if not parts:
            raise InputError("DecodeRows.cat needs at least one part")
        sizes = [len(p.rows) for p in parts]
        conv = [_cat_or_none([p.conv[j] for p in parts], sizes) for j in range(len(parts[0].conv))]
        return cls(
            rows=[r for p in parts for r in p.rows],
            S=[torch.cat([p.S[j] for p in parts]) for j in range(len(parts[0].S))],
            conv=conv,
            kv=[_cat_kv([p.kv[a] for p in parts], sizes) for a in range(len(parts[0].kv))],
            pos=torch.cat([p.pos for p in parts]),
        )

    def select(self, keep: list[int]) -> DecodeRows:
        """Only the rows at batch indices ``keep`` (rows that stopped leave the batch)."""
        idx = torch.tensor(keep, device=self.pos.device)
        return DecodeRows(
            rows=[self.rows[i] for i in keep],
            S=[s[idx] for s in self.S],
            conv=[None if c is None else c[idx] for c in self.conv],
            kv=[
                KVBuffer(
                    None if b.k is None else b.k[idx],
                    None if b.v is None else b.v[idx],
                    b.filled,
                    b.first[idx],
                )
                for b in self.kv
            ],
            pos=self.pos[idx],
        )


def _cat_or_none(tensors: list[Tensor | None], sizes: list[int]) -> Tensor | None:
    """Concatenate along the batch; a None part (a cache not started) becomes zeros."""
    like = next((t for t in tensors if t is not None), None)
    if like is None:
        return None
    return torch.cat(
        [
            t if t is not None else like.new_zeros((n, *like.shape[1:]))
            for t, n in zip(tensors, sizes, strict=True)
        ]
    )


def _cat_kv(bufs: list[KVBuffer], sizes: list[int]) -> KVBuffer:
    """One buffer for the rows of all; each part left-padded to the widest (its ``first``
    moves right by the padding, so padded columns are never attended)."""
    width = max(b.filled for b in bufs)
    first = torch.cat([b.first + (width - b.filled) for b in bufs])
    like = next((b for b in bufs if b.k is not None and b.filled), None)
    if like is None or like.k is None or like.v is None:
        return KVBuffer(None, None, 0, first.clamp(max=0))
    ks, vs = [], []
    for b, n in zip(bufs, sizes, strict=True):
        for t, out, ref in ((b.k, ks, like.k), (b.v, vs, like.v)):
            if t is None:
                out.append(ref.new_zeros((n, ref.shape[1], width, ref.shape[3])))
            else:
                out.append(F.pad(t[:, :, : b.filled], (0, 0, width - b.filled, 0)))
    return KVBuffer(torch.cat(ks), torch.cat(vs), width, first)
