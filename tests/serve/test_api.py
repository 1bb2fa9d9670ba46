"""The HTTP API in-process (FastAPI TestClient): the happy paths, and every refusal with its code
and a clear JSON message."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
import time
import zipfile
import zlib

from PIL import Image

from funcmem.serve.batching import Batcher

from .conftest import LIMITS, png_bytes


def post(client, path="/v1/edit", image=None, instruction="make it brighter", **fields):
    files = {} if image is None else {"image": ("photo.png", image, "image/png")}
    data = {k: str(v) for k, v in fields.items()}
    if instruction is not None:
        data["instruction"] = instruction
    return client.post(path, files=files, data=data)


def assert_error(r, code: int, words: str, field: str | None = None):
    assert r.status_code == code, r.text
    body = r.json()
    assert body["code"] == code and words in body["error"], body
    if field:
        assert body["field"] == field


def test_edit_returns_a_png_of_the_input_size_and_a_manifold_point(client):
    r = post(client, image=png_bytes(70, 45), instruction="blur the image")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (70, 45)
    x, y = map(float, r.headers["X-Manifold-Point"].split(","))
    assert all(map(lambda v: v == v and abs(v) < 1e6, (x, y)))
    assert int(r.headers["X-Tiles"]) == 8  # 45x70 at the 32 px scale: 2 x 4 tiles, one every 16 px


def test_a_repeated_request_hits_the_lora_cache_and_gives_the_same_bytes(client):
    image = png_bytes(40, 40, seed=3)
    first = post(client, image=image, instruction="add some blur")
    again = post(client, image=image, instruction="add some blur")
    assert first.headers["X-Cache"] == "miss" and again.headers["X-Cache"] == "hit"
    assert first.content == again.content
    other = post(client, image=image, instruction="darken the photo")  # same image, other instruction
    assert other.headers["X-Cache"] == "miss" and other.content != first.content


def test_strength_zero_is_the_frozen_editor_and_differs_from_the_lora_edit(client):
    image = png_bytes(32, 32, seed=4)
    full = post(client, image=image, strength=1.0)
    none = post(client, image=image, strength=0)
    assert full.status_code == none.status_code == 200
    assert full.content != none.content


def test_lora_endpoint_returns_one_adapter_per_tile(client):
    r = post(client, "/v1/lora", image=png_bytes(70, 45))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["grid"] == [2, 4] and len(manifest["tiles"]) == 8 == int(r.headers["X-Tiles"])  # 45 x 70: every 16 px
    assert manifest["tile_size"] == 32 and manifest["stride"] == 16
    names = set(archive.namelist())
    for tile in manifest["tiles"]:
        files = {n.split("/", 1)[1] for n in names if n.startswith(tile["dir"] + "/")}
        expected = ({"adapter_config.json", "adapter_model.safetensors"} if manifest["format"] == "peft"
                    else {"lora.safetensors", "lora_config.json"})
        assert expected <= files, files


def test_healthz_metrics_manifold_and_page(client):
    assert client.get("/healthz").json()["status"] == "ok"
    post(client, image=png_bytes(32, 32, seed=5))
    text = client.get("/metrics").text
    for series in ("funcmem_requests_total{", "funcmem_request_seconds_bucket{", "funcmem_batch_size_bucket{",
                   "funcmem_lora_cache_hits_total", "funcmem_lora_cache_misses_total", "funcmem_queue_depth"):
        assert series in text, series
    m = client.get("/v1/manifold").json()
    assert len(m["points"]) == len(m["labels"]) > 0 and len(m["examples"]) >= 12
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "/v1/edit" in page.text


# ---- refusals


def test_missing_fields(client):
    assert_error(post(client, image=None), 422, "'image' file field is missing", "image")
    assert_error(post(client, image=png_bytes(32, 32), instruction=None), 422, "'instruction' field is missing",
                 "instruction")
    r = client.post("/v1/edit", data={"instruction": "x", "image": "not a file"})
    assert_error(r, 422, "must be a file upload", "image")


def test_empty_and_too_long_instructions(client):
    assert_error(post(client, image=png_bytes(32, 32), instruction="   \n\t "), 422, "empty", "instruction")
    assert_error(post(client, image=png_bytes(32, 32), instruction=""), 422, "empty", "instruction")
    long = "make it brighter " * 10
    assert_error(post(client, image=png_bytes(32, 32), instruction=long), 422, "the limit is 100", "instruction")


def test_bad_images(client):
    assert_error(post(client, image=b"this is not an image"), 400, "not an image in an accepted format", "image")
    assert_error(post(client, image=png_bytes(64, 64)[:200]), 400, "cannot read image", "image")
    assert_error(post(client, image=b""), 400, "empty", "image")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny compressed row: a decompression bomb's shape."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_too_large_uploads_and_images(client):
    big = b"\x89PNG" + b"\0" * (LIMITS["max_upload_bytes"] + 1000)  # over the file limit, under the body limit
    assert_error(post(client, image=big), 413, "the limit is 200,000", "image")
    huge = b"\0" * (LIMITS["max_upload_bytes"] * 3)  # over the whole-body limit: refused while it arrives
    assert_error(post(client, image=huge), 413, "request body is larger than the limit")

    def streamed():  # no Content-Length (chunked): counted while it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        for _ in range(40):
            yield b"\0" * 20_000

    r = client.post("/v1/edit", content=streamed(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(r, 413, "request body is larger than the limit")
    flat = io.BytesIO()
    Image.new("RGB", (1100, 1000), (200, 120, 40)).save(flat, format="PNG")  # a small file of many pixels
    assert_error(post(client, image=flat.getvalue()), 413, "pixels; the limit is 1,000,000", "image")
    assert_error(post(client, image=_png_header_only(100_000, 100_000)), 413, "decompression bomb", "image")
    assert_error(post(client, image=_png_header_only(5000, 5000)), 413, "25,000,000 pixels; the limit", "image")


def test_bad_numbers_and_not_multipart(client):
    assert_error(post(client, image=png_bytes(32, 32), strength="abc"), 422, "'strength' must be a number", "strength")
    assert_error(post(client, image=png_bytes(32, 32), strength=5), 422, "[0, 2]", "strength")
    assert_error(post(client, image=png_bytes(32, 32), strength="nan"), 422, "'strength' must lie", "strength")
    assert_error(post(client, image=png_bytes(32, 32), seed="1.5"), 422, "'seed' must be an integer", "seed")
    assert_error(client.post("/v1/edit", json={"instruction": "x"}), 415, "multipart/form-data")


class _Blocked:
    """A batcher whose process waits for ``release`` (to fill the queue or outlast the timeout)."""

    def __init__(self, service, max_queue=1):
        self.started, self.release = threading.Event(), threading.Event()
        self.service = service
        self.batcher = Batcher(self._process, max_batch=1, max_wait_s=0, max_queue=max_queue)

    def _process(self, jobs):
        self.started.set()
        self.release.wait(10)
        return self.service._process(jobs)


def test_full_queue_answers_503_and_a_slow_request_504(client, service, monkeypatch):
    blocked = _Blocked(service)
    monkeypatch.setattr(service, "batcher", blocked.batcher)
    monkeypatch.setattr(service.config, "timeout_s", 0.5)
    results = {}

    def send(name, seed):
        results[name] = post(client, image=png_bytes(32, 32, seed=seed), instruction=f"blur {name}")

    threads = [threading.Thread(target=send, args=("first", 10))]  # taken by the worker, blocked there
    threads[0].start()
    assert blocked.started.wait(10)
    threads.append(threading.Thread(target=send, args=("second", 11)))  # waits in the queue (size 1)
    threads[1].start()
    deadline = time.monotonic() + 5
    while blocked.batcher.qsize() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_error(post(client, image=png_bytes(32, 32, seed=12)), 503, "server is busy")
    for t in threads:
        t.join(10)
    blocked.release.set()
    blocked.batcher.stop()
    assert_error(results["first"], 504, "not answered within 0.5 s")
    assert_error(results["second"], 504, "not answered within 0.5 s")


def test_batcher_reports_errors_to_every_waiting_caller():
    def boom(items):
        raise RuntimeError("model exploded")

    batcher = Batcher(boom, max_batch=4, max_wait_s=0.01, max_queue=8)

    async def main():
        futures = [batcher.submit(i) for i in range(3)]
        return await asyncio.gather(*futures, return_exceptions=True)

    try:
        errors = asyncio.run(main())
    finally:
        batcher.stop()
    assert all(isinstance(e, RuntimeError) and "exploded" in str(e) for e in errors)


def test_unknown_route_is_404(client):
    assert client.get("/nope").status_code == 404
