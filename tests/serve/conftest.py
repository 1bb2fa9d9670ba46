"""Session fixtures for the service tests: one tiny run, one loaded ``Service``, its app, and a
live uvicorn server on a free loopback port (for the browser and load tests)."""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")

from funcmem.serve.app import Service, create_app  # noqa: E402
from funcmem.serve.limits import ServeConfig  # noqa: E402

from editing.tiny_run import make_tiny_run  # noqa: E402

LIMITS = dict(max_upload_bytes=200_000, max_pixels=1_000_000, max_instruction_chars=100, chunk=4,
              max_batch=16, max_wait_ms=20.0, manifold_crops=1, max_tiles=16,
              allowed_hosts=("testserver", "test"))  # the Host of TestClient and of httpx's ASGI transport


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A smooth random RGB image as PNG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("serve-run"))


@pytest.fixture(scope="session")
def service(tiny_run_dir):
    s = Service.from_run(tiny_run_dir, ServeConfig(**LIMITS))
    yield s
    s.batcher.stop()


@pytest.fixture(scope="session")
def app(service):
    return create_app(service)


@pytest.fixture(scope="session")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


def serve_in_thread(service):
    """Start the CLI's uvicorn server (its connection limits too) for ``service`` on a free loopback
    port, in a thread -> (url, stop)."""
    from funcmem.serve.cli import make_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = make_server(service, "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="session")
def live_server(service):
    """http://127.0.0.1:PORT of a uvicorn server (in a thread) on the session's service."""
    url, stop = serve_in_thread(service)
    yield url
    stop()
