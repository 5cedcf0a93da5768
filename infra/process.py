"""Child processes of the launchers: start with the output in a log file, stop politely.

The broker and the tracking server run in their own process group, so a Ctrl-C in the
terminal reaches only `somna`, which then stops them in order. On Linux they also get
SIGTERM if the Python process that started them (from its main thread) dies, so a killed
test run leaves no orphan JVM behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _can_die_with_parent() -> bool:
    # The kernel signals the child when the *thread* that forked it exits, so only a child
    # of the main thread (which lives as long as the process) can safely be tied to it.
    return (
        sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
    )


def spawn(
    cmd: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    own_group: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=own_group,
            preexec_fn=_die_with_parent if _can_die_with_parent() else None,
        )


def terminate(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages ('' when there is none)."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16_384))
            text = f.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
    return ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
