"""Progress for loops: tqdm's bar on a terminal, a plain line every ~10% or 30 s anywhere else.

A bar redraws itself with carriage returns; written to a log file or a CI console it becomes one
huge line (the quick demo's log was 533 KB in 13 lines). ``progress`` keeps the bar where someone
watches a terminal and otherwise prints whole lines::

    with progress(total=steps, desc="generator") as bar:      # or: for x in progress(items, desc=...)
        for step in range(steps):
            ...
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")

    generator: 500/1000 (50%) 12s elapsed, 41.2 it/s, ~12s left, loss=0.0213
"""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable

EVERY_FRACTION = 0.1  # a line each time another tenth of the total is done
EVERY_SECONDS = 30.0  # and at least this often while it runs


def is_terminal(stream: IO | None) -> bool:
    """Whether ``stream`` is a terminal someone watches (or a notebook, where tqdm draws a widget)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", initial: int = 0,
             disable: bool = False, stream: IO | None = None):
    """A progress display for a loop: ``tqdm.auto.tqdm`` when ``stream`` (default stderr) is a
    terminal, else a :class:`LineProgress`. Both take ``update(n)``, ``set_postfix(**values)``,
    ``close()``, ``with`` and iteration over ``iterable``."""
    stream = sys.stderr if stream is None else stream
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not disable and is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, file=stream, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, initial=initial, disable=disable, stream=stream)


class LineProgress:
    """Progress as whole lines: one each time ``every_fraction`` more of ``total`` is done, or
    ``every_seconds`` have passed since the last, and one at the end. No carriage returns."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 initial: int = 0, disable: bool = False, stream: IO | None = None,
                 every_fraction: float = EVERY_FRACTION, every_seconds: float = EVERY_SECONDS, clock=time.monotonic):
        self.iterable, self.total, self.desc, self.n = iterable, total, desc, initial
        self.disable, self.stream = disable, sys.stderr if stream is None else stream
        self.every_fraction, self.every_seconds, self.clock = every_fraction, every_seconds, clock
        self.start = self.last_time = clock()
        self.start_n = self.last_n = initial
        self.postfix = ""

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values) -> None:
        """Values shown at the end of the next line (as tqdm's ``set_postfix``)."""
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = self.clock()
        step = self.every_fraction * self.total if self.total else None
        crossed = step and int(self.n / step) > int(self.last_n / step)
        if crossed or now - self.last_time >= self.every_seconds:
            self._line(now)

    def close(self) -> None:
        """The last line, unless the last update already printed it."""
        if not self.disable and self.n != self.last_n:
            self._line(self.clock())
        self.disable = True

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        left = (f", ~{_duration((self.total - self.n) / rate)} left"
                if self.total and rate > 0 and self.n < self.total else "")
        tail = f", {self.postfix}" if self.postfix else ""
        prefix = f"{self.desc}: " if self.desc else ""
        print(f"{prefix}{done} {_duration(elapsed)} elapsed, {rate:.3g} it/s{left}{tail}", file=self.stream, flush=True)
        self.last_time, self.last_n = now, self.n


def _duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
