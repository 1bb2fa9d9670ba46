"""``funcmem loadtest``: concurrent ``POST /v1/edit`` requests against a local server, optionally
beside an attack mix.

Bounded on purpose: loopback URLs only, at most ``MAX_REQUESTS`` requests a phase, at most
``MAX_SLOW`` slow connections, and no new request after ``duration_s``. Each request sends the
same photo with one pixel changed (its number written into it), so no two requests share a LoRA
cache key unless ``repeat`` is set: the figures measure generation and editing, not the cache.
Instructions cycle through one per edit.

A few warm-up requests go first (not counted). With ``attack``, the same normal traffic then runs
three times: alone, beside attackers, and alone again (recovery). The attackers (``attackers`` of
each kind) send the largest inputs the default limits accept, as small files: wide images
(20000x400, side ratio 50: the tile limit's worst case) and big images (12 megapixels of one
colour: the pixel limit's worst case), and hold ``slow`` slow connections (a header byte a
second). Reported for each phase: throughput, latency percentiles, errors, the mean batch size
(from ``/metrics``, the change over the phase) and the server's resident memory
(``process_resident_memory_bytes``, sampled twice a second), and for the attack phase what the
attackers got.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import itertools
import os
import statistics
import time
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from ..cli import UsageError
from ..io import write_json
from .manifold import example_instructions
from .metrics import parse

MAX_REQUESTS = 10_000
MAX_CONCURRENCY = 256
MAX_SLOW = 256
MAX_ATTACKERS = 8
_SENT = itertools.count()  # numbers the attack images (pixel (0, 0) differs: each one is new)


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
        out.append(_png(array))
    return out


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _flat(width: int, height: int, i: int) -> bytes:
    """A one-colour PNG (tiny on the wire, many pixels), pixel (0, 0) set from i (no cache hits)."""
    array = np.full((height, width, 3), 100, np.uint8)
    array[0, 0] = [i & 255, (i >> 8) & 255, 7]
    return _png(array)


class _Monitor:
    """Samples ``/metrics`` twice a second: the server's RSS (peak, last) and the batch counters."""

    def __init__(self, client, url: str):
        self.client, self.url = client, url
        self.rss: list[float] = []
        self.task = None

    async def read(self) -> dict[str, float]:
        r = await self.client.get(f"{self.url}/metrics")
        if r.status_code == 401:
            raise ValueError("the server needs an API key: set FUNCMEM_API_KEY to it")
        return parse(r.text) if r.status_code == 200 else {}

    async def _loop(self):
        while True:
            try:
                self.rss.append((await self.read())["process_resident_memory_bytes"])
            except Exception:  # a busy server, or no such series: the sample is skipped
                pass
            await asyncio.sleep(0.5)

    def start(self):
        self.rss.clear()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> dict:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        rss = self.rss or [0.0]
        return {"rss_peak_mb": max(rss) / 2**20, "rss_end_mb": rss[-1] / 2**20}


async def _normal(client, url: str, images: list[bytes], concurrency: int, requests: int, duration_s: float,
                  repeat: bool) -> dict:
    """The normal traffic: ``requests`` edits from ``concurrency`` workers -> ok, errors, latencies."""
    instructions = list(example_instructions().values())
    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_index, start = 0, time.perf_counter()

    async def worker():
        nonlocal next_index
        while next_index < requests and time.perf_counter() - start < duration_s:
            i = next_index
            next_index += 1
            files = {"image": (f"load{i}.png", images[0 if repeat else i], "image/png")}
            t = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/edit", files=files, data={"instruction": instructions[i % len(instructions)]})
                kind = None if r.status_code == 200 else str(r.status_code)
            except Exception as e:  # httpx errors: a refused or dropped connection
                kind = type(e).__name__
            if kind is None:
                latencies.append(time.perf_counter() - t)
            else:
                errors[kind] = errors.get(kind, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"sent": next_index, "ok": len(latencies), "errors": sum(errors.values()), "error_kinds": errors,
            "seconds": elapsed, "throughput_rps": len(latencies) / elapsed if elapsed else 0.0,
            "latency_ms": {"p50": 1000 * q[49], "p95": 1000 * q[94], "p99": 1000 * q[98]} if latencies else {}}


async def _attack_images(client, url: str, kind: str, stop: asyncio.Event, outcomes: dict) -> None:
    """Send one kind of bad image again and again until ``stop`` (each one new: no cache hits); count
    the status codes."""
    while not stop.is_set():
        i = next(_SENT)
        image = _flat(20_000, 400, i) if kind == "wide" else _flat(4000, 3000, i)
        try:
            r = await client.post(f"{url}/v1/edit", files={"image": ("a.png", image, "image/png")},
                                  data={"instruction": "make it brighter"})
            code = str(r.status_code)
        except Exception as e:
            code = type(e).__name__
        outcomes[kind][code] = outcomes[kind].get(code, 0) + 1
        await asyncio.sleep(0.2)


async def _slow_connections(url: str, n: int, stop: asyncio.Event, outcomes: dict) -> None:
    """Hold ``n`` connections that send a header byte a second; count those the server closes."""
    parsed = urlparse(url)

    async def one():
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port or 80)
                writer.write(f"POST /v1/edit HTTP/1.1\r\nHost: {parsed.hostname}\r\n".encode())
                while not stop.is_set() and not reader.at_eof():
                    writer.write(b"X: y\r\n")
                    await writer.drain()
                    try:
                        await asyncio.wait_for(reader.read(1024), 1.0)
                    except asyncio.TimeoutError:
                        pass
                outcomes["slow"]["closed_by_server"] += 0 if stop.is_set() else 1
                writer.close()
            except OSError:
                outcomes["slow"]["refused"] += 1
                await asyncio.sleep(1.0)

    await asyncio.gather(*(one() for _ in range(n)))


async def _phase(client, url, images, args, attack: bool) -> dict:
    monitor = _Monitor(client, url)
    before = await monitor.read()
    monitor.start()
    stop = asyncio.Event()
    outcomes = {"wide": {}, "big": {}, "slow": {"closed_by_server": 0, "refused": 0}}
    attackers = []
    if attack:
        attackers = [asyncio.create_task(_attack_images(client, url, kind, stop, outcomes))
                     for kind in ("wide", "big") for _ in range(args["attackers"])]
        attackers.append(asyncio.create_task(_slow_connections(url, args["slow"], stop, outcomes)))
    result = await _normal(client, url, images, args["concurrency"], args["requests"], args["duration_s"],
                           args["repeat"])
    stop.set()
    await asyncio.gather(*attackers, return_exceptions=True)
    result.update(await monitor.stop())
    after = await monitor.read()
    batches = after.get("funcmem_batch_size_count", 0) - before.get("funcmem_batch_size_count", 0)
    total = after.get("funcmem_batch_size_sum", 0) - before.get("funcmem_batch_size_sum", 0)
    result.update(mean_batch_size=total / batches if batches else 0.0, batches=batches)
    if attack:
        result["attack"] = outcomes
    return result


async def _run(url: str, args: dict) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args['api_key']}"} if args["api_key"] else {}
    limits = httpx.Limits(max_connections=args["concurrency"] + 2 * args["attackers"] + 4)
    async with httpx.AsyncClient(timeout=args["timeout_s"], headers=headers, limits=limits) as client:
        warm = _images(min(args["concurrency"], 8), args["size"], False, seed=1)
        await _normal(client, url, warm, args["concurrency"], len(warm), args["duration_s"], False)
        phases = {}
        for seed, name in enumerate(["normal", "attack", "after"] if args["attack"] else ["normal"], start=2):
            images = _images(args["requests"], args["size"], args["repeat"], seed)  # no cache hits across phases
            phases[name] = await _phase(client, url, images, args, attack=name == "attack")
    first = phases["normal"]
    return {"url": url, "concurrency": args["concurrency"], "image_size": list(args["size"]), "repeat": args["repeat"],
            **{k: first[k] for k in first if k != "attack"}, "phases": phases}


def run_loadtest(url: str, concurrency: int = 32, requests: int = 500, duration_s: float = 300.0,
                 size: tuple[int, int] = (64, 64), repeat: bool = False, timeout_s: float = 60.0,
                 api_key: str | None = None, attack: bool = False, slow: int = 64, attackers: int = 2) -> dict:
    """Run the load test (see the module doc) and return its figures (the normal phase's at the
    top level; every phase under ``"phases"``)."""
    url = check_loopback(url)
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"requests must lie in [1, {MAX_REQUESTS}], got {requests}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must lie in [1, {MAX_CONCURRENCY}], got {concurrency}")
    if not 0 <= slow <= MAX_SLOW or not 0 <= attackers <= MAX_ATTACKERS:
        raise ValueError(f"slow connections must lie in [0, {MAX_SLOW}] and attackers in [0, {MAX_ATTACKERS}], "
                         f"got {slow} and {attackers}")
    args = dict(concurrency=concurrency, requests=requests, duration_s=duration_s, size=size, repeat=repeat,
                timeout_s=timeout_s, api_key=api_key, attack=attack, slow=slow, attackers=attackers)
    return asyncio.run(_run(url, args))


def format_report(r: dict) -> str:
    """The figures as a table, one column a phase, and the attack phase's ratios to the normal ones."""
    phases = r["phases"]
    rows = [("ok / sent", lambda p: f"{p['ok']}/{p['sent']}"), ("throughput req/s", lambda p: f"{p['throughput_rps']:.2f}"),
            ("latency p50 ms", lambda p: f"{p['latency_ms'].get('p50', float('nan')):.0f}"),
            ("latency p95 ms", lambda p: f"{p['latency_ms'].get('p95', float('nan')):.0f}"),
            ("errors", lambda p: f"{p['errors']} {p['error_kinds'] or ''}".rstrip()),
            ("mean batch size", lambda p: f"{p['mean_batch_size']:.2f}"),
            ("server RSS peak MiB", lambda p: f"{p['rss_peak_mb']:.0f}"),
            ("server RSS end MiB", lambda p: f"{p['rss_end_mb']:.0f}")]
    lines = [f"{r['concurrency']} concurrent normal requests of {r['image_size'][0]}x{r['image_size'][1]}",
             f"{'':22}" + "".join(f"{name:>24}" for name in phases)]
    lines += [f"{label:22}" + "".join(f"{fn(p):>24}" for p in phases.values()) for label, fn in rows]
    if "attack" in phases:
        a = phases["attack"]
        alone = (phases["normal"]["throughput_rps"] + phases["after"]["throughput_rps"]) / 2
        ratio = a["throughput_rps"] / alone if alone else float("nan")
        extra = a["rss_peak_mb"] - max(phases["normal"]["rss_peak_mb"], phases["after"]["rss_peak_mb"])
        lines.append(f"attack / alone (mean of before and after): throughput x{ratio:.2f}, RSS peak {extra:+.0f} MiB")
        lines.append(f"attackers got: wide {a['attack']['wide']}, big {a['attack']['big']}, slow connections "
                     f"{a['attack']['slow']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``funcmem loadtest``'s options."""
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="loopback only")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=500, help="normal requests a phase")
    parser.add_argument("--duration", type=float, default=300.0, help="no new request after this many seconds")
    parser.add_argument("--size", type=int, default=64, help="side of the square test image")
    parser.add_argument("--repeat", action="store_true", help="send the same image every time (LoRA cache hits)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--attack", action="store_true", help="run the traffic again beside wide images, big "
                        "images and slow connections")
    parser.add_argument("--slow", type=int, default=64, help="slow connections held during the attack phase")
    parser.add_argument("--attackers", type=int, default=2, help="senders of each kind of bad image")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")


def run_cli(args: argparse.Namespace) -> int:
    import httpx

    try:
        result = run_loadtest(args.url, args.concurrency, args.requests, args.duration, (args.size, args.size),
                              args.repeat, args.timeout, os.environ.get("FUNCMEM_API_KEY"), args.attack, args.slow,
                              args.attackers)
    except httpx.ConnectError as e:
        raise UsageError(f"cannot connect to {args.url} ({e}); start `funcmem serve` first") from None
    print(format_report(result))
    if args.json:
        write_json(args.json, result)
    return 0 if result["errors"] == 0 else 1
