"""The model engine of the inference agent: an LRU of live per-scope memories.

A scope's live memory is a B = 1 ``MemoryState``: fast weights S consolidated up to a
watermark W, plus the events after W (pending, in the KV) woken with their Kafka offsets.
- a turn: wake its ``render_turn`` tokens at its offset (contract 2: every interaction is
  remembered); a user turn is then answered from ``<assistant>`` on a copy (batched over
  the scopes of the engine call, see below), so the generated reply is never remembered;
- a fast-weights swap: ``lm.swap_in`` keeps S' and drops only pending events at or below
  W' (invariant 1); a refused or stale artifact leaves the previous version serving. An
  accepted swap is staged and applied when the scope is next asked something, for all
  scopes of an engine call together (``lm.swap_in_batch``: one batched wake of the events
  each keeps after W'), so a burst of publishes costs only the scopes that ask, at batch
  prices. Most of that wake is done before the publish: the sleep worker wakes the events
  after W' it reads on the topic (``consolidation/prewake.py``), and a scope whose memory
  holds exactly those resumes from that state and wakes only what came after. A turn that only states a fact is woken over the state served so far (S and
  every event after its watermark: nothing is missing) and the swap stays staged: applied
  there, a burst's swaps made the fact calls right after it 3-4x dearer (16 scopes: 12 ms
  of wakes + 37 ms of re-wakes), and a question that came then waited behind them. A
  scope that only states facts still applies it once ``MAX_DEFERRED_EVENTS`` are pending.
  Staging is called from the event loop while the engine thread may be answering (a swap
  queued behind a 128-turn engine call waited ~200 ms for it), so ``staged`` and the
  scope table are guarded by ``_staging``; model work never holds it;
- a rollback (a publish older than what we serve, that the registry says is live): the
  dropped events cannot be put back from memory, so the scope is marked for a reload; the
  agent rebuilds it like an evicted one, from that version plus the topic after it;
- a retraction: the event leaves the pending buffer and S is re-derived without it (if it
  was already consolidated, the consolidator's rebuild job brings a new S);
- eviction: least recently used scopes leave memory; they come back from the registry's
  live fast weights plus the events after its watermark (``streams/loader.py``).

Turns are woken in rounds: round r takes the r-th turn of every scope of the engine call
and wakes them all with one ``wake_batch`` (each row its own position, KV, conv cache and
number of tokens; the state a B = 1 wake gives, up to float rounding), so order is kept
within a scope and 100 scopes with one turn each cost one forward, not 100. The replies,
where the time goes (``max_new_tokens`` decode steps each), are generated for all user
turns of a batch at once by ``generate_batch``: one decode step for every scope, each row
at its own position with its own (left-padded) KV cache (``somna bench answer``). A scope
with two user turns in a batch answers each from its state right after that turn's wake.
The agent's micro-batching is at the Kafka level (one ``getmany`` of up to 128 records,
streams/agent_consumer.py): one engine call per batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streams import metrics
from streams.engine import ScopeSnapshot, Turn, make_reply
from streams.records import FastWeightsPublished, Reply, Retraction

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 32
# Pending events of a scope that only states facts before its staged swap is applied anyway:
# what is buffered beside the fast weights stays bounded (~40 tokens an event).
MAX_DEFERRED_EVENTS = 128


@dataclass
class ScopeMemory:
    state: Any  # model.MemoryState, B = 1
    fast_weights_version: str | None
    offsets: dict[str, int] = field(default_factory=dict)  # event_id -> offset, pending only
    last_offset: int = -1  # the last offset woken (or folded into S)
    partition: int = -1  # of somna.interactions: the memory is valid while we own it
    staged: tuple[FastWeightsPublished, Any] | None = None  # accepted, applied at next use


class ModelEngine:
    uses_fast_weights = True
    blocking = True

    def __init__(
        self,
        lm: Any,
        *,
        base_model_version: str,
        max_scopes: int = 1024,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        from model.tokenizer import ASSISTANT, ByteTokenizer

        self.lm = lm.eval()
        self.base_model_version = base_model_version
        self.max_scopes = max_scopes
        self.max_new_tokens = max_new_tokens
        self._assistant = [ASSISTANT]
        self._tok = ByteTokenizer()
        self._scopes: OrderedDict[str, ScopeMemory] = OrderedDict()
        self._reload: set[str] = set()  # scopes whose memory is kept only until a reload
        # Guards ``staged`` and the table of scopes: swap() runs on the event loop.
        self._staging = threading.Lock()

    # ---- memory -----------------------------------------------------------------------
    def loaded(self, scope_id: str) -> bool:
        return scope_id in self._scopes and scope_id not in self._reload

    def reload(self, scope_id: str) -> None:
        """Have the agent rebuild the scope before its next turn (after a rollback).

        The memory stays until then: a batch already past its load still has one to answer
        from, and nothing is ever answered from an empty memory by mistake."""
        if scope_id in self._scopes:
            self._reload.add(scope_id)

    def live_scopes(self) -> int:
        return len(self._scopes)

    def memory(self, scope_id: str) -> ScopeMemory | None:
        """The scope's memory as it is served now (a staged swap applied)."""
        mem = self._scopes.get(scope_id)
        if mem is not None:
            self._apply_staged([mem])
        return mem

    def install(
        self, snapshots: dict[str, ScopeSnapshot], busy: Callable[[str], bool] | None = None
    ) -> None:
        """Rebuild scopes from their snapshots, all in one batched wake (a restarted
        worker's first batch brings every scope at once: ~20 ms each one by one). Room is
        made by evicting the least recently used scopes, never a ``busy`` one: its queued
        turns would find no memory (so memory may hold more than ``max_scopes`` a while)."""
        from model.tokenizer import render_turn

        plans = []
        for scope_id, snapshot in snapshots.items():
            weights, watermark, version = self._base_weights(snapshot)
            events = [(o, render_turn(e.role, e.text)) for o, e in snapshot.events if o > watermark]
            plans.append((scope_id, snapshot, weights, watermark, version, events))
        states = self.lm.rebuild_states([(w, mark, ev) for _, _, w, mark, _, ev in plans])
        with self._staging:
            for (scope_id, snapshot, _, watermark, version, events), state in zip(
                plans, states, strict=True
            ):
                offsets = {e.event_id: o for o, e in snapshot.events if o > watermark}
                mem = ScopeMemory(state, version, offsets, partition=snapshot.partition)
                mem.last_offset = max([watermark, *(o for o, _ in events)])
                old = self._scopes.get(scope_id)
                if old is not None and old.staged is not None:
                    # Staged while this snapshot was read: newer than it, or dropped then.
                    mem.staged = old.staged
                self._scopes[scope_id] = mem
                self._reload.discard(scope_id)
                self._scopes.move_to_end(scope_id)
            over = len(self._scopes) - self.max_scopes
            if over > 0:
                idle = (s for s in self._scopes if not (busy and busy(s)) and s not in snapshots)
                for evicted in list(itertools.islice(idle, over)):
                    del self._scopes[evicted]
                    self._reload.discard(evicted)
                    log.debug("evicted scope %s from memory", evicted)

    def _base_weights(self, snapshot: ScopeSnapshot) -> tuple[dict, int, str | None]:
        w = snapshot.weights
        if w is not None and self._acceptable(w):
            return w.tensors, int(w.watermark), w.version
        return self.lm.init_state(1).fast_weights(), -1, None

    def _acceptable(self, weights: Any) -> bool:
        """Fast weights only mean something under the base model and config they came from."""
        if str(weights.base_model_version) != str(self.base_model_version):
            log.warning(
                "fast weights %s of %s are for base model %s, serving %s: ignored",
                weights.version,
                weights.scope_id,
                weights.base_model_version,
                self.base_model_version,
            )
            return False
        config_hash = weights.metadata.get("config_hash")
        if config_hash and config_hash != self.lm.config.config_hash():
            log.warning(
                "fast weights %s of %s are for config %s: ignored",
                weights.version,
                weights.scope_id,
                config_hash,
            )
            return False
        return True

    def keep_partitions(self, partitions: set[int]) -> int:
        """After a rebalance: a partition we lost may be served by another worker meanwhile,
        so its scopes' memories would miss events; they are dropped and reload on demand."""
        with self._staging:
            gone = [s for s, m in self._scopes.items() if m.partition not in partitions]
            for scope in gone:
                del self._scopes[scope]
                self._reload.discard(scope)
        return len(gone)

    def set_base_model(self, lm: Any, version: str) -> int:
        """Serve ``lm`` from now on. Fast weights and KV are states of one base model, so
        every scope is dropped; each reloads when it next speaks, and ``_acceptable``
        then refuses live fast weights of the old base (until `somna memory rebuild`)."""
        with self._staging:
            dropped = len(self._scopes)
            self.lm = lm.eval()
            self.base_model_version = version
            self._scopes.clear()
            self._reload.clear()
        return dropped

    # ---- turns --------------------------------------------------------------------------
    def answer(self, turns: list[Turn]) -> list[Reply]:
        from model.tokenizer import render_turn

        mems: dict[str, ScopeMemory] = {}  # the batch's scopes, in order of first turn
        queues: dict[str, list[int]] = {}  # each scope's turns (indices), in order
        for i, turn in enumerate(turns):
            scope_id = turn.event.scope_id
            if scope_id not in mems:
                mems[scope_id] = self._touch(turn)
            queues.setdefault(scope_id, []).append(i)
        # Staged swaps: for the scopes asked something (their replies come from the new
        # version), or with too much pending; the others keep theirs staged (see above).
        # A scope's first turn is woken with its swap's events when it can be (one pass).
        asking = {t.event.scope_id for t in turns if t.wants_reply}
        rendered = [render_turn(t.event.role, t.event.text) for t in turns]
        firsts = {s: (turns[q[0]].offset, rendered[q[0]]) for s, q in queues.items()}
        with_swap = self._apply_staged(
            [m for s, m in mems.items() if s in asking or len(m.offsets) > MAX_DEFERRED_EVENTS],
            firsts,
        )
        asks: dict[int, tuple] = {}  # turn index -> (prompt, state to answer from, version)
        # Round r wakes the r-th turn of every scope in one batched call: order is kept
        # within a scope, and scopes never wait on each other.
        for r in range(max((len(q) for q in queues.values()), default=0)):
            wakes = []  # (turn index, memory, tokens)
            woken = []  # (turn index, memory): woken already, with the scope's swap
            for scope_id, queue in queues.items():
                if r >= len(queue):
                    continue
                i, mem = queue[r], mems[scope_id]
                turn, tokens = turns[i], rendered[i]
                if r == 0 and scope_id in with_swap:
                    woken.append((i, mem))
                elif turn.offset > mem.last_offset:
                    wakes.append((i, mem, tokens))
                elif turn.wants_reply:
                    # Redelivered (or folded into S by a sleep ahead of us): it is in memory
                    # already, maybe not last: ask it again with its tokens.
                    asks[i] = (tokens + self._assistant, mem.state, mem.fast_weights_version)
            if wakes:
                _, states = self.lm.wake_batch(
                    [tokens for _, _, tokens in wakes],
                    [mem.state for _, mem, _ in wakes],
                    [turns[i].offset for i, _, _ in wakes],
                )
                for (_, mem, _), state in zip(wakes, states, strict=True):
                    # wake_batch returns new states, so this reference stays the state
                    # right after this turn even when a later round moves the scope on.
                    mem.state = state
            for i, mem in woken + [(i, mem) for i, mem, _ in wakes]:
                turn = turns[i]
                mem.offsets[turn.event.event_id] = turn.offset
                mem.last_offset = turn.offset
                if turn.wants_reply:
                    asks[i] = (self._assistant, mem.state, mem.fast_weights_version)
        if not asks:
            return []
        order = sorted(asks)
        replies = self.lm.generate_batch(
            [asks[i][0] for i in order],
            [asks[i][1] for i in order],
            max_new_tokens=self.max_new_tokens,
        )
        return [
            make_reply(turns[i], self._tok.decode(ids), self.base_model_version, asks[i][2])
            for i, ids in zip(order, replies, strict=True)
        ]

    def _touch(self, turn: Turn) -> ScopeMemory:
        """The turn's scope, most recently used; a staged swap is left for the caller."""
        scope_id = turn.event.scope_id
        if scope_id not in self._scopes:  # the agent loads before answering; this is a fallback
            self.install({scope_id: ScopeSnapshot(None, None, partition=turn.partition)})
        with self._staging:
            self._scopes.move_to_end(scope_id)
            return self._scopes[scope_id]

    # ---- fast weights and retractions ---------------------------------------------------
    def swap(self, published: FastWeightsPublished, weights: Any) -> str:
        """Swap in a published version; "older" when its watermark is behind ours (a late
        publish, or a rollback: only the registry can tell, see ``streams/agent.py``)."""
        with self._staging:
            mem = self._scopes.get(published.scope_id)
            if mem is None:
                return "not_loaded"
            if weights.scope_id != published.scope_id or not self._acceptable(weights):
                return "refused"
            watermark, version = mem.state.watermark, mem.fast_weights_version
            if mem.staged is not None:  # what the scope will serve from its next use
                watermark, version = mem.staged[0].watermark, mem.staged[0].version
            if published.watermark < watermark:
                return "older"
            if published.watermark == watermark and published.version == version:
                return "stale"
            mem.staged = (published, weights)
            return "swapped"

    def _apply_staged(
        self, mems: list[ScopeMemory], firsts: dict[str, tuple[int, tuple]] | None = None
    ) -> set[str]:
        """Swap in the staged fast weights of these scopes, all in one batched wake of
        the events each keeps after its new watermark.

        ``firsts``: scope -> (offset, tokens) of a new event to wake right after those;
        a scope resuming from a pre-woken state wakes it in the same pass (the question
        that waited for the swap: one pass instead of two, ~25% of the call for 6 scopes).
        Returns the scopes whose event was woken: their state now ends with it, and the
        caller records it."""
        firsts = firsts or {}
        with self._staging:
            todo = [(m, m.staged) for m in mems if m.staged is not None]
        if not todo:
            return set()
        # Model work, outside the lock. A scope whose events after the new watermark a
        # sleep worker woke already resumes from that state (consolidation/prewake.py).
        states: list[Any] = [None] * len(todo)
        full, resumed = [], []  # indices into todo
        starts, tails = [], []  # of the resumed: pre-woken state, events after it
        rewoken = []  # of the resumed: tokens woken again (the tail less a first event)
        with_first: set[str] = set()
        for i, (mem, (published, weights)) in enumerate(todo):
            pending = mem.state.pending_events
            kept = [(e.offset, e.tokens) for e in pending if e.offset > published.watermark]
            pre = self._prewoken(published, weights, kept)
            if pre is None:
                full.append(i)
                continue
            resumed.append(i)
            starts.append(pre.state)
            tail = [k for k in kept if k[0] > pre.woken_to]
            rewoken.append(sum(len(ids) for _, ids in tail))
            first = firsts.get(published.scope_id)
            # Only an event after everything in memory and in S (not one a sleep ahead of
            # us folded in: the caller asks that one again instead of waking it twice).
            if first is not None and first[0] > max(mem.last_offset, published.watermark):
                tail.append(first)
                with_first.add(published.scope_id)
            tails.append(tail)
        if full:
            swaps = []
            for i in full:
                mem, (published, weights) = todo[i]
                swaps.append((mem.state, weights.tensors, published.watermark))
            for i, state in zip(full, self.lm.swap_in_batch(swaps), strict=True):
                states[i] = state
                metrics.SWAP_REWAKES.labels(prewoken="no").inc(state.pos)
        if resumed:
            woken = self.lm.resume_states(starts, tails)
            for i, state, tokens in zip(resumed, woken, rewoken, strict=True):
                states[i] = state
                metrics.SWAP_REWAKES.labels(prewoken="yes").inc(tokens)
        with self._staging:
            for (mem, staged), state in zip(todo, states, strict=True):
                if mem.staged is staged:
                    mem.staged = None  # else a newer one was staged meanwhile: next use
                published = staged[0]
                mem.state = state
                mem.fast_weights_version = published.version
                mem.offsets = {e: o for e, o in mem.offsets.items() if o > published.watermark}
                mem.last_offset = max(mem.last_offset, published.watermark)
        return with_first

    def _prewoken(
        self, published: FastWeightsPublished, weights: Any, kept: list[tuple[int, tuple]]
    ) -> Any | None:
        """The sleep worker's pre-woken state of this version, when it holds exactly the
        events this memory keeps up to where it was woken (same offsets, same tokens) and
        its S' is the verified artifact's; else None (the swap re-wakes everything)."""
        import torch

        from model.state import fast_weight_name

        pre = getattr(weights, "prewoken", None)
        if pre is None:
            return None
        state, config = pre.state, self.lm.config
        if state.config_hash != config.config_hash() or state.watermarks != [published.watermark]:
            return None
        woken = [(e.offset, tuple(e.tokens)) for e in state.pending_events]
        if woken != [(o, tuple(t)) for o, t in kept if o <= pre.woken_to]:
            return None  # an event not seen yet, retracted meanwhile, ...
        for j, layer in enumerate(config.gdn_layers):
            if not torch.equal(state.base_S[j][0], weights.tensors[fast_weight_name(layer)]):
                return None
        return dataclasses.replace(pre, state=state.to(self.lm.device))

    def retract(self, retraction: Retraction) -> bool:
        mem = self.memory(retraction.scope_id)
        if mem is None or retraction.event_id not in mem.offsets:
            return False
        gone = mem.offsets.pop(retraction.event_id)
        state = mem.state
        keep = [(e.offset, e.tokens) for e in state.pending_events if e.offset != gone]
        mem.state = self.lm.rebuild_state(state.fast_weights(), state.watermark, keep)
        return True
