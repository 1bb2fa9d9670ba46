"""Work and memory bounded by the input: the tile limit (a coarser scale or a 413 naming it),
admission before decoding (503 without decoding), the image-bytes budget, compact queued images,
a timed-out request's work dropped between chunks, fuzzed formats as JSON 400, /v1/lora bounded."""

from __future__ import annotations

import io
import struct
import threading
import time
import zipfile

import pytest
import torch
from PIL import Image

from funcmem.serve import app as app_module
from funcmem.serve.app import IMAGE_BYTES_PER_PIXEL
from funcmem.serve.engine import Job
from funcmem.serve.lora_export import lora_archive

from .conftest import LIMITS, png_bytes
from .test_api import assert_error, post


def flat_png(width: int, height: int) -> bytes:
    """A one-colour PNG: many pixels, a few hundred bytes (the attack's shape: 47 KB for 40000x400)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 90, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if anything is decoded."""
    monkeypatch.setattr(app_module, "decode_rgb8", lambda *a, **k: pytest.fail("the upload was decoded"))


def test_an_elongated_image_is_refused_before_decoding_with_the_tile_limit(client, no_decoding):
    r = post(client, image=flat_png(2000, 20))  # side ratio 100: 199 half-overlapping tiles with its short side at 32 px
    assert_error(r, 413, f"it needs 199 tiles of 32 px every 16 px even at the smallest scale; the limit is "
                         f"{LIMITS['max_tiles']} tiles", "image")


def test_a_large_image_is_edited_at_a_coarser_scale_within_the_limit(client):
    r = post(client, image=png_bytes(400, 130, seed=30))  # 7 x 24 tiles at the usual scale (128 x 394 px)
    assert r.status_code == 200, r.text
    assert int(r.headers["X-Tiles"]) <= LIMITS["max_tiles"]
    assert Image.open(io.BytesIO(r.content)).size == (400, 130)


def test_a_full_server_answers_503_before_reading_or_decoding(client, service, no_decoding, monkeypatch):
    monkeypatch.setattr(service.admission, "requests", service.admission.max_requests)
    assert_error(post(client, image=png_bytes(32, 32)), 503, "server is busy")
    monkeypatch.setattr(service.admission, "requests", 0)
    monkeypatch.setattr(service.admission, "max_image_bytes", IMAGE_BYTES_PER_PIXEL * 32 * 32 - 1)  # one 32x32 image does not fit
    assert_error(post(client, image=png_bytes(32, 32)), 503, "busy with large images")
    assert service.admission.requests == 0 and service.admission.image_bytes == 0  # places given back


def test_admission_counts_requests_and_image_bytes_until_the_response(client, service, monkeypatch):
    seen = []
    real = service._process

    def watch(jobs):
        seen.append((service.admission.requests, service.admission.image_bytes, [j.image.dtype for j in jobs]))
        return real(jobs)

    monkeypatch.setattr(service.batcher, "process", watch)
    assert post(client, image=png_bytes(70, 45, seed=31)).status_code == 200
    # while computing: one request, its image's bytes reserved, the image itself uint8
    assert seen == [(1, IMAGE_BYTES_PER_PIXEL * 70 * 45, [torch.uint8])]
    assert service.admission.requests == 0 and service.admission.image_bytes == 0


@pytest.mark.parametrize("name, data, words", [
    ("dds", b"DDS " + struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + b"\0" * 44 + struct.pack("<2I", 32, 4)
     + b"XYZW" + b"\0" * 300, "not an image in an accepted format"),
    ("spider", struct.pack(">27f", 1, 8, 0, 0, 1, 0, 0, 0, 0, 0, 0, 8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 32, 32, 0, 0, 0, 1)
     + b"\0" * 512, "not an image in an accepted format"),
    ("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "not an image in an accepted format"),
    ("bmp", b"BM" + b"\0" * 60, "a BMP image, which is not accepted"),
    ("png-in-name-only", b"\x89PNG\r\n\x1a\n" + b"\xff" * 64, "cannot read image"),
])
def test_fuzzed_and_unlisted_formats_are_a_json_400(client, name, data, words):
    r = post(client, image=data)
    assert r.headers["content-type"] == "application/json"
    assert_error(r, 400, words, "image")


def test_a_timed_out_request_stops_its_work_between_chunks(client, service, monkeypatch):
    """The 504 is not all: the engine drops the request's remaining chunks (and never edits)."""
    calls = {"generate": 0, "edit": 0}
    real_generate = service.engine.generate

    def slow_generate(tiles, instructions):
        calls["generate"] += 1
        time.sleep(0.4)
        return real_generate(tiles, instructions)

    monkeypatch.setattr(service.engine, "generate", slow_generate)
    monkeypatch.setattr(service.engine, "edit", lambda *a: calls.__setitem__("edit", calls["edit"] + 1))
    monkeypatch.setattr(service.config, "timeout_s", 0.6)
    r = post(client, image=png_bytes(250, 128, seed=32))  # 15 tiles (3 x 5 at 49 x 96 px): 4 chunks of 4
    assert_error(r, 504, "not answered within 0.6 s")
    deadline = time.monotonic() + 10
    while service.admission.requests or service.batcher.qsize():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # the worker's current chunk ends
    assert 1 <= calls["generate"] < 4 and calls["edit"] == 0


def test_the_engine_plan_drops_an_expired_job_at_the_next_chunk(service):
    engine = service.engine
    a = Job(torch.zeros(1, 1, 3, dtype=torch.uint8), "x", tiles=torch.zeros(6, 3, 32, 32))
    b = Job(torch.zeros(1, 1, 3, dtype=torch.uint8), "y", tiles=torch.zeros(5, 3, 32, 32))
    parts = []
    for part in engine._plan([a, b]):  # chunk = 4
        parts.append([(job.instruction, s, e) for job, s, e in part])
        if len(parts) == 1:
            a.deadline = 0.0  # a's caller gave up after the first chunk
    assert parts == [[("x", 0, 4)], [("y", 0, 4)], [("y", 4, 5)]]


def test_lora_archive_is_built_in_memory_within_the_deadline(service, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "TemporaryDirectory", lambda *a, **k: pytest.fail("a temporary directory"))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: pytest.fail("a temporary directory"))
    engine = service.engine
    tiles = torch.rand(3, 3, engine.size, engine.size)
    lora = engine.generate(tiles, ["blur the image"] * 3)
    data = lora_archive(engine.memory.fm, lora, (1, 3), engine.size, "blur the image")
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert len([n for n in names if n.endswith("adapter_model.safetensors")]) == 3
    with pytest.raises(TimeoutError, match="0 of 3 tiles"):
        lora_archive(engine.memory.fm, lora, (1, 3), engine.size, "x", deadline=time.monotonic() - 1)


def test_lora_endpoint_is_bounded_by_the_tile_limit(client, no_decoding):
    assert_error(post(client, "/v1/lora", image=flat_png(2000, 20)), 413, "the limit is 16 tiles", "image")


def test_concurrent_requests_release_admission_on_every_outcome(client, service):
    """Good, refused and failed requests leave the budgets as they found them."""
    results = []

    def send(image):
        results.append(post(client, image=image).status_code)

    threads = [threading.Thread(target=send, args=(img,)) for img in
               (png_bytes(32, 32, seed=40), b"junk", flat_png(2000, 20), png_bytes(40, 40, seed=41))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert sorted(results) == [200, 200, 400, 413]
    assert service.admission.requests == 0 and service.admission.image_bytes == 0
