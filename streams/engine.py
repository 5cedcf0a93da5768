"""What the inference agent asks of a model: the :class:`Engine` protocol, and a null engine.

An engine owns the per-scope memory and is called from one thread only (see
``streams/agent.py``). :class:`NullEngine` answers without a model: the pipeline benchmark
uses it to measure the streaming overhead alone; ``streams/memory.py`` has the real one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from streams.records import FastWeightsPublished, Interaction, Reply, Retraction, reply_id_for

# A user turn older than this is remembered but not answered: the asker has gone, and a
# new consumer group starting from the earliest offset must not answer the whole log.
STALE_TURN_SECONDS = 300.0


@dataclass(frozen=True)
class Turn:
    """One consumed interaction and where it came from."""

    event: Interaction
    partition: int
    offset: int
    produced_at: float | None  # the record's timestamp, seconds (producer clock)

    @property
    def stale(self) -> bool:
        """Produced so long ago that nobody waits for its reply (a new group's backlog)."""
        return self.produced_at is not None and time.time() - self.produced_at > STALE_TURN_SECONDS

    @property
    def wants_reply(self) -> bool:
        return self.event.role == "user" and not self.stale

    def latency_ms(self) -> float:
        if not self.produced_at:
            return 0.0
        return max(0.0, (time.time() - self.produced_at) * 1000.0)


@dataclass
class ScopeSnapshot:
    """What a scope's memory is rebuilt from: live fast weights + the events after them."""

    weights: Any | None  # consolidation.fast_weights.FastWeights, or None: start from the base
    published: FastWeightsPublished | None
    events: list[tuple[int, Interaction]] = field(default_factory=list)  # (offset, event)
    partition: int = -1  # the scope's partition of somna.interactions


class Engine(Protocol):
    base_model_version: str
    uses_fast_weights: bool
    blocking: bool  # does model work: the agent calls it on its engine thread

    def loaded(self, scope_id: str) -> bool: ...

    def install(
        self, snapshots: dict[str, ScopeSnapshot], busy: Callable[[str], bool] | None = None
    ) -> None:
        """Load scopes (by id) into memory from their snapshots; making room never evicts
        a ``busy`` scope (one with turns queued)."""
        ...

    def answer(self, turns: list[Turn]) -> list[Reply]:
        """Remember every turn; reply to the user turns, in order."""
        ...

    def swap(self, published: FastWeightsPublished, weights: Any) -> str:
        """Stage a scope's new S, applied at its next use; returns the outcome ("swapped",
        "stale", ...). Called on the event loop, not the engine thread: it must only
        stage (no model work), safely beside an engine call running on that thread."""
        ...

    def retract(self, retraction: Retraction) -> bool: ...

    def reload(self, scope_id: str) -> None:
        """Rebuild the scope from the registry on its next turn (after a rollback)."""
        ...

    def keep_partitions(self, partitions: set[int]) -> int:
        """Forget the scopes of other partitions (after a rebalance); returns how many."""
        ...

    def set_base_model(self, lm: Any, version: str) -> int:
        """Serve another base model (``production`` moved); returns how many scopes were
        dropped (their memory belonged to the old one)."""
        ...

    def live_scopes(self) -> int: ...


def make_reply(turn: Turn, text: str, base_model_version: str, fw_version: str | None) -> Reply:
    return Reply(
        reply_id=reply_id_for(turn.event.event_id),
        event_id=turn.event.event_id,
        scope_id=turn.event.scope_id,
        text=text,
        base_model_version=base_model_version,
        fast_weights_version=fw_version,
        latency_ms=turn.latency_ms(),
        ts=time.time(),
    )


class NullEngine:
    """No model, no memory: replies ``ok`` to every user turn."""

    base_model_version = "null"
    uses_fast_weights = False
    blocking = False

    def loaded(self, scope_id: str) -> bool:
        return True

    def install(
        self, snapshots: dict[str, ScopeSnapshot], busy: Callable[[str], bool] | None = None
    ) -> None:
        pass

    def answer(self, turns: list[Turn]) -> list[Reply]:
        return [make_reply(t, "ok", self.base_model_version, None) for t in turns if t.wants_reply]

    def swap(self, published: FastWeightsPublished, weights: Any) -> str:
        return "ignored"

    def retract(self, retraction: Retraction) -> bool:
        return False

    def reload(self, scope_id: str) -> None:
        pass

    def keep_partitions(self, partitions: set[int]) -> int:
        return 0

    def set_base_model(self, lm: Any, version: str) -> int:
        return 0

    def live_scopes(self) -> int:
        return 0
