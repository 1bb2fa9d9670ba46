"""Bounded logs: each kind of message is written at most ``burst`` times a ``period``; the rest are
counted and the count is reported with the next one that gets through.

A flood of bad requests makes uvicorn log one line each ("Invalid HTTP request received.", an
access line, a traceback); unbounded, that was 207 MB of log in 30 s. A kind is the logger and
the message's format string (not its arguments), so all access lines are one kind, each warning
text another.
"""

from __future__ import annotations

import logging
import threading
import time

LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "funcmem")


class RateLimit(logging.Filter):
    """A logging filter passing at most ``burst`` records of each kind per ``period`` seconds.

    Args:
        burst: records of one kind let through per period.
        period: seconds.
        max_kinds: kinds remembered (a flood of distinct messages cannot grow the table).
    """

    def __init__(self, burst: int = 20, period: float = 60.0, max_kinds: int = 512):
        super().__init__()
        self.burst, self.period, self.max_kinds = burst, period, max_kinds
        self._kinds: dict[tuple[str, str], list] = {}  # kind -> [window start, passed, suppressed]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            if kind not in self._kinds and len(self._kinds) >= self.max_kinds:
                self._kinds.clear()
            window = self._kinds.setdefault(kind, [now, 0, 0])
            if now - window[0] >= self.period:
                window[0], window[1] = now, 0
            if window[1] >= self.burst:
                window[2] += 1
                return False
            window[1] += 1
            suppressed, window[2] = window[2], 0
        if suppressed:
            record.msg, record.args = "%s [%d more like this were not logged]", (record.getMessage(), suppressed)
        return True


def limit_logs(burst: int = 20, period: float = 60.0) -> RateLimit:
    """Attach one ``RateLimit`` to the server's loggers (after uvicorn configured them)."""
    limit = RateLimit(burst, period)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RateLimit)]:
            logger.removeFilter(old)
        logger.addFilter(limit)
    return limit
