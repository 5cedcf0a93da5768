"""The chaos scenarios: drive a bounded load, inject one fault, check from the outside.

Each function takes a started :class:`~tests.chaos.harness.Cluster` and a size, and returns
an :class:`~tests.chaos.checker.Outcome` (one row of the table). The pytest tests assert on
it; ``somna bench chaos`` runs the same functions with longer loads and prints the table.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from infra.topics import FAST_WEIGHTS, INTERACTIONS, REPLIES, SLEEP_JOBS
from streams.records import FastWeightsPublished

from .checker import Outcome, check, complete, registry_audit  # noqa: F401 (Outcome: re-exported)
from .harness import Cluster, Part
from .load import LoadReport, Sent, UserLoad, forged, poison_records, send_forged, send_records


@dataclass
class Size:
    """How much load a scenario drives."""

    events: int = 120
    rate: float = 8.0  # turns per second, all scopes together
    scopes: int = 4
    drain_s: float = 180.0  # how long to wait for every turn to be answered and stored


QUICK = Size()
LONG = Size(events=600, rate=15.0, scopes=8, drain_s=400.0)


def new_scopes(name: str, n: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"chaos-{name}-{tag}-{i}" for i in range(n)]


def wait_for(pred: Callable[[], bool], timeout: float, poll: float = 0.2) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(poll)
    return pred()


def replies_for(cluster: Cluster, scopes: set[str]) -> list[dict]:
    assert cluster.tail is not None
    return [
        r.value
        for r in cluster.tail.records(REPLIES)
        if r.value is not None and r.value.get("scope_id") in scopes
    ]


def jobs_for(cluster: Cluster, scopes: set[str]) -> list[dict]:
    assert cluster.tail is not None
    return [
        r.value
        for r in cluster.tail.records(SLEEP_JOBS)
        if r.value is not None and r.value.get("scope_id") in scopes
    ]


def published_for(
    cluster: Cluster, scopes: set[str], forged_versions: set[str] = frozenset()
) -> list[dict]:
    assert cluster.tail is not None
    return [
        r.value
        for r in cluster.tail.records(FAST_WEIGHTS)
        if r.value is not None
        and r.value.get("scope_id") in scopes
        and r.value.get("version") not in forged_versions
    ]


def drain(cluster: Cluster, turns: list[Sent], timeout: float) -> tuple[int, int]:
    """Heal crashed parts (as a supervisor would) until every turn is through or timeout."""
    deadline = time.time() + timeout
    missing = (len(turns), len(turns))
    while time.time() < deadline:
        cluster.heal()
        missing = complete(cluster.tail, cluster.history_dir, turns)
        if missing == (0, 0):
            break
        time.sleep(2.0)
    return missing


def finish(
    cluster: Cluster,
    outcome: Outcome,
    report: LoadReport,
    scopes: list[str],
    size: Size,
    *,
    fault_end: float | None,
    other: list[Sent] = (),
    forged_versions: set[str] = frozenset(),
    crashes_before: dict[str, int] | None = None,
) -> Outcome:
    drain(cluster, report.turns, size.drain_s)
    check(
        outcome,
        cluster.tail,
        cluster.history_dir,
        report.turns,
        scopes=set(scopes),
        other_sent=list(other),
        forged_versions=forged_versions,
        fault_end=fault_end,
    )
    outcome.send_errors += [f"{k}: {e[:160]}" for k, e in report.send_errors]
    replies = replies_for(cluster, set(scopes))
    base = cluster.base_model_version()
    outcome.details["replies_with_fast_weights"] = sum(
        1 for r in replies if r.get("fast_weights_version") is not None
    )
    if base is not None:  # replies made by another base model than the one in production
        outcome.details["replies_on_other_base_model"] = sum(
            1 for r in replies if str(r.get("base_model_version")) != base
        )
    before = crashes_before or {}
    outcome.restarts = sum(n - before.get(name, 0) for name, n in cluster.crashes().items())
    outcome.details["crashes"] = {
        k: v - before.get(k, 0) for k, v in cluster.crashes().items() if v - before.get(k, 0)
    }
    return outcome


def _load(cluster: Cluster, name: str, size: Size) -> tuple[list[str], UserLoad]:
    cluster.heal()
    scopes = new_scopes(name, size.scopes)
    load = UserLoad(
        cluster.bootstrap,
        scopes,
        size.events,
        rate=size.rate,
        max_seconds=size.events / size.rate * 2 + 40,
    )
    return scopes, load


# --- the scenarios ---------------------------------------------------------------------------


def kill_stream_worker(cluster: Cluster, size: Size = QUICK) -> Outcome:
    """kill -9 the inference worker mid-stream, restart it 2 s later."""
    out = Outcome("kill -9 stream worker")
    before = cluster.crashes()
    scopes, load = _load(cluster, "stream", size)
    load.start()
    # Mid-stream: a third of the load is in and some of it has been answered.
    wait_for(lambda: load.acked >= size.events // 3 and replies_for(cluster, set(scopes)), 120)
    since = cluster.stream.log_size()
    cluster.stream.kill9()
    time.sleep(2.0)
    cluster.stream.start()
    fault_end = time.time()
    report = load.join()
    finish(cluster, out, report, scopes, size, fault_end=fault_end, crashes_before=before)
    # How often the restarted worker's consumer skipped records that a role then read back
    # (streams/gaps.py): Faust's recovery drops some in about one restart of three.
    out.details["skipped_ranges_read_back"] = cluster.stream.log_count(
        "were skipped by the consumer", since
    )
    return out


def kill_sleep_worker(cluster: Cluster, size: Size = QUICK) -> Outcome:
    """kill -9 the sleep worker while it holds a job, restart it; each job ends in one version."""
    out = Outcome("kill -9 sleep worker")
    before = cluster.crashes()
    scopes, load = _load(cluster, "sleep", size)
    s = set(scopes)
    since = _arm_sleep_fault(cluster)
    load.start()
    if wait_for(lambda: cluster.sleep.log_says(FAULT_HOOK_LOG, since), size.drain_s, poll=0.2):
        out.notes.append("killed mid-job: after registering a version, before publishing it")
    else:
        out.notes.append("the sleep worker never reached after_register: killed anyway")
    cluster.sleep.kill9()
    time.sleep(2.0)
    cluster.sleep.start()
    fault_end = time.time()
    report = load.join()
    finish(cluster, out, report, scopes, size, fault_end=fault_end, crashes_before=before)
    _check_jobs(cluster, out, s, size.drain_s, fault_end)
    return out


# What the sleep worker's fault hook (consolidation.sleep_worker.fault_point) logs when
# SOMNA_FAULT=after_register stops it between registering a version and publishing it.
FAULT_HOOK_LOG = "fault injection: blocking at after_register"


def _arm_sleep_fault(cluster: Cluster) -> int:
    """Restart the sleep worker so that it stops dead after registering its next batch
    (registered, not yet published, offsets not committed: the hardest moment to die).
    Returns where its log stood, to look for the hook's message from there."""
    cluster.sleep.kill9()
    since = cluster.sleep.log_size()
    cluster.sleep.env = {**cluster.worker_env, "SOMNA_FAULT": "after_register"}
    cluster.sleep.start()
    cluster.sleep.env = cluster.worker_env  # the restart after the fault runs normally
    return since


def _sleep_run_in_progress(cluster: Cluster) -> bool:
    """Whether a sleep batch's MLflow run is open right now (from the tracking server)."""
    import json
    import urllib.parse
    import urllib.request

    from consolidation.tracking import SLEEP_EXPERIMENT

    try:
        q = urllib.parse.urlencode({"experiment_name": SLEEP_EXPERIMENT})
        with urllib.request.urlopen(
            f"{cluster.mlflow_uri}/api/2.0/mlflow/experiments/get-by-name?{q}", timeout=1
        ) as r:
            exp = json.load(r)["experiment"]["experiment_id"]
        body = json.dumps(
            {"experiment_ids": [exp], "filter": "attributes.status = 'RUNNING'", "max_results": 1}
        ).encode()
        req = urllib.request.Request(
            f"{cluster.mlflow_uri}/api/2.0/mlflow/runs/search",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=1) as r:
            return bool(json.load(r).get("runs"))
    except (OSError, KeyError, ValueError):
        return False


def _wait_registering(cluster: Cluster, scopes: set[str], timeout: float = 120.0) -> str:
    """Block until a sleep batch is in progress (its MLflow run is open: it is about to
    register or registering), else until a sleep job of ``scopes`` exists; says which."""
    if wait_for(lambda: _sleep_run_in_progress(cluster), timeout, poll=0.05):
        return "MLflow killed while a sleep batch's run was open (registering)"
    if wait_for(lambda: bool(jobs_for(cluster, scopes)), 30):
        time.sleep(0.5)
        return "no open sleep run seen: MLflow killed after a sleep job"
    return "no sleep job seen: MLflow killed anyway"


def _check_jobs(
    cluster: Cluster, out: Outcome, scopes: set[str], timeout: float, fault_end: float
) -> None:
    """Every sleep job of ``scopes`` ends in a published version covering it, and no job
    yields two versions (a retried job must give the same version, never a second one)."""

    def unfinished() -> list[dict]:
        pubs = published_for(cluster, scopes)
        return [
            j
            for j in jobs_for(cluster, scopes)
            if not any(
                p["scope_id"] == j["scope_id"] and int(p["watermark"]) >= int(j["to_watermark"])
                for p in pubs
            )
        ]

    def done() -> bool:
        cluster.heal()  # a supervisor restarts a sleep worker that died on its own
        return not unfinished()

    wait_for(done, timeout, poll=2.0)
    versions: dict[str, set[str]] = {}
    for p in published_for(cluster, scopes):
        versions.setdefault(p.get("job_id"), set()).add(str(p.get("version")))
    after = [
        r.received_at
        for r in cluster.tail.records(FAST_WEIGHTS)
        if r.value and r.value.get("scope_id") in scopes and r.received_at >= fault_end
    ]
    out.recover_fast_weights_s = round(min(after) - fault_end, 2) if after else None
    doubled = {j: v for j, v in versions.items() if len(v) > 1}
    audit = registry_audit(cluster.mlflow_uri, scopes)
    out.details.update(audit)
    out.duplicated += max(len(doubled), audit["jobs_registered_twice"])
    out.misrouted += audit["registered_for_wrong_scope"]
    out.details.update(
        sleep_jobs=len({j["job_id"] for j in jobs_for(cluster, scopes)}),
        versions_published=sum(len(v) for v in versions.values()),
        jobs_with_two_versions=len(doubled),
        jobs_unfinished=len(unfinished()),
    )


def broker_outage(cluster: Cluster, size: Size = QUICK, down_s: float = 10.0) -> Outcome:
    """Stop the broker for ``down_s`` seconds under load, start it on the same data dir."""
    out = Outcome(f"broker down {down_s:.0f} s")
    before = cluster.crashes()
    scopes, load = _load(cluster, "broker", size)
    load.start()
    wait_for(lambda: load.acked >= size.events // 3, 120)
    since = {p.name: p.log_size() for p in cluster.workers}
    cluster.kafka.stop()
    time.sleep(down_s)
    cluster.kafka.start()
    fault_end = time.time()
    # What the Kafka client logged while the broker was away (it is rate-limited).
    out.details["client_log_lines"] = {
        p.name: _client_lines(p, since[p.name]) for p in cluster.workers
    }
    out.details["client_log_lines_per_s"] = round(
        max(out.details["client_log_lines"].values()) / down_s, 1
    )
    report = load.join()
    return finish(cluster, out, report, scopes, size, fault_end=fault_end, crashes_before=before)


def _client_lines(part: Part, since: int) -> int:
    """Log lines of the aiokafka loggers in ``part``'s log from byte ``since`` on."""
    import re

    with open(part.log, "rb") as f:
        f.seek(since)
        return len(re.findall(rb"^\S+ \S+ [A-Z]+ aiokafka[.:]", f.read(), flags=re.M))


def mlflow_kill(cluster: Cluster, size: Size = QUICK, down_s: float = 3.0) -> Outcome:
    """kill -9 the MLflow server when a sleep job is about to register, restart it."""
    out = Outcome("kill -9 MLflow server")
    before = cluster.crashes()
    # Twice the load, so that turns still arrive once the server is back: the time to the
    # first reply after the fault is measured, not left undefined.
    scopes, load = _load(cluster, "mlflow", replace(size, events=size.events * 2))
    s = set(scopes)
    load.start()
    out.notes.append(_wait_registering(cluster, s))
    cluster.mlflow.kill9()
    time.sleep(down_s)
    cluster.mlflow.start()
    cluster.wait_mlflow()
    fault_end = time.time()
    report = load.join()
    finish(cluster, out, report, scopes, size, fault_end=fault_end, crashes_before=before)
    _check_jobs(cluster, out, s, size.drain_s, fault_end)
    return out


def disk_full(cluster: Cluster, size: Size = QUICK, full_s: float = 6.0) -> Outcome:
    """Fill the workers' data dir (a tmpfs) while the history writes Parquet, then free it."""
    out = Outcome("disk full")
    if cluster.tmpfs is None:
        out.notes.append(f"no tmpfs: {cluster.tmpfs_error}")
        return out
    before = cluster.crashes()
    scopes, load = _load(cluster, "disk", size)
    load.start()
    wait_for(lambda: load.acked >= size.events // 4, 120)
    filler = cluster.data_dir / "chaos-filler.bin"
    try:
        cluster.fill_disk()
        out.details["free_bytes_while_full"] = shutil.disk_usage(cluster.data_dir).free
        deadline = time.time() + full_s
        while time.time() < deadline:
            cluster.heal()  # a supervisor restarts what the full disk kills
            time.sleep(1.0)
    finally:
        filler.unlink(missing_ok=True)  # never leave the disk full for the next scenario
    fault_end = time.time()
    report = load.join()
    return finish(cluster, out, report, scopes, size, fault_end=fault_end, crashes_before=before)


def poison(cluster: Cluster, size: Size = QUICK, rounds: int = 3) -> Outcome:
    """Bad input at a steady rate between good turns; the worker must go on."""
    out = Outcome("poison inputs")
    before = cluster.crashes()
    scopes, load = _load(cluster, "poison", size)
    load.start()
    bad = LoadReport()
    period = size.events / size.rate / (rounds + 1)
    for i in range(rounds):
        time.sleep(period)
        # The 10 MB text once: somna.interactions takes it (16 MiB records), the worker
        # dead-letters it (over SOMNA_MAX_TEXT_BYTES) and goes on.
        recs = [r for r in poison_records(scopes[0]) if i == 0 or r[0] != "huge_text"]
        got = asyncio.run(send_records(cluster.bootstrap, recs))
        bad.sent += got.sent
        bad.send_errors += got.send_errors
    fault_end = time.time()
    report = load.join()
    finish(
        cluster,
        out,
        report,
        scopes,
        size,
        fault_end=fault_end,
        other=bad.sent,
        crashes_before=before,
    )
    out.send_errors += [f"{k}: {e[:160]}" for k, e in bad.send_errors]
    letters = _letters_for(cluster, bad.sent)
    by_kind: dict[str, str] = {}
    for s in bad.sent:
        by_kind.setdefault(s.kind, "")
        if (s.topic, s.partition, s.offset) in letters:
            by_kind[s.kind] = "dead-lettered"
    for kind, err in bad.send_errors:
        by_kind[kind] = "refused by the producer/broker: " + err.split(":")[0]
    out.details["poison"] = {k: v or "no dead letter" for k, v in by_kind.items()}
    out.details["poison_sent"] = len(bad.sent)
    out.details["poison_not_dead_lettered"] = sum(
        1
        for s in bad.sent
        if s.topic == INTERACTIONS and (s.topic, s.partition, s.offset) not in letters
    )
    out.details["path_scope_leaked"] = _path_scope_leaked(cluster)
    out.details.update(_after_huge_text(cluster, bad.sent, report.turns))
    # Retractions of events that never existed: a rebuild (a new version) for nothing.
    audit = registry_audit(cluster.mlflow_uri, {scopes[0]})
    out.details["versions_from_bogus_retractions"] = audit["versions_from_retractions"]
    return out


def _after_huge_text(cluster: Cluster, bad: list[Sent], turns: list[Sent]) -> dict:
    """The size of the 10 MB text's dead letter, and whether the turns after it got replies."""
    import json

    from infra.topics import DEAD_LETTERS

    assert cluster.tail is not None
    huge = [s for s in bad if s.kind == "huge_text"]
    if not huge:
        return {"huge_text_letter_bytes": 0, "turns_after_huge_text": 0}
    at = (huge[0].topic, huge[0].partition, huge[0].offset)
    letters = [
        d.value
        for d in cluster.tail.records(DEAD_LETTERS)
        if d.value
        and (d.value.get("source_topic"), d.value.get("partition"), d.value.get("offset")) == at
    ]
    replied = {r.get("event_id") for r in replies_for(cluster, {t.scope_id for t in turns})}
    after = [t for t in turns if t.sent_at > huge[0].sent_at]
    return {
        "huge_text_letter_bytes": len(json.dumps(letters[0]).encode()) if letters else 0,
        "huge_text_letter_reason": str(letters[0].get("error"))[:160] if letters else None,
        "turns_after_huge_text": len(after),
        "turns_after_huge_text_unanswered": sum(1 for t in after if t.event_id not in replied),
    }


def _letters_for(cluster: Cluster, sent: list[Sent]) -> set[tuple[str, int, int]]:
    from infra.topics import DEAD_LETTERS

    assert cluster.tail is not None
    ours = {(s.topic, s.partition, s.offset) for s in sent}
    found = set()
    for d in cluster.tail.records(DEAD_LETTERS):
        if d.value:
            k = (d.value.get("source_topic"), d.value.get("partition"), d.value.get("offset"))
            if k in ours:
                found.add(k)
    return found


def _path_scope_leaked(cluster: Cluster) -> list[str]:
    """Anything the `../x` scope left: a reply, a history row, or a path named `x`."""
    from .checker import history_rows

    leaks = [f"reply {r.get('reply_id')}" for r in replies_for(cluster, {"../x"})]
    leaks += [
        f"history row {r['event_id']}"
        for r in history_rows(cluster.history_dir)
        if r["scope_id"] == "../x"
    ]
    leaks += [str(p) for p in cluster.root.rglob("x")]
    return leaks


def forged_fast_weights(cluster: Cluster, size: Size = QUICK) -> Outcome:
    """A FastWeightsPublished naming scope A's artifact for scope B, and one for A with a bad
    sha256: the agent must refuse both and keep serving each scope's previous version.

    Phase 1 talks to A and B until a reply of A is served with a genuine version; phase 2
    sends the forgeries, then a short second load on A and B whose replies are checked.
    """
    out = Outcome("forged fast weights")
    before = cluster.crashes()
    cluster.heal()
    a, b = new_scopes("forge", 2)
    phase1 = UserLoad(cluster.bootstrap, [a, b], size.events * 4, rate=size.rate).start()

    def a_serves_genuine() -> bool:
        own = {str(p["version"]) for p in published_for(cluster, {a})}
        return any(str(r.get("fast_weights_version")) in own for r in replies_for(cluster, {a}))

    served = wait_for(a_serves_genuine, size.drain_s, poll=1.0)
    phase1.stop()
    first = phase1.join()
    if not published_for(cluster, {a}):
        out.notes.append("scope A never got a fast-weights version: nothing to forge from")
        return finish(cluster, out, first, [a, b], size, fault_end=None, crashes_before=before)
    if not served:
        out.notes.append("scope A's genuine version was never served (base model mismatch?)")
    genuine = FastWeightsPublished.model_validate(published_for(cluster, {a})[-1])
    b_versions = [str(p["version"]) for p in published_for(cluster, {b})]
    # New version ids (a reply that carried one would show the forgery was applied) ...
    to_b = forged(genuine, scope_id=b)  # A's artifact (right sha256) announced for B
    bad_sha = forged(genuine, sha256="0" * 64)  # A's own artifact with a wrong sha256
    fakes = {to_b.version, bad_sha.version}
    # ... and the same two under version ids the registry does hold, so that the agent has
    # to compare the sha256 and artifact with the registry's rather than miss the version.
    to_b_real = forged(genuine, scope_id=b, version=b_versions[-1] if b_versions else "1")
    bad_sha_real = forged(genuine, sha256="0" * 64, version=genuine.version)
    log_from = cluster.stream.log_size()
    forged_sent = []
    for kind, event in (
        ("forged_other_scope", to_b),
        ("forged_bad_sha256", bad_sha),
        ("forged_other_scope_known_version", to_b_real),
        ("forged_bad_sha256_known_version", bad_sha_real),
    ):
        forged_sent += send_forged(cluster.bootstrap, [event], kind).sent
    time.sleep(3.0)  # let the agent see (and refuse) them before the next turns
    fault_end = time.time()
    second = UserLoad(cluster.bootstrap, [a, b], min(40, size.events), rate=size.rate).start()
    report = second.join()
    report.sent = first.sent + report.sent
    report.send_errors = first.send_errors + report.send_errors
    finish(
        cluster,
        out,
        report,
        [a, b],
        size,
        fault_end=fault_end,
        other=forged_sent,
        forged_versions=fakes,
        crashes_before=before,
    )
    # After the forgery each scope serves one of its own genuine versions (or none yet), and
    # A, which served a genuine version before, never falls back to none.
    after = [r for r in replies_for(cluster, {a, b}) if float(r.get("ts", 0)) >= fault_end]
    own = {sc: {str(p["version"]) for p in published_for(cluster, {sc}, fakes)} for sc in (a, b)}
    wrong = [
        r
        for r in after
        if r.get("fast_weights_version") is not None
        and str(r["fast_weights_version"]) not in own[r["scope_id"]]
    ]
    regressed = [r for r in after if r["scope_id"] == a and r.get("fast_weights_version") is None]
    audit = registry_audit(cluster.mlflow_uri, {a, b})
    out.misrouted += audit["registered_for_wrong_scope"]
    out.details.update(
        **audit,
        forged_versions=sorted(fakes),
        forgeries_sent=len(forged_sent),
        refusals_in_stream_log=cluster.stream.log_count("refused fast weights", log_from),
        a_served_genuine_before=served,
        replies_after_forgery=len(after),
        served_foreign_or_forged=len(wrong),
        scope_a_dropped_its_version=len(regressed) if served else None,
    )
    return out


# In the order the suite runs them: those that restart the stream worker last.
ALL: dict[str, Callable[..., Outcome]] = {
    "poison": poison,
    "forged_fast_weights": forged_fast_weights,
    "kill_sleep_worker": kill_sleep_worker,
    "mlflow_kill": mlflow_kill,
    "broker_outage": broker_outage,
    "disk_full": disk_full,
    "kill_stream_worker": kill_stream_worker,
}


def warm_up(cluster: Cluster, timeout: float = 300.0) -> float:
    """One turn through the whole pipeline before the faults start; seconds it took."""
    began = time.time()
    scope = new_scopes("warmup", 1)
    load = UserLoad(cluster.bootstrap, scope, 1, rate=1.0).start()
    report = load.join(60)

    def through() -> bool:
        if not all(p.alive for p in cluster.workers):
            return True  # a worker died while starting: no point in waiting
        return bool(report.turns) and complete(cluster.tail, cluster.history_dir, report.turns) == (
            0,
            0,
        )

    ok = wait_for(through, timeout, poll=1.0)
    if not ok or not all(p.alive for p in cluster.workers):
        raise RuntimeError(
            "the warm-up turn got no reply and history row in time\n--- stream worker:\n"
            + cluster.stream.tail()
            + "\n--- sleep worker:\n"
            + cluster.sleep.tail()
        )
    return time.time() - began
