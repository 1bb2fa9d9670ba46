"""Timing for benchmarks: medians of interleaved repeats after warm-up, and growth exponents."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
             min_time: float) -> dict[str, float]:
    """Median seconds per call of each function: two warm-up calls, then ``repeats`` rounds that
    time every function in turn (interleaved, so drift hits all alike), each round looping a
    function long enough to last ``min_time``."""
    inner = {}
    for name, fn in fns.items():
        fn(), fn()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        inner[name] = max(1, int(min_time / max(time.perf_counter() - start, 1e-7)))
    rounds = repeats if max(inner.values()) > 1 else max(3, repeats // 2)  # slow shapes: fewer rounds
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(t) for name, t in times.items()}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (the growth exponent)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
