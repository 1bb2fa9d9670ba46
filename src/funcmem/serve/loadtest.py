"""``funcmem loadtest``: concurrent ``POST /v1/edit`` requests against a local server.

Bounded on purpose: loopback URLs only, at most ``MAX_REQUESTS`` requests, and no new request
after ``duration_s``. Each request sends the same photo with one pixel changed (its number
written into it), so no two requests share a LoRA cache key unless ``repeat`` is set: the figures
measure generation and editing, not the cache. Instructions cycle through one per edit.

Reports throughput, latency percentiles, errors and the mean batch size (from ``/metrics``,
the change over the run).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import statistics
import time
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from ..io import write_json
from .manifold import example_instructions
from .metrics import parse

MAX_REQUESTS = 10_000
MAX_CONCURRENCY = 256


def check_loopback(url: str) -> str:
    """The URL without a trailing slash; ValueError unless it is http(s) on a loopback host."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"not an http URL: {url!r}")
    host = parsed.hostname
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        raise ValueError(f"loadtest only targets a server on this machine (127.0.0.1, ::1, localhost), not {host!r}")
    return url.rstrip("/")


def _images(n: int, size: tuple[int, int], repeat: bool, seed: int = 0) -> list[bytes]:
    """n PNGs of one random smooth photo-like image; request i has pixel (0, 0) set from i."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    out = []
    for i in range(1 if repeat else n):
        array = base.copy()
        array[0, 0] = [(i >> 16) & 255, (i >> 8) & 255, i & 255]
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _batch_stats(metrics_text: str) -> tuple[float, float]:
    m = parse(metrics_text)
    return m.get("funcmem_batch_size_sum", 0.0), m.get("funcmem_batch_size_count", 0.0)


async def _run(url: str, concurrency: int, requests: int, duration_s: float, size: tuple[int, int],
               repeat: bool, timeout_s: float) -> dict:
    import httpx

    images = _images(requests, size, repeat)
    instructions = list(example_instructions().values())
    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_index = 0
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        before = _batch_stats((await client.get(f"{url}/metrics")).text)
        start = time.perf_counter()

        async def worker():
            nonlocal next_index
            while next_index < requests and time.perf_counter() - start < duration_s:
                i = next_index
                next_index += 1
                files = {"image": (f"load{i}.png", images[0 if repeat else i], "image/png")}
                data = {"instruction": instructions[i % len(instructions)]}
                t = time.perf_counter()
                try:
                    r = await client.post(f"{url}/v1/edit", files=files, data=data)
                    if r.status_code != 200:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                        continue
                except httpx.HTTPError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    continue
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        after = _batch_stats((await client.get(f"{url}/metrics")).text)
    batches = after[1] - before[1]
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"url": url, "concurrency": concurrency, "sent": next_index, "ok": len(latencies),
            "errors": sum(errors.values()), "error_kinds": errors, "seconds": elapsed,
            "throughput_rps": len(latencies) / elapsed if elapsed else 0.0,
            "latency_ms": {"p50": 1000 * q[49], "p95": 1000 * q[94], "p99": 1000 * q[98]} if latencies else {},
            "mean_batch_size": (after[0] - before[0]) / batches if batches else 0.0, "batches": batches,
            "image_size": list(size), "repeat": repeat}


def run_loadtest(url: str, concurrency: int = 32, requests: int = 500, duration_s: float = 300.0,
                 size: tuple[int, int] = (64, 64), repeat: bool = False, timeout_s: float = 60.0) -> dict:
    """Run the load test (see the module doc) and return its figures."""
    url = check_loopback(url)
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"requests must lie in [1, {MAX_REQUESTS}], got {requests}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must lie in [1, {MAX_CONCURRENCY}], got {concurrency}")
    return asyncio.run(_run(url, concurrency, requests, duration_s, size, repeat, timeout_s))


def format_report(r: dict) -> str:
    lat = r["latency_ms"]
    lines = [f"{r['ok']}/{r['sent']} ok in {r['seconds']:.1f} s, concurrency {r['concurrency']}, "
             f"{r['image_size'][0]}x{r['image_size'][1]} images",
             f"throughput {r['throughput_rps']:.2f} req/s",
             (f"latency p50 {lat['p50']:.0f} ms  p95 {lat['p95']:.0f} ms  p99 {lat['p99']:.0f} ms" if lat else "no latency"),
             f"errors {r['errors']} {r['error_kinds'] or ''}".rstrip(),
             f"mean batch size {r['mean_batch_size']:.2f} over {r['batches']:.0f} batches"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``funcmem loadtest``'s options."""
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="loopback only")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--duration", type=float, default=300.0, help="no new request after this many seconds")
    parser.add_argument("--size", type=int, default=64, help="side of the square test image")
    parser.add_argument("--repeat", action="store_true", help="send the same image every time (LoRA cache hits)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")


def run_cli(args: argparse.Namespace) -> int:
    try:
        result = run_loadtest(args.url, args.concurrency, args.requests, args.duration, (args.size, args.size),
                              args.repeat, args.timeout)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    print(format_report(result))
    if args.json:
        write_json(args.json, result)
    return 0 if result["errors"] == 0 else 1
