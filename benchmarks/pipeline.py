"""`somna bench pipeline`: the streaming path's throughput and latency, on one broker.

1. Throughput: a backlog of N user turns is answered (a) by a raw aiokafka loop that
   consumes, decodes, produces a reply (acks=all) and commits: the floor any framework
   adds to; (b) by the agent (its aiokafka intake) with the null engine (no model: the streaming overhead
   alone); (c) by a Faust agent that only replies a constant (Faust's own share); then
   (a) again. All are timed the same way, from the CreateTime of the first reply to the
   n-th, read after the run so that no reader competes for the CPUs, and each also
   reports its process's CPU per event. Target: agent >= 0.5x raw.
2. Latency: closed-loop users ask the agent running the real model; round-trip p50/p99
   with no load, then with a concurrent consolidation load (a process running offline-
   recurrence sleeps back to back, as a sleep worker does) at the same priority, at
   nice 19, and under the sleep worker's SCHED_IDLE; phases take turns over several
   rounds. Target: p99 ratio <= 1.1. Each phase also reports the agent's side of its
   turns (the question's record timestamp to the reply built, ``Reply.latency_ms``): the
   rest of a round trip is the reply's way back through the broker to the user.

Uses ``SOMNA_KAFKA_BOOTSTRAP`` / ``SOMNA_MLFLOW_URI`` when set, else starts an embedded
broker and an MLflow server in a temp dir. Workers are real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from benchmarks import machine
from infra.settings import Settings
from infra.topics import INTERACTIONS, REPLIES
from streams.agent_consumer import agent_group_id
from streams.records import Interaction, Reply, decode, now, reply_id_for

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
# The agent's producer linger (streams/agent_consumer.py): the raw loop's is the same.
AGENT_LINGER_MS = 0
console = Console()


# --- infrastructure ----------------------------------------------------------------------


@contextlib.contextmanager
def services(tmp: Path, need_mlflow: bool) -> Iterator[tuple[str, str | None]]:
    """(bootstrap, tracking uri): the configured ones, or fresh embedded ones."""
    from infra.ports import free_port, free_ports
    from infra.topics import provision

    with contextlib.ExitStack() as stack:
        bootstrap = os.environ.get("SOMNA_KAFKA_BOOTSTRAP")
        if not bootstrap:
            from infra.kafka import EmbeddedKafka

            kafka = EmbeddedKafka(tmp / "kafka", *free_ports(2)).start(timeout=240)
            stack.callback(kafka.stop)
            bootstrap = kafka.bootstrap
        provision(bootstrap, PARTITIONS)
        uri = os.environ.get("SOMNA_MLFLOW_URI")
        if need_mlflow and not uri:
            from infra.mlflow_server import MlflowServer

            server = MlflowServer(tmp / "mlflow", free_port())
            server.start(timeout=300)
            stack.callback(server.stop)
            uri = server.uri
        yield bootstrap, uri


def spawn(args: list[str], env: dict[str, str], log: Path, nice: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )  # noqa: SIM115


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def worker_env(bootstrap: str, uri: str | None, tmp: Path, engine: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SOMNA_KAFKA_BOOTSTRAP=bootstrap,
        SOMNA_PARTITIONS=str(PARTITIONS),
        SOMNA_DATA_DIR=str(tmp / "data"),
        SOMNA_STREAM_GROUP=f"bench-{uuid.uuid4().hex[:8]}",
        SOMNA_STREAM_ENGINE=engine,
        SOMNA_LOG_LEVEL="WARNING",
        OMP_NUM_THREADS="1",
    )
    if uri:
        env["SOMNA_MLFLOW_URI"] = uri
    return env


def user_turn(scope: str, text: str) -> Interaction:
    return Interaction(
        event_id=uuid.uuid4().hex,
        scope_id=scope,
        session_id="bench",
        role="user",
        text=text,
        ts=now(),
    )


async def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await c.start()
    try:
        return await c.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
    finally:
        await c.stop()


# --- 1. throughput -----------------------------------------------------------------------


async def produce_backlog(bootstrap: str, n: int, tag: str) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await p.start()
    try:
        futs = []
        for i in range(n):
            t = user_turn(f"bench-{tag}-{i % 64}", f"turn {i}")
            futs.append(await p.send(INTERACTIONS, t.to_bytes(), key=t.scope_id.encode()))
        await asyncio.gather(*futs)
    finally:
        await p.stop()


async def raw_loop(bootstrap: str, start: dict[TopicPartition, int], n: int) -> None:
    """Consume, decode, reply, commit the backlog that starts at ``start``: the floor.

    As correct as the agent: replies acked by all replicas before the offsets of their
    turns are committed; the producer batches as the agent's does (no linger)."""
    group = f"bench-raw-{uuid.uuid4().hex[:8]}"
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=AGENT_LINGER_MS)
    await c.start()
    await p.start()
    try:
        c.assign(list(start))
        for tp, off in start.items():
            c.seek(tp, off)
        done = 0
        while done < n:
            batches = await c.getmany(timeout_ms=1000, max_records=500)
            futs = []
            for records in batches.values():
                for r in records:
                    e = decode(r.value, Interaction)
                    reply = Reply(
                        reply_id=reply_id_for(e.event_id),
                        event_id=e.event_id,
                        scope_id=e.scope_id,
                        text="ok",
                        base_model_version="raw",
                        latency_ms=0.0,
                        ts=now(),
                    )
                    futs.append(await p.send(REPLIES, reply.to_bytes(), key=e.scope_id.encode()))
                    done += 1
            await asyncio.gather(*futs)
            await c.commit()
    finally:
        await c.stop()
        await p.stop()


async def reply_rate(
    bootstrap: str, since: dict[TopicPartition, int], n: int, prefix: str
) -> float:
    """Events/s from the replies' CreateTime: first to n-th reply to a key with ``prefix``.

    Read after the run, so that no reader competes with the loop being measured for the
    CPUs, and the raw loop and the agent are timed the same way."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await c.start()
    try:
        c.assign(list(since))
        for tp, off in since.items():
            c.seek(tp, off)
        ends = await c.end_offsets(list(since))
        stamps: list[int] = []
        key = prefix.encode()
        while [tp for tp, end in ends.items() if await c.position(tp) < end]:
            for records in (await c.getmany(timeout_ms=1000)).values():
                stamps += [r.timestamp for r in records if r.key and r.key.startswith(key)]
        stamps = sorted(stamps)[:n]
        if len(stamps) < n:
            raise RuntimeError(f"{len(stamps)} replies of {n} turns")
        return (n - 1) / max(1e-3, (stamps[-1] - stamps[0]) / 1000.0)
    finally:
        await c.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def watch_agent(
    bootstrap: str, since: dict[TopicPartition, int], n: int, proc: subprocess.Popen
) -> float:
    """Wait until the agent has replied n times; its CPU seconds per event meanwhile.

    Polls the end offsets of the replies 10 times a second (a negligible load): CPU is
    counted from its first reply (start-up excluded) to its n-th."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await c.start()
    try:
        deadline = time.monotonic() + 600
        first: tuple[int, float] | None = None
        while time.monotonic() < deadline and proc.poll() is None:
            ends = await c.end_offsets(list(since))
            replied = sum(ends[tp] - off for tp, off in since.items())
            if first is None and replied > 0:
                first = (replied, cpu_seconds(proc.pid))
            if replied >= n and first is not None:
                return (cpu_seconds(proc.pid) - first[1]) / max(1, n - first[0])
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the agent did not answer its backlog (exit {proc.poll()})")
    finally:
        await c.stop()


def faust_floor_main() -> None:
    """``python -m benchmarks.pipeline --faust-floor``: the agent's Faust part alone.

    The same App and topic, and the ``take_events`` batches the agent used when it ran on
    Faust, replying a constant to each event without decoding it: what Faust's intake and
    producer cost (the agent now has its own consumer: streams/agent_consumer.py)."""
    import faust

    from streams.app import create_app, declare_topics

    settings = Settings()
    app = create_app(settings, app_id=settings.stream_group or "bench-floor")
    topics = declare_topics(app)

    @app.agent(topics.interactions)
    async def floor(stream: faust.StreamT) -> None:
        # The batches the agent took when it ran on Faust: 128 events or 5 ms.
        async for events in stream.take_events(128, within=0.005):
            for ev in events:
                await app.producer.send(REPLIES, ev.key, b"{}", None, None, None)

    faust.Worker(app, loglevel="WARNING", override_logging=False).execute_from_commandline()


def throughput(bootstrap: str, tmp: Path, n: int) -> dict:
    tag = uuid.uuid4().hex[:6]
    prefix = f"bench-{tag}-"
    start = asyncio.run(end_offsets(bootstrap, INTERACTIONS))
    asyncio.run(produce_backlog(bootstrap, n, tag))
    raws: list[float] = []
    raw_cpu: list[float] = []
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}
    # Raw, agent, Faust floor, raw: the machine's background load drifts; the raw rate is
    # the mean of the two.
    for run_ in ("raw", "agent", "floor", "raw"):
        since = asyncio.run(end_offsets(bootstrap, REPLIES))
        if run_ == "raw":
            cpu0 = time.process_time()
            asyncio.run(raw_loop(bootstrap, start, n))
            raw_cpu.append((time.process_time() - cpu0) / n)
            raws.append(asyncio.run(reply_rate(bootstrap, since, n, prefix)))
            continue
        env = worker_env(bootstrap, None, tmp, "null")
        # The worker's new group starts at the backlog, not at older turns of the broker.
        # The agent consumes in a group of its own (streams/agent_consumer.py).
        group = env["SOMNA_STREAM_GROUP"]
        asyncio.run(
            skip_to_end(bootstrap, agent_group_id(group) if run_ == "agent" else group, at=start)
        )
        argv = ["-m", "streams.worker", "agent"]
        if run_ == "floor":
            argv = ["-m", "benchmarks.pipeline", "--faust-floor", "worker"]
        worker = spawn(argv, env, tmp / f"worker-{run_}.log")
        try:
            cpu[run_] = asyncio.run(watch_agent(bootstrap, since, n, worker))
        finally:
            stop(worker)
        rates[run_] = asyncio.run(reply_rate(bootstrap, since, n, prefix))
    raw = statistics.fmean(raws)
    return {
        "events": n,
        "raw_events_per_s": raw,
        "raw_runs_events_per_s": raws,
        "agent_events_per_s": rates["agent"],
        "faust_floor_events_per_s": rates["floor"],
        "ratio": rates["agent"] / raw,
        "floor_ratio": rates["floor"] / raw,
        "target_ratio": 0.5,
        # CPU of the loop's own process per event (the broker's is not counted): a
        # measure of the per-event cost that the machine's other load moves less.
        "raw_cpu_us_per_event": 1e6 * statistics.fmean(raw_cpu),
        "agent_cpu_us_per_event": 1e6 * cpu["agent"],
        "faust_floor_cpu_us_per_event": 1e6 * cpu["floor"],
    }


# --- 2. latency under a sleep load ------------------------------------------------------


def sleep_load_main() -> None:
    """``python -m benchmarks.pipeline --sleep-load URI COUNT_FILE SCHED``: sleeps back to
    back until killed, under the sleep worker's scheduling ``SCHED`` (its start-up code),
    writing how many sleeps it has done to COUNT_FILE after each."""
    import torch

    from consolidation.base_model import ensure_base_model
    from consolidation.sleep_worker import apply_scheduling

    uri, count_file, sched = sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    if sched == "spin":  # no sleep: a SCHED_IDLE busy loop, for the "idle_spin" baseline
        apply_scheduling(Settings(sleep_sched="idle"), "cpu")
        count_file.write_text("1")
        while True:
            pass
    torch.set_num_threads(1)
    lm = ensure_base_model(uri).lm
    cfg = lm.config
    state = lm.init_state(8)
    chunk = torch.randint(0, 256, (8, cfg.chunk))
    # After the model load (not timed), so that each phase starts with sleeps under way.
    apply_scheduling(Settings(sleep_sched=sched), "cpu")
    done = 0
    while True:
        state = lm.sleep(chunk, state, passes=cfg.sleep_passes)
        done += 1
        count_file.write_text(str(done))


def sleeps_done(count_file: Path) -> int:
    try:
        return int(count_file.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


async def closed_loop(
    bootstrap: str, scopes: list[str], turns_each: int
) -> tuple[list[float], list[float]]:
    """Each scope asks, waits for its reply, asks again: round-trip latencies in ms, and
    the agent's side of each (its record's timestamp to the reply built: ``latency_ms``),
    so that a slow tail can be told apart from a slow delivery of the reply."""
    from streams.chat import ReplyWaiter, make_producer

    settings = Settings(kafka_bootstrap=bootstrap, partitions=PARTITIONS)
    waiter, producer = ReplyWaiter(settings), make_producer(settings)
    await waiter.start()
    await producer.start()
    waiting: dict[str, asyncio.Future] = {}
    latencies: list[float] = []
    agent_side: list[float] = []

    async def route() -> None:
        while True:
            for r in await waiter.replies(timeout_ms=50):
                f = waiting.pop(r.event_id, None)
                if f and not f.done():
                    f.set_result(r)

    async def ask(scope: str) -> None:
        for i in range(turns_each + 1):  # the first turn of a scope loads it: not timed
            t = user_turn(scope, f"who is kim's boss? {i}")
            fut = asyncio.get_running_loop().create_future()
            waiting[t.event_id] = fut
            t0 = time.perf_counter()
            await producer.send_and_wait(INTERACTIONS, t.to_bytes(), key=scope.encode())
            reply = await asyncio.wait_for(fut, 120)
            if i > 0:
                latencies.append((time.perf_counter() - t0) * 1000)
                agent_side.append(reply.latency_ms)

    router = asyncio.create_task(route())
    try:
        await asyncio.gather(*(ask(s) for s in scopes))
    finally:
        router.cancel()
        await producer.stop()
        await waiter.stop()
    return latencies, agent_side


async def skip_to_end(
    bootstrap: str, group: str, at: dict[TopicPartition, int] | None = None
) -> None:
    """Commit the current end of the agent's topics (or ``at``, for some of their
    partitions) as ``group``'s starting point (the agent's group: ``agent_group_id``)."""
    from infra.topics import FAST_WEIGHTS, RETRACTIONS

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        tps = [
            TopicPartition(t, p)
            for t in (INTERACTIONS, FAST_WEIGHTS, RETRACTIONS)
            for p in range(PARTITIONS)
        ]
        c.assign(tps)
        ends = await c.end_offsets(tps)
        await c.commit({**ends, **(at or {})})
    finally:
        await c.stop()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# (phase, nice, sleep_sched) of the sleep load; None: no load.
PHASES: tuple[tuple[str, int | None, str], ...] = (
    ("idle", None, ""),
    # A SCHED_IDLE process that only spins: no sleep work, but the cores never go idle.
    # On this VM an idle core answers slower (wake-up from halt), so this is the fair
    # baseline for a SCHED_IDLE sleep load, which keeps the cores busy the same way.
    ("idle_spin", 0, "spin"),
    ("sleep_load", 0, "normal"),
    ("sleep_load_nice19", 19, "normal"),
    ("sleep_load_sched_idle", 0, "idle"),
)


def latency(bootstrap: str, uri: str, tmp: Path, users: int, turns: int, rounds: int) -> dict:
    from consolidation.base_model import base_model_version, ensure_base_model

    version = base_model_version(uri)
    if version is None:
        ensure_base_model(uri)  # the shipped checkpoint
    env = worker_env(bootstrap, uri, tmp, "model")
    # The throughput backlog is not for the model: the new group starts after it.
    asyncio.run(skip_to_end(bootstrap, agent_group_id(env["SOMNA_STREAM_GROUP"])))
    worker = spawn(["-m", "streams.worker", "agent"], env, tmp / "worker-model.log")
    out: dict = {"users": users, "turns_per_user": turns, "rounds": rounds}
    ms: dict[str, list[float]] = {phase: [] for phase, _, _ in PHASES}
    agent_ms: dict[str, list[float]] = {phase: [] for phase, _, _ in PHASES}
    sleeps: dict[str, float] = dict.fromkeys(ms, 0.0)
    seconds: dict[str, float] = dict.fromkeys(ms, 0.0)
    try:
        tag = uuid.uuid4().hex[:6]
        asyncio.run(closed_loop(bootstrap, [f"lat-{tag}-warm"], 3))  # model load, first calls
        # Sleep load as its own process (sleep never runs in the agent): at the same CPU
        # priority, at nice 19, and under the sleep worker's SCHED_IDLE. The phases take
        # turns, ``rounds`` times, so that the machine's other load drifts over all alike.
        for r in range(rounds):
            for phase, nice, sched in PHASES:
                load, count = None, tmp / f"{phase}-{r}.count"
                if nice is not None:
                    load = spawn(
                        ["-m", "benchmarks.pipeline", "--sleep-load", uri, str(count), sched],
                        env,
                        tmp / f"{phase}.log",
                        nice=nice,
                    )
                    deadline = time.monotonic() + 120
                    while sleeps_done(count) < 1 and time.monotonic() < deadline:
                        time.sleep(0.2)  # model loaded and sleeping
                try:
                    scopes = [f"lat-{tag}-{phase}-{r}-{u}" for u in range(users)]
                    n0, t0 = sleeps_done(count), time.perf_counter()
                    round_trips, agent_side = asyncio.run(closed_loop(bootstrap, scopes, turns))
                    ms[phase] += round_trips
                    agent_ms[phase] += agent_side
                    sleeps[phase] += sleeps_done(count) - n0
                    seconds[phase] += time.perf_counter() - t0
                finally:
                    if load is not None:
                        stop(load)
    finally:
        stop(worker)
    for phase, xs in ms.items():
        out[phase] = {
            "p50_ms": pct(xs, 0.5),
            "p99_ms": pct(xs, 0.99),
            "mean_ms": statistics.fmean(xs),
            "n": len(xs),
            # Record timestamp -> reply built in the agent (the rest is the reply's delivery).
            "agent_p50_ms": pct(agent_ms[phase], 0.5),
            "agent_p99_ms": pct(agent_ms[phase], 0.99),
            # The load's own progress: a sleep starved to nothing would make any ratio easy.
            "sleeps_per_s": sleeps[phase] / seconds[phase],
        }
    for phase, _, _ in PHASES[1:]:
        out[f"p99_ratio_{phase}"] = out[phase]["p99_ms"] / out["idle"]["p99_ms"]
        # The mean moves less with the machine's other load than the p99 (a few samples).
        out[f"mean_ratio_{phase}"] = out[phase]["mean_ms"] / out["idle"]["mean_ms"]
    out["p99_ratio"] = out["p99_ratio_sleep_load"]
    spin = out["idle_spin"]["p99_ms"]
    out["p99_ratio_sleep_load_sched_idle_vs_spin"] = out["sleep_load_sched_idle"]["p99_ms"] / spin
    out["target_p99_ratio"] = 1.1
    return out


# --- the benchmark -----------------------------------------------------------------------


def run(quick: bool, json_path: Path | None) -> dict:
    n = 2000 if quick else 20000
    users, turns, rounds = (2, 15, 1) if quick else (4, 50, 6)
    with tempfile.TemporaryDirectory(prefix="somna-bench-pipeline-") as d:
        tmp = Path(d)
        with services(tmp, need_mlflow=True) as (bootstrap, uri):
            console.print(f"[dim]broker {bootstrap}, mlflow {uri}[/]")
            result = {"machine": machine.describe(), "throughput": throughput(bootstrap, tmp, n)}
            _print(result)
            result["latency"] = latency(bootstrap, uri, tmp, users, turns, rounds)
    _print(result)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))
    return result


def _print(result: dict) -> None:
    t = Table(title=f"somna bench pipeline ({result['machine']})")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("target", justify="right")
    tp = result["throughput"]
    t.add_row("raw aiokafka loop, events/s", f"{tp['raw_events_per_s']:.0f}", "")
    t.add_row("agent (null model), events/s", f"{tp['agent_events_per_s']:.0f}", "")
    t.add_row(
        "Faust alone (no decode, constant reply), events/s",
        f"{tp['faust_floor_events_per_s']:.0f}",
        "",
    )
    t.add_row("agent / raw", f"{tp['ratio']:.2f}", ">= 0.5")
    t.add_row("Faust alone / raw", f"{tp['floor_ratio']:.2f}", "")
    t.add_row(
        "CPU us/event: raw / agent / Faust alone",
        f"{tp['raw_cpu_us_per_event']:.0f} / {tp['agent_cpu_us_per_event']:.0f}"
        f" / {tp['faust_floor_cpu_us_per_event']:.0f}",
        "",
    )
    if "latency" in result:
        lat = result["latency"]
        for phase, _, _ in PHASES:
            t.add_row(
                f"turn latency p50 / p99 / mean (agent's side p99), ms ({phase})",
                f"{lat[phase]['p50_ms']:.0f} / {lat[phase]['p99_ms']:.0f}"
                f" / {lat[phase]['mean_ms']:.0f} ({lat[phase]['agent_p99_ms']:.0f})",
                "",
            )
        for phase, _, sched in PHASES[1:]:
            load = "" if sched == "spin" else f" ({lat[phase]['sleeps_per_s']:.1f} sleeps/s)"
            t.add_row(
                f"p99 (mean) {phase}{load} / idle",
                f"{lat[f'p99_ratio_{phase}']:.2f} ({lat[f'mean_ratio_{phase}']:.2f})",
                "<= 1.1",
            )
        t.add_row(
            "p99 sleep_load_sched_idle / idle_spin",
            f"{lat['p99_ratio_sleep_load_sched_idle_vs_spin']:.2f}",
            "<= 1.1",
        )
    console.print(t)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--sleep-load":
        sleep_load_main()
    elif len(sys.argv) > 1 and sys.argv[1] == "--faust-floor":
        sys.argv = [sys.argv[0], *sys.argv[2:]]  # Faust's command line: `worker`
        faust_floor_main()
    else:
        run(quick="--quick" in sys.argv, json_path=None)
