"""Bounded load on loopback: simulated users, poison inputs and forged fast-weight events.

Everything here is a plain aiokafka producer talking to the broker of the chaos cluster.
Each sent record is remembered with the (partition, offset) the broker acknowledged, so the
checker can match dead letters and history rows back to what we sent. A send the broker
never acknowledged is kept apart (``send_errors``): it was refused, not lost.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from infra.topics import FAST_WEIGHTS, INTERACTIONS, RETRACTIONS
from streams.records import FastWeightsPublished, Interaction, Retraction

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
# Large enough for the 10 MB poison text: then the broker's own limit decides, not ours.
MAX_REQUEST_BYTES = 12 * 1024 * 1024


@dataclass
class Sent:
    """One record the broker acknowledged."""

    kind: str  # "turn", or the poison/forgery kind
    topic: str
    key: str | None
    event_id: str | None
    scope_id: str | None
    partition: int
    offset: int
    sent_at: float


@dataclass
class LoadReport:
    sent: list[Sent] = field(default_factory=list)
    send_errors: list[tuple[str, str]] = field(default_factory=list)  # (kind, error)
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def turns(self) -> list[Sent]:
        return [s for s in self.sent if s.kind == "turn"]


def user_text(rng: random.Random) -> str:
    """A turn of the facts task: a fact, some chatter or a question."""
    a, b = rng.sample(NAMES, 2)
    return rng.choice(
        (
            f"{a} reports to {b}.",
            f"who is {a}'s manager?",
            f"{a} likes tea and {b} likes coffee.",
            f"who is {a}'s manager's manager?",
        )
    )


def producer(bootstrap: str) -> AIOKafkaProducer:
    # Idempotent with retries: a broker outage shorter than the request timeout is survived
    # without duplicates, which is what a well-behaved client of Somna does.
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        request_timeout_ms=60_000,
        retry_backoff_ms=250,
        max_request_size=MAX_REQUEST_BYTES,
        linger_ms=5,
    )


async def send_raw(
    prod: AIOKafkaProducer,
    report: LoadReport,
    *,
    kind: str,
    topic: str,
    key: str | None,
    value: bytes,
    event_id: str | None = None,
    scope_id: str | None = None,
) -> Sent | None:
    try:
        meta = await prod.send_and_wait(
            topic, value=value, key=key.encode("utf-8") if key is not None else None
        )
    except Exception as e:  # the outcome we record: e.g. the broker refuses a 10 MB record
        report.send_errors.append((kind, f"{type(e).__name__}: {e}"))
        return None
    sent = Sent(kind, topic, key, event_id, scope_id, meta.partition, meta.offset, time.time())
    report.sent.append(sent)
    return sent


class UserLoad:
    """``n_events`` user turns over ``scopes``, at most ``rate`` per second, for at most
    ``max_seconds``; run in a thread so the test can inject faults meanwhile."""

    def __init__(
        self,
        bootstrap: str,
        scopes: list[str],
        n_events: int,
        *,
        rate: float = 10.0,
        max_seconds: float = 120.0,
        seed: int = 0,
        concurrency: int = 8,
    ) -> None:
        self.bootstrap = bootstrap
        self.scopes = scopes
        self.n_events = n_events
        self.rate = rate
        self.max_seconds = max_seconds
        self.rng = random.Random(seed)
        self.concurrency = concurrency
        self.report = LoadReport()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> UserLoad:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> LoadReport:
        assert self._thread is not None
        self._thread.join(timeout)
        return self.report

    @property
    def acked(self) -> int:
        return len(self.report.sent)

    async def _run(self) -> None:
        self.report.started_at = time.time()
        deadline = self.report.started_at + self.max_seconds
        prod = producer(self.bootstrap)
        await prod.start()
        pending: set[asyncio.Task] = set()
        try:
            for i in range(self.n_events):
                if self._stop.is_set() or time.time() > deadline:
                    break
                scope = self.scopes[i % len(self.scopes)]
                event = Interaction(
                    event_id=f"ev-{uuid.uuid4().hex}",
                    scope_id=scope,
                    session_id=f"{scope}-s0",
                    role="user",
                    text=user_text(self.rng),
                    ts=time.time(),
                )
                # Bounded concurrency keeps sends in flight through a broker outage.
                while len(pending) >= self.concurrency:
                    _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                pending.add(
                    asyncio.create_task(
                        send_raw(
                            prod,
                            self.report,
                            kind="turn",
                            topic=INTERACTIONS,
                            key=scope,
                            value=event.to_bytes(),
                            event_id=event.event_id,
                            scope_id=scope,
                        )
                    )
                )
                await asyncio.sleep(1.0 / self.rate)
            if pending:
                await asyncio.wait(pending)
        finally:
            await prod.stop()
            self.report.ended_at = time.time()


# --- poison and forgeries ------------------------------------------------------------------


def poison_records(
    scope: str, big_bytes: int = 10 * 1024 * 1024
) -> list[tuple[str, str, str, bytes]]:
    """(kind, topic, key, value) of each kind of bad input, for one good ``scope``."""
    good = Interaction(
        event_id="x", scope_id=scope, session_id="s", role="user", text="hi", ts=time.time()
    ).model_dump()

    def turn(**over: object) -> bytes:
        return json.dumps({**good, "event_id": f"bad-{uuid.uuid4().hex}", **over}).encode()

    return [
        ("malformed_json", INTERACTIONS, scope, b'{"schema_version": 1, "event_id": '),
        ("invalid_utf8", INTERACTIONS, scope, b'{"text": "\xff\xfe\xfa"}'),
        ("huge_text", INTERACTIONS, scope, turn(text="a" * big_bytes)),
        ("unknown_schema", INTERACTIONS, scope, turn(schema_version=99)),
        ("path_scope", INTERACTIONS, "../x", turn(scope_id="../x")),
        (
            "retract_missing",
            RETRACTIONS,
            scope,
            Retraction(
                scope_id=scope, event_id=f"never-{uuid.uuid4().hex}", reason="chaos", ts=time.time()
            ).to_bytes(),
        ),
    ]


def forged(original: FastWeightsPublished, **over: object) -> FastWeightsPublished:
    """A copy of a genuine announcement with some fields replaced (a forged version id)."""
    fields = original.model_dump()
    fields.update({"version": f"forged-{uuid.uuid4().hex[:12]}", "job_id": "forged", **over})
    return FastWeightsPublished(**fields)


async def send_records(bootstrap: str, records: list[tuple[str, str, str, bytes]]) -> LoadReport:
    """Send (kind, topic, key, value) records once each and report what the broker took.

    The 10 MB record goes through its own non-idempotent producer: a batch the broker
    refuses breaks the sequence numbers of an idempotent producer for what follows.
    """
    report = LoadReport(started_at=time.time())
    prod = producer(bootstrap)
    await prod.start()
    try:
        for kind, topic, key, value in records:
            if len(value) > 1_000_000:
                alone = AIOKafkaProducer(
                    bootstrap_servers=bootstrap, max_request_size=MAX_REQUEST_BYTES
                )
                await alone.start()
                try:
                    await send_raw(alone, report, kind=kind, topic=topic, key=key, value=value)
                finally:
                    await alone.stop()
            else:
                await send_raw(prod, report, kind=kind, topic=topic, key=key, value=value)
    finally:
        await prod.stop()
        report.ended_at = time.time()
    return report


def send_forged(bootstrap: str, events: list[FastWeightsPublished], kind: str) -> LoadReport:
    recs = [(kind, FAST_WEIGHTS, e.scope_id, e.to_bytes()) for e in events]
    return asyncio.run(send_records(bootstrap, recs))
