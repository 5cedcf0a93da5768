"""A rate limit for the Kafka client's own logs, so that a broker outage stays readable.

While the broker is down, aiokafka logs every failed connect, metadata refresh, fetch and
produce retry: hundreds to thousands of lines a second, which bury our own messages and
fill the disk. :func:`limit_client_logs` puts :class:`RateLimit` on the root handlers: each
distinct message of a limited logger (its logger name and format string) passes once per
``interval`` seconds, all of them together at most ``burst`` a second, and the next one
that passes says how many were held back. Records of other loggers (ours, Faust's) and
records at CRITICAL always pass.
"""

from __future__ import annotations

import logging
import threading
import time

# The loggers whose records are limited (and their children).
CLIENT_LOGGERS = ("aiokafka", "kafka")


class RateLimit(logging.Filter):
    def __init__(
        self,
        prefixes: tuple[str, ...] = CLIENT_LOGGERS,
        *,
        interval: float = 5.0,
        burst: int = 3,
        clock: object = time.monotonic,
    ) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.interval = interval
        self.burst = burst
        self._clock = clock
        self._last: dict[tuple[str, object], float] = {}  # message -> when it last passed
        self._held: dict[tuple[str, object], int] = {}  # message -> suppressed since
        self._second = -1  # the second the burst budget counts
        self._used = 0
        self._lock = threading.Lock()  # aiokafka logs from Faust's consumer thread too

    def _limited(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL or not self._limited(record.name):
            return True
        key = (record.name, record.msg)
        now = self._clock()  # type: ignore[operator]
        with self._lock:
            second = int(now)
            if second != self._second:
                self._second, self._used = second, 0
            last = self._last.get(key)
            if (last is not None and now - last < self.interval) or self._used >= self.burst:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            self._used += 1
            held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.getMessage()} [{held} more like this held back]"
            record.args = None
        return True


def limit_client_logs(logger: logging.Logger | None = None, **kw: object) -> RateLimit:
    """Put one :class:`RateLimit` on every handler of ``logger`` (default: root); idempotent."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        for f in handler.filters:
            if isinstance(f, RateLimit):
                return f
    limit = RateLimit(**kw)  # type: ignore[arg-type]
    for handler in logger.handlers:
        handler.addFilter(limit)
    return limit
