"""`somna up`'s supervision: restarts, commands that do not exist yet, orderly stop."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import pytest

from infra.settings import Settings
from infra.supervisor import Child, Supervisor
from infra.up import default_children, run_up, somna_argv


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def poll_until(supervisor: Supervisor, done, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        supervisor.poll()
        time.sleep(0.1)


def test_restarts_crashes_gives_up_on_missing_commands_stops_in_reverse(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="infra.supervisor")
    first = Child("first", py("import time; time.sleep(600)"), tmp_path / "first.log")
    crasher = Child("crasher", py("raise SystemExit(1)"), tmp_path / "crasher.log")
    missing = Child("missing", somna_argv("no-such-command"), tmp_path / "missing.log")
    last = Child("last", py("import time; time.sleep(600)"), tmp_path / "last.log")
    supervisor = Supervisor([first, crasher, missing, last], env={"PATH": "/usr/bin:/bin"})
    supervisor.start_all()
    try:
        poll_until(supervisor, lambda: crasher.restarts >= 2 and missing.gave_up is not None)
    finally:
        supervisor.stop_all(timeout=10)
    assert crasher.restarts >= 2
    assert missing.gave_up == "the command does not exist" and missing.restarts == 0
    assert first.restarts == 0 and last.restarts == 0
    stops = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert stops[0].startswith("worker last stopped") and stops[-1].startswith(
        "worker first stopped"
    )


@pytest.mark.kafka
@pytest.mark.mlflow
def test_up_hands_the_services_to_its_workers(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = tmp_path / "seen.txt"
    monkeypatch.setenv("SEEN", str(seen))  # workers inherit our environment
    reporter = Child(
        "reporter",
        py(
            "import os, pathlib, time; pathlib.Path(os.environ['SEEN']).write_text("
            "os.environ['SOMNA_KAFKA_BOOTSTRAP'] + ' ' + os.environ['SOMNA_MLFLOW_URI'] + ' ' +"
            " os.environ['SOMNA_STREAM_GROUP']); time.sleep(600)"
        ),
        tmp_path / "reporter.log",
        env={"SOMNA_STREAM_GROUP": "its-own"},  # a child's own variables, over ours
    )
    stop = threading.Event()

    def stop_once_seen() -> None:
        deadline = time.monotonic() + 120
        while not seen.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()

    threading.Thread(target=stop_once_seen, daemon=True).start()
    run_up(settings, children=[reporter], stop=stop)
    assert seen.read_text() == f"{settings.kafka_bootstrap} {settings.mlflow_uri} its-own"
    assert reporter.proc is None  # stopped with the rest


def test_the_agent_runs_in_a_stream_worker_of_its_own(tmp_path: Path, monkeypatch):
    """Each stream role runs once; the agent alone (streams.app.AGENT_ROLES); the
    aggregators keep the consumer group of the one worker `somna up` ran before."""
    from streams.app import ALL_ROLES, group_id

    def roles(argv: list[str]) -> list[str]:
        return [argv[i + 1] for i, a in enumerate(argv) if a == "--role"]

    monkeypatch.delenv("SOMNA_STREAM_GROUP", raising=False)
    streams = [c for c in default_children(tmp_path, demo=False) if "stream" in c.argv]
    assert sorted(r for c in streams for r in roles(list(c.argv))) == sorted(ALL_ROLES)
    (agent,) = [c for c in streams if "agent" in c.argv]
    (aggregators,) = [c for c in streams if c is not agent]
    assert roles(list(agent.argv)) == ["agent"]
    assert aggregators.env["SOMNA_STREAM_GROUP"] == group_id(ALL_ROLES)
    assert agent.env["SOMNA_STREAM_GROUP"] != group_id(ALL_ROLES)
    assert agent.log_path != aggregators.log_path
    monkeypatch.setenv("SOMNA_STREAM_GROUP", "ours")  # a group the user chose stays theirs
    groups = {c.name: c.env.get("SOMNA_STREAM_GROUP") for c in default_children(tmp_path, False)}
    assert groups["stream"] == "ours" and groups["agent"] == "ours-agent"
