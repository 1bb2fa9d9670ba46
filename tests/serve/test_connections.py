"""Connections against a real server: slow or silent connections are closed by the read deadline,
at most ``max_connections`` stay open (the one owing its request longest goes first), and the
server keeps answering meanwhile; logs stay bounded under a flood of bad requests."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest

from funcmem.serve.app import Service
from funcmem.serve.limits import ServeConfig
from funcmem.serve.logs import RateLimit

from .conftest import LIMITS, serve_in_thread


@pytest.fixture(scope="module")
def strict_server(service):
    """A server with a 1.5 s read deadline and room for 16 connections -> its port."""
    other = Service(service.engine, ServeConfig(**{**LIMITS, "read_timeout_s": 1.5, "max_connections": 16}),
                    service.manifold)
    url, stop = serve_in_thread(other)
    yield int(url.rsplit(":", 1)[1])
    stop()
    other.batcher.stop()


def connect(port: int, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if first:
        s.sendall(first)
    return s


def closed_by_server(s: socket.socket, wait: float = 0.0) -> bool:
    s.settimeout(wait)
    try:
        return s.recv(1024) == b""
    except (socket.timeout, BlockingIOError):
        return False
    except OSError:
        return True


def test_a_connection_dribbling_headers_is_closed_at_the_read_deadline(strict_server):
    port = strict_server
    s = connect(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    start = time.monotonic()
    while time.monotonic() - start < 6 and not closed_by_server(s, 0.25):
        try:
            s.sendall(b"X-Slow: 1\r\n")  # a byte every quarter second resets no timer
        except OSError:
            break
    held = time.monotonic() - start
    s.close()
    assert 1.0 < held < 3.5, held


def test_a_slow_body_is_closed_at_the_read_deadline_and_a_fast_request_is_answered(strict_server):
    port = strict_server
    s = connect(port, b"POST /v1/edit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n--b\r\n")
    start = time.monotonic()
    while time.monotonic() - start < 6 and not closed_by_server(s, 0.25):
        try:
            s.sendall(b"x")
        except OSError:
            break
    assert time.monotonic() - start < 3.5
    s.close()
    r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert r.status_code == 200 and "server" not in r.headers  # and uvicorn does not announce itself


def test_many_silent_connections_cannot_lock_others_out(strict_server):
    port = strict_server
    silent = [connect(port) for _ in range(60)]  # four times the cap, sending nothing
    time.sleep(0.3)
    open_now = sum(not closed_by_server(s) for s in silent)
    assert open_now <= 16  # the oldest were closed to make room
    latencies = []
    for _ in range(5):
        t = time.monotonic()
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        latencies.append(time.monotonic() - t)
    assert max(latencies) < 2
    time.sleep(2.0)  # past the read deadline: every silent one is gone
    assert all(closed_by_server(s, 0.1) for s in silent)
    for s in silent:
        s.close()


def test_a_keep_alive_client_keeps_its_connection_between_requests(strict_server):
    port = strict_server
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        for _ in range(3):
            r = client.get("/healthz")
            assert r.status_code == 200
            time.sleep(0.5)  # idle, under the read deadline and keep-alive


def test_rate_limited_logs_pass_a_burst_then_count_the_rest():
    limit = RateLimit(burst=3, period=0.5)
    logger = logging.getLogger("funcmem.test.flood")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    logger.addFilter(limit)
    logger.propagate = False
    try:
        for i in range(1000):
            logger.warning("Invalid HTTP request received. %d", i)
        logger.warning("another kind")
        time.sleep(0.6)
        logger.warning("Invalid HTTP request received. %d", 1000)
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(limit)
    assert records[:3] == [f"Invalid HTTP request received. {i}" for i in range(3)]
    assert records[3] == "another kind"
    assert records[4] == "Invalid HTTP request received. 1000 [997 more like this were not logged]"
    assert len(records) == 5


def test_the_server_limits_uvicorn_logs(strict_server):
    names = {f.__class__.__name__ for name in ("uvicorn.error", "uvicorn.access") for f in logging.getLogger(name).filters}
    assert names == {"RateLimit"}


def test_headers_beyond_the_buffer_limit_are_refused(strict_server):
    """h11 buffers at most 16 KiB of an incomplete request head: a client cannot park more there."""
    port = strict_server
    s = connect(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000)
    s.settimeout(5)
    answer = s.recv(1024)
    s.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer
