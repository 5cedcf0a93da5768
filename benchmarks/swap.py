"""`somna bench swap`: hot-swap latency and consolidation lag, on the real pipeline.

Processes: the agent's stream worker (the real model), a stream worker with the history
aggregator and the consolidation processor, and one sleep worker, on an embedded broker
and MLflow server (or ``SOMNA_KAFKA_BOOTSTRAP`` / ``SOMNA_MLFLOW_URI``); the deployment of
``somna up``. In one stream worker the consolidator's bursts of sleep jobs (~50 at once
when the scopes' chunks fill together) held the agent's event loop while a burst of
publishes was being swapped in (see ``STREAM_WORKERS``).

1. Consolidation lag: S active scopes (100; ``--quick``: 10) each state facts of the
   benchmark task (:class:`Talk`) as system turns (remembered, not answered) at a steady
   rate. Lag of an event = from its send to the receipt of the scope's first
   ``FastWeightsPublished`` whose watermark covers it. A scope's job is due when
   ``chunk_tokens`` fill or after ``idle_seconds``.
2. Hot-swap latency: when a publish of a probed scope is seen, the bench asks that scope a
   question about its facts (one in flight at a time) until a reply carries the new
   version. Latency = from the publish record's timestamp to the receipt of that reply.
   Baseline, same run: the round trip of a question when nothing is swapped (the ratio
   is reported). Target: swap p99 < 200 ms. Every scope is loaded (a warm-up question)
   before the load starts, and publishes are probed only from then: a cold scope's load
   holds the agent's answer loop (~0.3 s a scope), which is a cold start, not a hot swap.
3. Diagnostic (``swap_diagnostic`` in the JSON, a line under the table): per probed swap,
   its timeline (publish, bench sees it, agent staged it, each probe's send / reply built /
   receipt and version), old-version replies per swap, the final probe's agent side
   (``latency_ms``) and delivery; the reply round trip *during* the load (one probed scope
   at a time, no swap pending); the agent's own slow-batch log lines (batches over 100 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from benchmarks import machine
from infra.topics import FAST_WEIGHTS, INTERACTIONS, REPLIES
from model.tasks.common import name_pool
from model.tasks.facts import FactsConfig, fact_text, question_text
from streams.app import AGENT_ROLES, AGGREGATOR_ROLES
from streams.records import FastWeightsPublished, Interaction, Reply, decode, now
from streams.swaps import DEFER_UNWANTED_SECONDS

console = Console()
PROBE_EVERY = 0.005  # the prober looks at least this often (it is woken on a publish or reply)
# During the load, one probed scope with no swap pending (in turn) is asked a question this
# often: the reply round trip under the same load as the swaps (the baseline phases run
# without it). One at a time, so these questions add little to the load they measure.
LOAD_RTT_EVERY = 0.5
CHUNK_TOKENS = 96
TARGET_MS = 200.0  # the hot-swap target: p99 from publish to the first reply with it
SLOW_PROBE_S = TARGET_MS / 1000  # probed swaps over the target are listed in the diagnostic
IDLE_SECONDS = 3.0
# The stream workers and their roles (infra/up.py runs the same). The same code, 2-core
# Intel box, probes asking "hi?" (see Talk): all three roles in one worker, hot swap p50
# 176-202 ms, p99 298-422, 44-64% within the target (4 runs); the agent alone, p50
# 114-165, p99 188-347, 73-100% (8 runs). With the task's questions and the agent's whole
# worker at nice -10 (settings.agent_nice): p50 87-123, p99 134-321 (4 runs of 5 < 200);
# the same agent, each probe sent at once (session 16): p50 59-106, p99 103-195 (15 runs).
STREAM_WORKERS = (AGENT_ROLES, AGGREGATOR_ROLES)
PASSES = 2


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class Talk:
    """What the bench's users say, in the benchmark task's fact language (DESIGN.md; the
    shipped checkpoint's training task, as in ``somna demo``): each scope states the facts
    of its own reporting chain ("kim reports to bob.") and asks who someone's boss is.

    The questions shape what is measured: a reply is decoded token by token, and the
    task's answers are one name ("bob.", ~5 tokens). The bench asked "hi?" until session
    15; after the bench's old facts ("fact 12 of -006: x5 reports to y2.") the model
    often ran on to the 32-token cap, and the merged decodes of those replies were the
    hot swap's tail."""

    CHAIN = 12  # people per scope's chain; its facts repeat, as a user's would

    def __init__(self, scopes: list[str]) -> None:
        rng = random.Random(0)
        self.chains = {s: rng.sample(name_pool("train"), self.CHAIN) for s in scopes}
        self._asked: dict[str, int] = defaultdict(int)
        self._cfg = FactsConfig()

    def fact(self, scope: str, n: int) -> str:
        """The scope's n-th fact: link ``n`` of its chain (cyclic)."""
        chain, i = self.chains[scope], n % (self.CHAIN - 1)
        return fact_text(chain[i], chain[i + 1], self._cfg)

    def question(self, scope: str) -> str:
        """A 1-hop question about the scope's chain, a different person each time."""
        k = self._asked[scope] % (self.CHAIN - 1)
        self._asked[scope] += 1
        return question_text(self.chains[scope][k], 1, self._cfg)


class Bench:
    def __init__(self, bootstrap: str, scopes: list[str], probed: set[str]) -> None:
        self.bootstrap = bootstrap
        self.scopes = scopes
        self.probed = probed
        self.sent: dict[str, list[tuple[int, float]]] = defaultdict(list)  # scope -> (offset, t)
        self.lags: list[float] = []
        self.swaps: list[float] = []
        self.baseline: list[float] = []
        self.pending_probe: dict[str, tuple[str, float]] = {}  # scope -> (version, t_publish)
        self.asked: dict[str, float] = {}  # event_id -> send time (baseline probes)
        self.in_flight: dict[str, str] = {}  # scope -> event_id of its unanswered probe
        self.published_at: dict[tuple[str, str], float] = {}  # (scope, version) -> publish time
        # Diagnostics: per probed swap, its timeline; round trips under load, no swap pending.
        self.timelines: list[dict] = []
        self._open: dict[str, dict] = {}  # scope -> timeline of its pending swap
        self.probe_sent: dict[str, tuple[str, float]] = {}  # event_id -> (scope, send time)
        self.load_rtt: list[float] = []
        self.load_rtt_parts: list[tuple[float, float]] = []  # (agent latency_ms, delivery) s
        self._load_asked: dict[str, float] = {}  # event_id -> send time
        self._load_in_flight: dict[str, str] = {}  # scope -> event_id (never blocks a probe)
        self.load_rtt_at: list[tuple[float, float, float]] = []  # (sent, rtt, agent latency)
        self.loading = False
        self.warming: set[str] = set()  # event_ids of the warm-up turns not yet answered
        self.warmup_seconds = 0.0
        self.probing = False  # publishes are probed once every scope is loaded
        self._probe_due = asyncio.Event()  # a publish to probe, or a probe answered
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
        self.talk = Talk(scopes)

    async def _consumer(self, topic: str) -> AIOKafkaConsumer:
        c = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False
        )
        await c.start()
        parts = await self.producer.partitions_for(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_end(*tps)
        for tp in tps:
            await c.position(tp)
        return c

    async def send(
        self, scope: str, text: str, role: str = "system", event_id: str | None = None
    ) -> tuple[str, int]:
        ev = Interaction(event_id=event_id or uuid.uuid4().hex, scope_id=scope,
                         session_id="bench", role=role, text=text, ts=now())  # fmt: skip
        md = await self.producer.send_and_wait(
            INTERACTIONS, key=scope.encode(), value=ev.to_bytes()
        )
        return ev.event_id, md.offset

    async def load(self, seconds: float, per_scope_rate: float) -> None:
        """Each scope states a fact of its chain every 1/rate seconds (staggered)."""
        n = 0
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            for scope in self.scopes:
                t = time.time()
                _, offset = await self.send(scope, self.talk.fact(scope, n))
                self.sent[scope].append((offset, t))
            n += 1
            await asyncio.sleep(max(0.0, 1.0 / per_scope_rate - 0.001 * len(self.scopes)))

    async def watch_publishes(self, stop: asyncio.Event) -> None:
        c = await self._consumer(FAST_WEIGHTS)
        try:
            while not stop.is_set():
                for records in (await c.getmany(timeout_ms=200)).values():
                    t_recv = time.time()
                    for r in records:
                        pub = decode(r.value, FastWeightsPublished)
                        waiting = self.sent.get(pub.scope_id, [])
                        covered = [t for o, t in waiting if o <= pub.watermark]
                        self.lags += [t_recv - t for t in covered]
                        self.sent[pub.scope_id] = [(o, t) for o, t in waiting if o > pub.watermark]
                        self.published_at[(pub.scope_id, pub.version)] = r.timestamp / 1000.0
                        if self.probing and pub.scope_id in self.probed:
                            self.pending_probe[pub.scope_id] = (pub.version, r.timestamp / 1000.0)
                            self._probe_due.set()
                            old = self._open.get(pub.scope_id)
                            if old is not None:
                                old["superseded"] = True
                            self._open[pub.scope_id] = tl = {
                                "scope": pub.scope_id, "version": pub.version,
                                "published": r.timestamp / 1000.0, "seen": t_recv,
                                "probes": [],
                            }  # fmt: skip
                            self.timelines.append(tl)
        finally:
            await c.stop()

    async def probe(self, stop: asyncio.Event) -> None:
        """After a publish, ask the scope (one question in flight per scope, closed loop)
        until a reply carries the new version: probes must not load the agent themselves.

        Each probed scope is a user of its own: its question is sent as soon as the bench
        sees the publish (or the reply from the old version), not after the broker acked
        the other scopes' questions (until session 16 they went one after another, ~10 ms
        at p50 from the bench seeing a publish to its last probe sent)."""
        sending: set[asyncio.Task] = set()  # the loop keeps only weak references
        while not stop.is_set():
            for scope in list(self.pending_probe):
                if scope not in self.in_flight:
                    task = asyncio.create_task(self._ask_probe(scope))
                    sending.add(task)
                    task.add_done_callback(sending.discard)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_EVERY):
                    await self._probe_due.wait()
            self._probe_due.clear()

    async def _ask_probe(self, scope: str) -> None:
        event_id, t = uuid.uuid4().hex, time.time()
        self.in_flight[scope] = event_id  # before the send: its reply may come first
        self.probe_sent[event_id] = (scope, t)
        probe = {"event_id": event_id, "sent": t}
        tl = self._open.get(scope)
        if tl is not None:
            tl["probes"].append(probe)
        await self.send(scope, self.talk.question(scope), role="user", event_id=event_id)
        probe["sent_done"] = time.time()

    async def probe_under_load(self, stop: asyncio.Event) -> None:
        """While the load runs, every ``LOAD_RTT_EVERY`` s, ask the next probed scope that
        has no swap pending and nothing in flight a question: the round trip swaps see."""
        order = sorted(self.probed)
        i = 0
        while not stop.is_set():
            if self.loading and not self._load_in_flight:
                for scope in order[i:] + order[:i]:
                    i = (order.index(scope) + 1) % len(order)
                    if scope in self.pending_probe or scope in self.in_flight:
                        continue
                    t = time.time()
                    event_id, _ = await self.send(scope, self.talk.question(scope), role="user")
                    self._load_in_flight[scope] = event_id
                    self._load_asked[event_id] = t
                    break
            await asyncio.sleep(LOAD_RTT_EVERY)

    async def watch_replies(self, stop: asyncio.Event) -> None:
        c = await self._consumer(REPLIES)
        try:
            while not stop.is_set():
                for records in (await c.getmany(timeout_ms=100)).values():
                    t_recv = time.time()
                    for r in records:
                        reply = decode(r.value, Reply)
                        if self.in_flight.get(reply.scope_id) == reply.event_id:
                            del self.in_flight[reply.scope_id]
                            self._probe_due.set()
                        if reply.event_id in self.asked:
                            self.baseline.append(t_recv - self.asked.pop(reply.event_id))
                        self.warming.discard(reply.event_id)
                        if reply.event_id in self._load_asked:
                            self._load_in_flight.pop(reply.scope_id, None)
                            t_sent = self._load_asked.pop(reply.event_id)
                            rtt = t_recv - t_sent
                            self.load_rtt_at.append((t_sent, rtt, reply.latency_ms / 1000))
                            self.load_rtt.append(rtt)
                            self.load_rtt_parts.append((reply.latency_ms / 1000, t_recv - reply.ts))
                        self._note_probe_reply(reply, t_recv, r.timestamp / 1000.0)
                        want = self.pending_probe.get(reply.scope_id)
                        # Only the prober's questions count (as before the load round trips).
                        is_probe = reply.event_id in self.probe_sent
                        if want and is_probe and reply.fast_weights_version == want[0]:
                            self.swaps.append(t_recv - want[1])
                            del self.pending_probe[reply.scope_id]
                            tl = self._open.pop(reply.scope_id, None)
                            if tl is not None:
                                tl["swap_s"] = t_recv - want[1]
        finally:
            await c.stop()

    def _note_probe_reply(self, reply: Reply, t_recv: float, t_record: float) -> None:
        sent = self.probe_sent.get(reply.event_id)
        tl = self._open.get(reply.scope_id)
        if sent is None or tl is None:
            return
        for p in tl["probes"]:
            if p["event_id"] == reply.event_id:
                p.update(received=t_recv, reply_record=t_record, reply_ts=reply.ts,
                         latency_ms=reply.latency_ms, version=reply.fast_weights_version,
                         reply_chars=len(reply.text))  # fmt: skip

    async def ask_baseline(self, n: int) -> None:
        """Closed-loop questions to probed scopes while no swap is pending: the baseline."""
        for i in range(n):
            scope = sorted(self.probed)[i % len(self.probed)]
            if scope in self.pending_probe:
                continue
            event_id, _ = await self.send(scope, self.talk.question(scope), role="user")
            self.asked[event_id] = time.time()
            t_end = time.monotonic() + 10
            while event_id in self.asked and time.monotonic() < t_end:
                await asyncio.sleep(0.005)


async def _measure(
    bootstrap: str, n_scopes: int, seconds: float, rate: float, n_probed: int
) -> dict:
    tag = uuid.uuid4().hex[:6]
    scopes = [f"bench-{tag}-{i:03d}" for i in range(n_scopes)]
    bench = Bench(bootstrap, scopes, set(scopes[:n_probed]))
    await bench.producer.start()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(f(stop))
        for f in (bench.watch_publishes, bench.watch_replies, bench.probe, bench.probe_under_load)
    ]
    try:
        # The agent loads every scope before the load starts: loading a cold scope holds
        # the agent's answer loop (~0.3 s a scope: registry lookups, topic read-back), and
        # 7 cold scopes at the load's start held every reply, probes included, for ~2.5 s.
        # Swaps published meanwhile are not probed: they would measure the cold loads.
        await asyncio.sleep(2)  # the watchers are at the topics' ends
        t0 = time.monotonic()
        for s in bench.scopes:
            event_id, _ = await bench.send(s, "hello.", role="user")
            bench.warming.add(event_id)
        t_end = t0 + 60 + len(bench.scopes)
        while bench.warming and time.monotonic() < t_end:
            await asyncio.sleep(0.05)
        bench.warmup_seconds = time.monotonic() - t0
        bench.probing = True
        await asyncio.sleep(3)
        await bench.ask_baseline(20)
        bench.loading = True
        await bench.load(seconds, rate)
        bench.loading = False
        t_end = time.monotonic() + IDLE_SECONDS * 10 + 60
        while any(bench.sent.values()) and time.monotonic() < t_end:
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        await bench.ask_baseline(20)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bench.producer.stop()
    unresolved = sum(len(v) for v in bench.sent.values())
    return {
        "lags": bench.lags,
        "swaps": bench.swaps,
        "baseline": bench.baseline,
        "unresolved": unresolved,
        "published_at": bench.published_at,
        "probed": bench.probed,
        "timelines": bench.timelines,
        "load_rtt": bench.load_rtt,
        "load_rtt_parts": bench.load_rtt_parts,
        "load_rtt_at": bench.load_rtt_at,
        "warmup_seconds": bench.warmup_seconds,
        "warmup_unanswered": len(bench.warming),
    }


_SWAP_LINE = re.compile(
    r"^(\S+ \S+),(\d{3}) INFO streams\.swaps: fast weights (\S+) v(\S+) @\S+: swapped"
    r"(?: \(taken (-?[\d.]+) ms after publish, fetch ([\d.]+) ms, stage ([\d.]+) ms\))?"
)
PARTS = ("taken", "fetch", "stage")  # the agent's own split of a swap, logged per swap


def agent_swap_delays(
    stream_log: Path, published_at: dict[tuple[str, str], float], scopes: set[str] | None = None
) -> tuple[list[float], dict[str, list[float]]]:
    """Diagnostic split of the hot swap: publish -> the agent logs the swap as done, and
    the agent's parts of it (publish -> taken off the topic, artifact fetch, staging);
    only for ``scopes`` when given."""
    delays: list[float] = []
    parts: dict[str, list[float]] = {k: [] for k in PARTS}
    for line in stream_log.read_text(errors="replace").splitlines():
        m = _SWAP_LINE.match(line)
        if m and (m[3], m[4]) in published_at and (scopes is None or m[3] in scopes):
            t = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000
            delays.append(t - published_at[(m[3], m[4])])
            if m[5] is not None:
                for k, v in zip(PARTS, (m[5], m[6], m[7]), strict=True):
                    parts[k].append(float(v) / 1000)
    return delays, parts


def agent_swapped_at(stream_log: Path) -> dict[tuple[str, str], float]:
    """(scope, version) -> when the agent logged its swap as done (staged)."""
    out: dict[tuple[str, str], float] = {}
    for line in stream_log.read_text(errors="replace").splitlines():
        m = _SWAP_LINE.match(line)
        if m:
            t = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000
            out[(m[3], m[4])] = t
    return out


def swap_diagnostic(
    timelines: list[dict],
    swapped_at: dict[tuple[str, str], float],
    load_rtt: list[float],
    load_rtt_parts: list[tuple[float, float]],
) -> dict:
    """Where a probed swap's time goes: bench sees the publish, probes answered with the
    old version (each one more round trip), the agent's side of the final probe
    (``latency_ms``: record -> reply built) and its delivery (reply built -> received)."""
    done = [t for t in timelines if "swap_s" in t]
    parts: dict[str, list[float]] = defaultdict(list)
    slow = []
    chars: list[int] = []  # the final probes' reply lengths: decode steps, one per byte
    for t in done:
        pub = t["published"]
        answered = [p for p in t["probes"] if "received" in p]
        last = answered[-1] if answered else None
        parts["publish_to_bench_seen"].append(t["seen"] - pub)
        if (t["scope"], t["version"]) in swapped_at:
            parts["publish_to_agent_staged"].append(swapped_at[(t["scope"], t["version"])] - pub)
        if last is not None:
            parts["final_probe_round_trip"].append(last["received"] - last["sent"])
            parts["final_probe_agent_latency"].append(last["latency_ms"] / 1000)
            parts["final_probe_delivery"].append(last["received"] - last["reply_ts"])
            parts["final_probe_sent_after_publish"].append(last["sent"] - pub)
            chars.append(last["reply_chars"])
        parts["old_version_replies"].append(
            float(sum(1 for p in answered if p["version"] != t["version"]))
        )
        if t["swap_s"] > SLOW_PROBE_S:
            staged = swapped_at.get((t["scope"], t["version"]))
            rel = lambda x, p0=pub: None if x is None else round((x - p0) * 1000)  # noqa: E731
            slow.append({
                "scope": t["scope"], "version": t["version"], "swap_ms": round(t["swap_s"] * 1000),
                "bench_seen_ms": rel(t["seen"]), "agent_staged_ms": rel(staged),
                "probes": [{"sent_ms": rel(p["sent"]), "received_ms": rel(p.get("received")),
                            "reply_built_ms": rel(p.get("reply_ts")),
                            "agent_latency_ms": p.get("latency_ms"),
                            "reply_chars": p.get("reply_chars"),
                            "version": p.get("version")} for p in t["probes"]],
            })  # fmt: skip
    out = {k: _summary(v) for k, v in parts.items() if k != "old_version_replies"}
    olds = parts["old_version_replies"]
    out["old_version_replies"] = {"n": len(olds), "mean": statistics.fmean(olds) if olds else None,
                                  "max": max(olds) if olds else None}  # fmt: skip
    out["final_probe_reply_chars"] = {"n": len(chars), "p50": _pct(chars, 50),
                                      "max": max(chars, default=None)}  # fmt: skip
    out["reply_round_trip_under_load"] = _summary(load_rtt)
    out["under_load_agent_latency"] = _summary([a for a, _ in load_rtt_parts])
    out["under_load_delivery"] = _summary([d for _, d in load_rtt_parts])
    out["slow_swaps"] = slow
    return out


_SLOW_BATCH = re.compile(r"^\S+ (\S+) INFO streams\.agent: slow batch of (.*)$")


def agent_slow_batches(stream_log: Path) -> list[str]:
    """The agent's own account of its slow batches (``streams/agent.py``)."""
    out = []
    for line in stream_log.read_text(errors="replace").splitlines():
        m = _SLOW_BATCH.match(line)
        if m:
            out.append(f"{m[1]} {m[2]}")
    return out


_METRICS_PORT = re.compile(r"stream worker .*: metrics on :(\d+)")
_REWOKEN = re.compile(r'^somna_swap_rewoken_tokens_total\{prewoken="(\w+)"\} (\S+)$', re.M)


def agent_rewoken_tokens(stream_log: Path) -> dict[str, float]:
    """Tokens the agent woke again to apply swaps, by whether it resumed from the sleep
    worker's pre-woken state (consolidation/prewake.py): its Prometheus counter, read
    before it stops. {} if the endpoint does not answer."""
    import urllib.request

    m = _METRICS_PORT.search(stream_log.read_text(errors="replace"))
    if m is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{m[1]}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {label: float(value) for label, value in _REWOKEN.findall(text)}


def slow_under_load(load_rtt_at: list[tuple[float, float, float]]) -> list[dict]:
    """Under-load round trips slower than ``SLOW_PROBE_S``, with their wall-clock time (to
    line up with the workers' logs)."""
    out = []
    for t_sent, rtt, agent in load_rtt_at:
        if rtt > SLOW_PROBE_S:
            at = (
                time.strftime("%H:%M:%S", time.localtime(t_sent)) + f".{int(t_sent % 1 * 1000):03d}"
            )
            out.append({"sent": at, "rtt_ms": round(rtt * 1000), "agent_ms": round(agent * 1000)})
    return out


def _summary(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50_ms": _pct(ms, 50), "p99_ms": _pct(ms, 99),
            "mean_ms": statistics.fmean(ms) if ms else None}  # fmt: skip


def run(quick: bool, json_path: Path | None) -> dict:
    from benchmarks.pipeline import services, spawn, stop

    n_scopes, seconds, rate, n_probed = (10, 20.0, 1.0, 3) if quick else (100, 60.0, 0.5, 10)
    with tempfile.TemporaryDirectory(prefix="somna-bench-swap-") as tmp_dir:
        tmp = Path(tmp_dir)
        with services(tmp, need_mlflow=True) as (bootstrap, uri):
            from consolidation.base_model import ensure_base_model

            base = ensure_base_model(uri)
            env = dict(os.environ, SOMNA_KAFKA_BOOTSTRAP=bootstrap, SOMNA_MLFLOW_URI=uri,
                       SOMNA_DATA_DIR=str(tmp / "data"), SOMNA_PARTITIONS="4",
                       SOMNA_CHUNK_TOKENS=str(CHUNK_TOKENS), SOMNA_IDLE_SECONDS=str(IDLE_SECONDS),
                       SOMNA_SLEEP_PASSES=str(PASSES), SOMNA_STREAM_ENGINE="model",
                       SOMNA_STREAM_GROUP=f"bench-{uuid.uuid4().hex[:8]}",
                       SOMNA_HISTORY_WINDOW_SECONDS="1", OMP_NUM_THREADS="1",
                       SOMNA_SLOW_BATCH_MS="100")  # fmt: skip
            group = env["SOMNA_STREAM_GROUP"]
            procs = [
                spawn(["-m", "streams.worker", *roles],
                      dict(env, SOMNA_STREAM_GROUP=f"{group}-{'-'.join(roles)}"),
                      tmp / ("stream.log" if "agent" in roles else "stream-aggregators.log"))
                for roles in STREAM_WORKERS
            ] + [spawn(["-m", "consolidation.sleep_worker"], env, tmp / "sleep.log")]  # fmt: skip
            try:
                time.sleep(15)  # workers join their groups
                raw = asyncio.run(_measure(bootstrap, n_scopes, seconds, rate, n_probed))
                time.sleep(1)  # the agent's log lines of the last swaps
                log_file = tmp / "stream.log"
                raw["agent_swaps"], raw["agent_parts"] = agent_swap_delays(
                    log_file, raw["published_at"]
                )
                raw["probed_swaps"], _ = agent_swap_delays(
                    log_file, raw["published_at"], raw["probed"]
                )
                raw["diagnostic"] = swap_diagnostic(
                    raw["timelines"], agent_swapped_at(log_file), raw["load_rtt"],
                    raw["load_rtt_parts"],
                )  # fmt: skip
                raw["diagnostic"]["slow_under_load"] = slow_under_load(raw["load_rtt_at"])
                raw["diagnostic"]["agent_slow_batches"] = agent_slow_batches(log_file)
                raw["diagnostic"]["agent_rewoken_tokens"] = agent_rewoken_tokens(log_file)
                raw["diagnostic"]["warmup_seconds"] = raw["warmup_seconds"]
                raw["diagnostic"]["warmup_unanswered"] = raw["warmup_unanswered"]
            finally:
                for p in procs:
                    stop(p)
                keep = Path(tempfile.gettempdir()) / "somna-bench-swap-last"
                keep.mkdir(exist_ok=True)
                for name in ("stream.log", "stream-aggregators.log", "sleep.log"):
                    if (tmp / name).exists():
                        (keep / name).write_bytes((tmp / name).read_bytes())
    swap, lag, baseline = _summary(raw["swaps"]), _summary(raw["lags"]), _summary(raw["baseline"])
    result = {
        "bench": "swap", "quick": quick, "scopes": n_scopes, "probed_scopes": n_probed,
        "load_seconds": seconds, "turns_per_scope_per_s": rate, "chunk_tokens": CHUNK_TOKENS,
        "idle_seconds": IDLE_SECONDS, "passes": PASSES, "base_model_version": base.version,
        "stream_workers": [list(roles) for roles in STREAM_WORKERS],
        "hot_swap": swap, "reply_baseline": baseline,
        "hot_swap_ms": [round(s * 1000, 1) for s in raw["swaps"]],  # to pool runs
        # Every scope's v1 comes at the load's start, all at once, with the load's first
        # facts: the worst swaps of a run are often there.
        "hot_swap_after_first_wave": _summary(
            [t["swap_s"] for t in raw["timelines"] if "swap_s" in t and t["version"] != "1"]
        ),
        "publish_to_agent_swapped": _summary(raw["agent_swaps"]),
        "agent_swap_parts": {k: _summary(v) for k, v in raw["agent_parts"].items()},
        "probed_publish_to_agent_swapped": _summary(raw["probed_swaps"]),
        "consolidation_lag": lag,
        "unresolved_events": raw["unresolved"],
        "swap_p99_over_baseline_p99": (swap["p99_ms"] / baseline["p99_ms"])
        if swap["p99_ms"] and baseline["p99_ms"] else None,
        "target_swap_p99_ms": TARGET_MS,
        # A p99 of ~90 swaps is their slowest one or two, which moves by 200 ms between
        # runs of the same code: the share within the target is steadier.
        "swaps_within_target": sum(s * 1000 < TARGET_MS for s in raw["swaps"]) / len(raw["swaps"])
        if raw["swaps"] else None,
        "reply_round_trip_under_load": raw["diagnostic"]["reply_round_trip_under_load"],
        "swap_diagnostic": raw["diagnostic"],
        "machine": machine.describe(),
    }  # fmt: skip
    _print(result)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _print(r: dict) -> None:
    t = Table(title=f"Somna hot swap and consolidation lag ({r['scopes']} scopes)")
    for c in ("measure", "n", "p50 ms", "p99 ms", "note"):
        t.add_column(c)

    def row(name: str, s: dict, note: str) -> None:
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        t.add_row(name, str(s["n"]), f(s["p50_ms"]), f(s["p99_ms"]), note)

    ratio = r["swap_p99_over_baseline_p99"]
    within = r["swaps_within_target"]
    note = "target p99 < 200 ms" + (f"; {within:.0%} within" if within is not None else "")
    row("hot swap: publish -> first reply with it", r["hot_swap"],
        f"{note}; x{ratio:.2f} of baseline p99" if ratio else note)  # fmt: skip
    row("  of which: versions after the first", r["hot_swap_after_first_wave"],
        "every scope's v1 comes at once, at the load's start")  # fmt: skip
    row(
        "  of which: publish -> agent swapped",
        r["probed_publish_to_agent_swapped"],
        "probed scopes, from the agent's log",
    )
    row(
        "publish -> agent swapped, all scopes",
        r["publish_to_agent_swapped"],
        f"agent's log; unasked scopes read {DEFER_UNWANTED_SECONDS:g} s later",
    )
    notes = {"taken": "publish -> the agent takes it", "fetch": "verify + load artifact",
             "stage": "after the scope's previous swap; stage (applied at its next turn)"}  # fmt: skip
    for k, summary in r.get("agent_swap_parts", {}).items():
        if summary["n"]:
            row(f"    agent: {k}", summary, notes[k])
    row("reply round trip (baseline, no swap)", r["reply_baseline"], "same run")
    row("consolidation lag: event -> live version", r["consolidation_lag"],
        f"chunk {r['chunk_tokens']} tok, idle {r['idle_seconds']} s, N={r['passes']}; "
        f"{r['unresolved_events']} events unresolved")  # fmt: skip
    console.print(t)
    d = r.get("swap_diagnostic")
    if d:
        f = lambda s, k="p99_ms": "-" if s[k] is None else f"{s[k]:.0f}"  # noqa: E731
        fr, ul = d["final_probe_round_trip"], d["reply_round_trip_under_load"]
        console.print(
            f"diagnostic: round trip under load p50/p99 {f(ul, 'p50_ms')}/{f(ul)} ms "
            f"(agent {f(d['under_load_agent_latency'])}, delivery {f(d['under_load_delivery'])}"
            f" p99); final probe p50/p99 {f(fr, 'p50_ms')}/{f(fr)} ms (agent "
            f"{f(d['final_probe_agent_latency'])}, delivery {f(d['final_probe_delivery'])} p99);"
            f" old-version replies/swap mean {d['old_version_replies']['mean'] or 0:.2f} "
            f"max {d['old_version_replies']['max'] or 0:.0f}; "
            f"{len(d['slow_swaps'])} swaps > {SLOW_PROBE_S * 1000:.0f} ms; final probes' "
            f"replies p50 {d['final_probe_reply_chars']['p50']} chars, "
            f"max {d['final_probe_reply_chars']['max']}"
        )
        for sw in d["slow_swaps"][:5]:
            console.print(f"  slow: {json.dumps(sw)}")
        console.print(
            f"warm-up (all {r['scopes']} scopes loaded before the load): "
            f"{d['warmup_seconds']:.1f} s; agent slow batches (> 0.3 s): "
            f"{len(d['agent_slow_batches'])}"
        )
        for line in d["agent_slow_batches"][:5]:
            console.print(f"  agent: {line}")
        rewoken = d.get("agent_rewoken_tokens") or {}
        console.print(
            f"tokens the agent woke again to apply swaps: {rewoken.get('no', 0):.0f} in full "
            f"re-wakes, {rewoken.get('yes', 0):.0f} after a pre-woken state (SOMNA_SLEEP_PREWAKE)"
        )
