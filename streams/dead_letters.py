"""The one bad-input policy (invariant 6): anything that does not decode becomes a dead letter.

A payload that fails :func:`streams.records.decode` (bad JSON, invalid UTF-8, missing
fields, oversize text, unknown schema version, unsafe scope id), or whose Kafka key is
not its scope, is wrapped in a :class:`DeadLetter` (reason, source topic, partition,
offset, payload as base64) and produced to ``somna.dead-letters``; the worker logs it,
counts it and goes on with the next message. Nothing else is suppressed: a bug in our
own code still crashes the worker, as it should.

A dead letter carries at most ``MAX_PAYLOAD_BYTES`` of the payload (the reason says when
it was cut): somna.interactions takes records of up to 16 MiB so that an oversize text
reaches us and is refused here with its reason, but a dead letter of that size would be
refused by the producer in turn, and then the whole batch would fail with it.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from infra.topics import DEAD_LETTERS
from streams import metrics
from streams.records import DeadLetter, Event, InvalidEvent, decode, now

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord
    from faust.types import EventT

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)

# Enough of a bad payload to see what it was; far below the producer's 1 MB request limit.
MAX_PAYLOAD_BYTES = 64 * 1024

# Produces (key, value) to the dead-letters topic; the worker passes a Faust or aiokafka send.
SendFn = Callable[[bytes | None, bytes], Awaitable[object]]


def dead_letter_for(
    raw: bytes | None,
    *,
    reason: str,
    topic: str,
    partition: int,
    offset: int,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> DeadLetter:
    raw = raw or b""
    if len(raw) > max_payload_bytes:
        reason = f"{reason} (payload cut to its first {max_payload_bytes} of {len(raw)} bytes)"
        raw = raw[:max_payload_bytes]
    return DeadLetter(
        source_topic=topic,
        partition=partition,
        offset=offset,
        error=reason,
        payload=base64.b64encode(raw).decode("ascii"),
        ts=now(),
    )


class DeadLetterPolicy:
    """Decode or divert: ``await policy.decode(...)`` returns the event or ``None``."""

    def __init__(self, send: SendFn, *, max_text_bytes: int, silent: bool = False) -> None:
        self._send = send
        self.max_text_bytes = max_text_bytes
        self.silent = silent
        self._claimed: set[str] = set()

    def claim(self, topic: str) -> DeadLetterPolicy:
        """The policy for one role's consumer of ``topic``.

        Several roles of a worker read the same topic; only the first to claim it reports
        its bad payloads, so that each one is dead-lettered once. The others skip silently.
        """
        if topic in self._claimed:
            return DeadLetterPolicy(self._send, max_text_bytes=self.max_text_bytes, silent=True)
        self._claimed.add(topic)
        return self

    async def decode(
        self,
        raw: bytes | None,
        kind: type[E],
        *,
        key: bytes | None,
        topic: str,
        partition: int,
        offset: int,
    ) -> E | None:
        try:
            event = decode(raw, kind, max_text_bytes=self.max_text_bytes)
            scope = getattr(event, "scope_id", None)
            # Keys route a scope to its one owner (invariant 5): a mismatch is misrouted input.
            if scope is not None and key is not None and key != scope.encode("utf-8"):
                raise InvalidEvent(f"Kafka key {key!r} is not the event's scope_id {scope!r}")
            return event
        except InvalidEvent as e:
            await self.divert(
                raw, key=key, reason=e.reason, topic=topic, partition=partition, offset=offset
            )
            return None

    async def decode_event(self, ev: EventT, kind: type[E]) -> E | None:
        """:meth:`decode` for a Faust event: its value, key and position in the log."""
        msg = ev.message
        return await self.decode(
            ev.value, kind, key=ev.key, topic=msg.topic, partition=msg.partition, offset=msg.offset
        )

    async def decode_record(self, record: ConsumerRecord, kind: type[E]) -> E | None:
        """:meth:`decode` for a record read with aiokafka (a read-back, streams/gaps.py)."""
        return await self.decode(
            record.value, kind, key=record.key, topic=record.topic,
            partition=record.partition, offset=record.offset,
        )  # fmt: skip

    async def divert(
        self,
        raw: bytes | None,
        *,
        key: bytes | None = None,
        reason: str,
        topic: str,
        partition: int,
        offset: int,
    ) -> None:
        if self.silent:
            return
        letter = dead_letter_for(
            raw, reason=reason, topic=topic, partition=partition, offset=offset
        )
        log.warning("dead letter from %s[%d]@%d: %s", topic, partition, offset, reason)
        await self._send(key, letter.to_bytes())
        metrics.DEAD_LETTERS.labels(source_topic=topic).inc()


__all__ = ["DEAD_LETTERS", "MAX_PAYLOAD_BYTES", "DeadLetterPolicy", "dead_letter_for"]
