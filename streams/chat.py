"""`somna chat`: one turn through Kafka, and the reply that comes back."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from infra.settings import Settings
from infra.topics import INTERACTIONS, REPLIES
from streams.exceptions import ReplyTimeout, StreamsError
from streams.records import Interaction, InvalidEvent, Reply, decode, new_id, now


class ReplyWaiter:
    """Reads ``somna.replies`` from its current end: start it before sending the turns."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False
        )

    async def start(self) -> None:
        await self.consumer.start()
        tps = [TopicPartition(REPLIES, p) for p in range(self.settings.partitions)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)

    async def stop(self) -> None:
        await self.consumer.stop()

    async def replies(self, timeout_ms: int = 200) -> list[Reply]:
        out = []
        for records in (await self.consumer.getmany(timeout_ms=timeout_ms)).values():
            for r in records:
                try:
                    out.append(decode(r.value, Reply))
                except InvalidEvent:
                    continue
        return out

    async def wait_for(self, event_id: str, timeout: float) -> Reply:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for reply in await self.replies():
                if reply.event_id == event_id:
                    return reply
        raise ReplyTimeout(
            f"no reply to {event_id} within {timeout:.0f}s: is `somna worker stream` "
            f"(or `somna up`) running against {self.settings.bootstrap}?"
        )


def make_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap, acks="all", enable_idempotence=True
    )


async def chat(
    settings: Settings,
    scope_id: str,
    text: str,
    *,
    session_id: str = "cli",
    role: str = "user",
    timeout: float = 60.0,
) -> Reply | None:
    """Send one turn keyed by its scope; wait for the reply of a user turn."""
    try:
        event = Interaction(
            event_id=new_id(),
            scope_id=scope_id,
            session_id=session_id,
            role=role,
            text=text,
            ts=now(),
        )  # type: ignore[arg-type]
    except ValidationError as e:
        raise StreamsError(f"not a valid turn: {e.errors()[0]['msg']}") from None
    if len(text.encode("utf-8")) > settings.max_text_bytes:
        raise StreamsError(f"text is over the limit of {settings.max_text_bytes} bytes")
    waiter, producer = ReplyWaiter(settings), make_producer(settings)
    await waiter.start()
    await producer.start()
    try:
        await producer.send_and_wait(INTERACTIONS, event.to_bytes(), key=scope_id.encode())
        if role != "user":
            return None
        return await waiter.wait_for(event.event_id, timeout)
    finally:
        await producer.stop()
        await waiter.stop()
