"""Prometheus text-format metrics, kept by hand (no client library): request counts by endpoint
and status, request latency and batch size histograms, LoRA cache hits, misses and bytes, queue
depth, requests and image bytes admitted, and the process's resident memory (RSS)."""

from __future__ import annotations

import resource
import sys
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def resident_bytes() -> int:
    """The process's resident set size now (Linux: /proc/self/statm; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _gauge(name: str, help: str, value: float) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]


class Histogram:
    """Cumulative buckets, a sum and a count (one label set)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]


class Metrics:
    """What ``GET /metrics`` reports. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.batch_tiles = Histogram(BATCH_BUCKETS + (128, 256))
        self.cache_hits = 0
        self.cache_misses = 0
        self.queue_depth = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, requests: int, tiles: int, hits: int) -> None:
        with self._lock:
            self.batch_size.observe(requests)
            self.batch_tiles.observe(tiles)
            self.cache_hits += hits
            self.cache_misses += requests - hits

    def render(self, cache=None, admission=None) -> str:
        """The text of ``GET /metrics`` (``cache``: a ``LoRACache``; ``admission``: an ``Admission``)."""
        extra = _gauge("process_resident_memory_bytes", "Resident memory of the server process.", resident_bytes())
        if cache is not None:
            extra += _gauge("funcmem_lora_cache_bytes", "Bytes of LoRA factors in the cache.", cache.bytes)
            extra += _gauge("funcmem_lora_cache_entries", "LoRAs in the cache.", len(cache))
        if admission is not None:
            extra += _gauge("funcmem_in_flight", "Requests admitted and not yet answered.", admission.requests)
            extra += _gauge("funcmem_image_bytes", "Bytes of decoded images reserved by admitted requests.",
                            admission.image_bytes)
            extra += _gauge("funcmem_admission_refused", "Requests refused (503) because a budget was full.",
                            admission.refused)
        with self._lock:
            out = ["# HELP funcmem_requests_total HTTP requests by endpoint and status code.",
                   "# TYPE funcmem_requests_total counter"]
            out += [f'funcmem_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                    for (e, c), n in sorted(self.requests.items())]
            out += ["# HELP funcmem_request_seconds Request latency, from arrival to response.",
                    "# TYPE funcmem_request_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += h.lines("funcmem_request_seconds", f'endpoint="{e}"')
            out += ["# HELP funcmem_batch_size Requests computed together in one batch.",
                    "# TYPE funcmem_batch_size histogram", *self.batch_size.lines("funcmem_batch_size"),
                    "# HELP funcmem_batch_tiles Image tiles computed together in one batch.",
                    "# TYPE funcmem_batch_tiles histogram", *self.batch_tiles.lines("funcmem_batch_tiles"),
                    "# HELP funcmem_lora_cache_hits_total Requests whose LoRA came from the cache.",
                    "# TYPE funcmem_lora_cache_hits_total counter", f"funcmem_lora_cache_hits_total {self.cache_hits}",
                    "# HELP funcmem_lora_cache_misses_total Requests whose LoRA was generated.",
                    "# TYPE funcmem_lora_cache_misses_total counter",
                    f"funcmem_lora_cache_misses_total {self.cache_misses}",
                    "# HELP funcmem_queue_depth Requests waiting for a batch.",
                    "# TYPE funcmem_queue_depth gauge", f"funcmem_queue_depth {self.queue_depth}"]
        return "\n".join(out + extra) + "\n"


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> {series (name with labels): value} (for tests and ``funcmem loadtest``)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            values[series] = float(value)
    return values
