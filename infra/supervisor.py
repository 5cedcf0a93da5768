"""Keep a few worker subprocesses alive: start them, restart one that dies, stop them in order.

A worker that exits is restarted with a growing delay (1 s, 2 s, 4 s ... 60 s), reset once
it has stayed up for a minute. Two exit codes mean "this command cannot run here" and are
not retried: 2 (a usage error: the command does not exist yet) and ``EXIT_UNAVAILABLE``
(the code behind the command is not installed).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infra.process import spawn, tail, terminate

log = logging.getLogger(__name__)

EXIT_UNAVAILABLE = 3
NOT_RETRIED = {2: "the command does not exist", EXIT_UNAVAILABLE: "its code is not installed"}
MAX_DELAY = 60.0
STABLE_AFTER = 60.0


@dataclass
class Child:
    """One supervised command. ``log_path`` None: it writes to our terminal (the demo view)."""

    name: str
    argv: Sequence[str]
    log_path: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # over the supervisor's
    # Restart after a clean exit (code 0) too? Workers yes: they should never stop alone.
    restart_on_success: bool = True
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    delay: float = 1.0
    next_start: float | None = None
    gave_up: str | None = None
    events: list[str] = field(default_factory=list)


class Supervisor:
    def __init__(self, children: Sequence[Child], env: Mapping[str, str]) -> None:
        self.children = list(children)
        self.env = dict(env)

    def start_all(self) -> None:
        for child in self.children:
            self._start(child)

    def poll(self) -> None:
        """Notice exits and do restarts that are due; call this every fraction of a second."""
        now = time.monotonic()
        for child in self.children:
            if child.gave_up:
                continue
            if child.proc is not None and child.proc.poll() is not None:
                self._exited(child, now)
            if child.proc is None and child.next_start is not None and now >= child.next_start:
                self._start(child)

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM the children in reverse start order, each given ``timeout`` seconds."""
        for child in reversed(self.children):
            child.next_start = None
            if child.proc is not None:
                code = terminate(child.proc, timeout)
                self._note(child, f"stopped (exit {code})")
                child.proc = None

    def _start(self, child: Child) -> None:
        child.next_start = None
        env = {**self.env, **child.env}
        if child.log_path is None:
            child.proc = subprocess.Popen(list(child.argv), env=env, start_new_session=True)
        else:
            child.proc = spawn(child.argv, child.log_path, env=env)
        child.started_at = time.monotonic()
        where = f", log {child.log_path}" if child.log_path else ""
        self._note(child, f"started (pid {child.proc.pid}{where})")

    def _exited(self, child: Child, now: float) -> None:
        assert child.proc is not None
        code = child.proc.returncode
        uptime = now - child.started_at
        child.proc = None
        if code in NOT_RETRIED:
            child.gave_up = NOT_RETRIED[code]
            last = tail(child.log_path, 1).strip() if child.log_path else ""
            self._note(
                child,
                f"exited with code {code}: {child.gave_up}; not restarting"
                + (f" (last log line: {last[:300]})" if last else ""),
                level=logging.WARNING,
            )
            return
        if code == 0 and not child.restart_on_success:
            child.gave_up = "finished"
            self._note(child, "finished (exit 0)")
            return
        if uptime >= STABLE_AFTER:
            child.delay = 1.0
        child.restarts += 1
        child.next_start = now + child.delay
        last = tail(child.log_path, 1).strip() if child.log_path else ""
        self._note(
            child,
            f"exited with code {code} after {uptime:.1f} s; restart {child.restarts} "
            f"in {child.delay:.0f} s" + (f" (last log line: {last[:300]})" if last else ""),
            level=logging.WARNING,
        )
        child.delay = min(child.delay * 2, MAX_DELAY)

    def _note(self, child: Child, what: str, level: int = logging.INFO) -> None:
        child.events.append(what)
        log.log(level, "worker %s %s", child.name, what)
