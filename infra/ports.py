"""Local TCP ports: pick a free one, check one is free, and name who holds a busy one."""

from __future__ import annotations

import contextlib
import os
import random
import socket
from pathlib import Path

# Not the global `random`: tests seed it, and two seeded processes must not pick alike.
_rng = random.SystemRandom()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now, for a server we are about to start.

    Chosen at random *below* the ephemeral range: a port the OS picks with bind(0) may be
    taken as the local end of some outgoing connection in the seconds before a JVM binds it.
    """
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = _rng.randrange(20_000, low) if low > 21_000 else _rng.randrange(20_000, 30_000)
        if port_is_free(port, host):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports (a broker and its controller: two picks of
    :func:`free_port` agree once in ~13,000, and the broker then refuses to start)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def _ephemeral_range() -> tuple[int, int]:
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return 32768, 60999


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on (host, port).

    SO_REUSEADDR makes a port with only TIME_WAIT connections (a broker we just stopped)
    count as free, as it is for the JVM, which sets the same option.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def who_listens(port: int) -> str:
    """'pid 123 (java -cp ...)' for the process listening on a local TCP port, if we can tell.

    Reads /proc (Linux); elsewhere, or without permission, says it does not know.
    """
    inodes = _listening_inodes(port)
    if not inodes:
        return "an unknown process"
    proc = Path("/proc")
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return f"pid {pid_dir.name} ({_cmdline(pid_dir)})"
    return "an unknown process"


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                    inodes.add(inode)
    return inodes


def _cmdline(pid_dir: Path, limit: int = 120) -> str:
    with contextlib.suppress(OSError):
        cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        cmd = cmd.strip()
        return cmd if len(cmd) <= limit else cmd[: limit - 3] + "..."
    return "?"
