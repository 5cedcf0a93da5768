"""`somna demo`: simulated users speaking the facts task, and a live view of the service.

Each user is a scope. It walks through a dialogue of the facts task (``model.tasks.facts``):
it states facts, chatters, then asks 1- to 3-hop questions. Every turn goes through Kafka
like any client's; a question waits for its reply, which is scored against the expected
answer (exact match). The view shows throughput, round-trip p50/p99 latency, the sleep
jobs and fast-weight versions going by, and the fraction of questions answered right.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from infra.settings import Settings
from infra.topics import FAST_WEIGHTS, INTERACTIONS, SLEEP_JOBS
from streams.chat import ReplyWaiter, make_producer
from streams.records import Interaction, new_id, now

# Tokens per chunk of the generated dialogues: the facts task's (and the shipped model's).
DIALOGUE_CHUNK = 64


@dataclass
class Step:
    role: str
    text: str
    answer: str | None = None  # set on a question: what the assistant should say


def dialogue(seed: int, chunk: int) -> list[Step]:
    """One facts-task dialogue as turns: the example's token stream cut at turn boundaries."""
    from model.tasks.facts import FactsConfig, make_example
    from model.tokenizer import EOT, ROLE_IDS, ByteTokenizer

    roles = {v: k for k, v in ROLE_IDS.items()}
    example = make_example(FactsConfig(chunk=chunk, gap_chunks=1), random.Random(seed), "heldout")
    tok, steps, role, body = ByteTokenizer(), [], None, []
    for i in example.ids:
        if i in roles:
            role, body = roles[i], []
        elif i == EOT and role is not None:
            steps.append(Step(role, tok.decode(body)))
            role = None
        elif role is not None:
            body.append(i)
    # An assistant turn is the answer to the user turn before it: the model must produce it.
    out: list[Step] = []
    for step in steps:
        if step.role == "assistant" and out and out[-1].role == "user":
            out[-1].answer = step.text
        elif step.role != "assistant" and step.text:
            out.append(step)
    return out


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    sent: int = 0
    replies: int = 0
    asked: int = 0
    right: int = 0
    sleep_jobs: int = 0
    versions: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=2000))  # seconds
    reply_times: deque = field(default_factory=lambda: deque(maxlen=5000))  # monotonic

    def rate(self, window: float = 10.0) -> float:
        cutoff = time.monotonic() - window
        recent = [t for t in self.reply_times if t >= cutoff]
        return len(recent) / min(window, max(1e-9, time.monotonic() - self.started))

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000.0


def view(stats: Stats, users: int) -> Panel:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(justify="right")
    acc = f"{stats.right / stats.asked:.0%} ({stats.right}/{stats.asked})" if stats.asked else "-"
    for name, value in [
        ("users", str(users)),
        ("turns sent", str(stats.sent)),
        ("replies", str(stats.replies)),
        ("throughput (replies/s, 10 s)", f"{stats.rate():.1f}"),
        ("latency p50 (ms, round trip)", f"{stats.percentile(0.50):.0f}"),
        ("latency p99 (ms, round trip)", f"{stats.percentile(0.99):.0f}"),
        ("sleep jobs", str(stats.sleep_jobs)),
        ("fast-weight versions", str(stats.versions)),
        ("questions answered right", acc),
        ("uptime (s)", f"{time.monotonic() - stats.started:.0f}"),
    ]:
        t.add_row(name, value)
    return Panel(Group(t), title="somna demo", subtitle="Ctrl-C to stop")


async def _count(settings: Settings, stats: Stats, stop: asyncio.Event) -> None:
    """Counts sleep jobs and fast-weight versions of the demo's scopes as they go by."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [
            TopicPartition(t, p)
            for t in (SLEEP_JOBS, FAST_WEIGHTS)
            for p in range(settings.partitions)
        ]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        while not stop.is_set():
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                mine = [r for r in records if r.key and r.key.startswith(b"demo-")]
                if tp.topic == SLEEP_JOBS:
                    stats.sleep_jobs += len(mine)
                else:
                    stats.versions += len(mine)
    finally:
        await consumer.stop()


async def run_demo(
    settings: Settings,
    *,
    users: int = 8,
    duration: float = 0.0,
    think: float = 0.2,
    seed: int = 0,
    chunk: int = DIALOGUE_CHUNK,
    timeout: float = 60.0,
    live: bool = True,
) -> Stats:
    """Run until ``duration`` seconds have passed (0: until cancelled); returns the stats."""
    stats, stop = Stats(), asyncio.Event()
    waiter, producer = ReplyWaiter(settings), make_producer(settings)
    await waiter.start()
    await producer.start()
    pending: dict[str, asyncio.Future] = {}
    run_id = new_id()[:6]

    async def route_replies() -> None:
        while not stop.is_set():
            for reply in await waiter.replies():
                fut = pending.pop(reply.event_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)

    async def user(u: int) -> None:
        scope, rng, n = f"demo-{run_id}-{u}", random.Random(seed * 1000 + u), 0
        while not stop.is_set():
            for step in dialogue(rng.randrange(1 << 30), chunk):
                if stop.is_set():
                    return
                event = Interaction(
                    event_id=new_id(),
                    scope_id=scope,
                    session_id=f"s{n}",
                    role=step.role,
                    text=step.text,
                    ts=now(),
                )  # type: ignore[arg-type]
                fut = asyncio.get_running_loop().create_future() if step.role == "user" else None
                if fut is not None:
                    pending[event.event_id] = fut
                t0 = time.monotonic()
                await producer.send_and_wait(INTERACTIONS, event.to_bytes(), key=scope.encode())
                stats.sent += 1
                if fut is not None:
                    try:
                        reply = await asyncio.wait_for(fut, timeout)
                    except TimeoutError:
                        pending.pop(event.event_id, None)
                        continue
                    stats.replies += 1
                    stats.latencies.append(time.monotonic() - t0)
                    stats.reply_times.append(time.monotonic())
                    if step.answer is not None:
                        stats.asked += 1
                        stats.right += reply.text.strip() == step.answer.strip()
                await asyncio.sleep(think * rng.uniform(0.5, 1.5))
            n += 1

    tasks = [
        asyncio.create_task(route_replies()),
        asyncio.create_task(_count(settings, stats, stop)),
    ]
    tasks += [asyncio.create_task(user(u)) for u in range(users)]
    try:
        if live:
            with Live(view(stats, users), refresh_per_second=2) as screen:
                await _until(stop, duration, lambda: screen.update(view(stats, users)))
        else:
            await _until(stop, duration, lambda: None)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await producer.stop()
        await waiter.stop()
    return stats


async def _until(stop: asyncio.Event, duration: float, tick: Callable[[], object]) -> None:
    end = time.monotonic() + duration if duration > 0 else float("inf")
    while time.monotonic() < end and not stop.is_set():
        tick()
        await asyncio.sleep(0.5)
