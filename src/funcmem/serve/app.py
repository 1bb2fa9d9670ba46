"""The HTTP service on a trained run (FastAPI).

    POST /v1/edit      multipart image + instruction (+ seed, strength) -> the edited image, PNG
    POST /v1/lora      same inputs -> the generated LoRA, a zip of PEFT adapters (``lora_export``)
    GET  /v1/manifold  the reference points of the parameter-manifold picture (JSON)
    GET  /healthz      {"status": "ok", ...}
    GET  /metrics      Prometheus text (``metrics``)
    GET  /             the web page (static/index.html)

Requests go through one ``Batcher`` (cross-request batching) into ``EditEngine.run``; generated
LoRAs are kept in a ``LoRACache``. Every refusal is JSON ``{"error", "code"[, "field"]}``:

    400  the image cannot be decoded; a malformed form
    415  the body is not a form (multipart/form-data)
    413  the upload or the image (pixels) is too large
    422  a field is missing or invalid (empty / too long instruction, bad seed or strength)
    503  the queue is full (try again)
    504  the request was not answered within the timeout
"""

from __future__ import annotations

import asyncio
import io
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile

from ..editing.images import ImageError, decode_rgb
from ..editing.text import clean_instruction
from .batching import Batcher, QueueFull
from .cache import LoRACache
from .engine import EditEngine, Job
from .limits import ApiError, BodyLimit, BodyTooLarge, ServeConfig
from .lora_export import lora_archive
from .manifold import Manifold, fit_manifold
from .metrics import Metrics

STATIC = Path(__file__).parent / "static"
MAX_SEED = 2**63 - 1


class Service:
    """The engine, its batcher, cache, metrics and manifold: everything the routes use.

    Args:
        engine: a loaded ``EditEngine``.
        config: batching and limits.
        manifold: the manifold basis (default: fitted now, ``manifold.fit_manifold``).
    """

    def __init__(self, engine: EditEngine, config: ServeConfig | None = None, manifold: Manifold | None = None):
        self.engine, self.config = engine, config or ServeConfig()
        self.cache = LoRACache(self.config.cache_size)
        self.metrics = Metrics()
        self.manifold = manifold if manifold is not None else fit_manifold(engine, self.config.manifold_crops)
        self.batcher = Batcher(self._process, self.config.max_batch, self.config.max_wait_ms / 1000,
                               self.config.max_queue, self._observe)

    @classmethod
    def from_run(cls, run, config: ServeConfig | None = None) -> "Service":
        config = config or ServeConfig()
        return cls(EditEngine(run, chunk=config.chunk), config)

    def _process(self, jobs: list[Job]) -> list[Job]:
        self.engine.run(jobs, self.cache if self.config.cache_size else None)
        return jobs

    def _observe(self, jobs: list[Job], _) -> None:
        self.metrics.batch(len(jobs), sum(len(j.tiles) for j in jobs), sum(j.cache_hit for j in jobs))

    # ---- parsing a request

    async def parse(self, request: Request, want_output: bool) -> Job:
        """The form's fields checked, the image decoded and tiled -> a ``Job`` (or ``ApiError``)."""
        if not request.headers.get("content-type", "").startswith(("multipart/form-data",
                                                                    "application/x-www-form-urlencoded")):
            raise ApiError(415, "send the request as multipart/form-data with an 'image' file and an 'instruction'")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except BodyTooLarge:
            raise
        except Exception as e:  # starlette's MultiPartException / HTTPException: a malformed form
            raise ApiError(400, f"malformed multipart form: {getattr(e, 'detail', None) or e}") from None
        try:
            return await self._parse_form(form, want_output)
        finally:
            await form.close()

    async def _parse_form(self, form, want_output: bool) -> Job:
        cfg = self.config
        upload = form.get("image")
        if upload is None:
            raise ApiError(422, "the 'image' file field is missing", "image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "'image' must be a file upload, not a text field", "image")
        data = await upload.read()
        if len(data) > cfg.max_upload_bytes:
            raise ApiError(413, f"the image file is {len(data):,} bytes; the limit is {cfg.max_upload_bytes:,}", "image")
        instruction = form.get("instruction")
        if instruction is None:
            raise ApiError(422, "the 'instruction' field is missing", "instruction")
        if not isinstance(instruction, str):
            raise ApiError(422, "'instruction' must be a text field", "instruction")
        if len(instruction) > 4 * cfg.max_instruction_chars:  # before cleaning: don't normalise megabytes
            raise ApiError(422, f"the instruction is {len(instruction)} characters long; the limit is "
                                f"{cfg.max_instruction_chars}", "instruction")
        try:
            instruction = clean_instruction(instruction, cfg.max_instruction_chars)
        except ValueError as e:
            raise ApiError(422, str(e), "instruction") from None
        strength = _number(form.get("strength"), "strength", float, 1.0, 0.0, cfg.max_strength)
        seed = _number(form.get("seed"), "seed", int, 0, 0, MAX_SEED)
        image = await asyncio.to_thread(self._decode, data, upload.filename or "upload")
        key = self.engine.cache_key(data, instruction)
        job = await asyncio.to_thread(self.engine.prepare, image, instruction, strength, key, want_output)
        job.extra["seed"] = seed
        return job

    def _decode(self, data: bytes, name: str) -> torch.Tensor:
        limit = self.config.max_pixels
        try:  # the header alone: an image over the limit is refused before any pixel is decoded
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Image.DecompressionBombError as e:  # PIL's own guard, far above our limit
            raise ApiError(413, f"the image is refused as a decompression bomb ({e}); the limit is {limit:,} pixels",
                           "image") from None
        except Exception:
            w = h = 0  # not readable: decode_rgb says why
        if w * h > limit:
            raise ApiError(413, f"the image is {w}x{h} = {w * h:,} pixels; the limit is {limit:,}", "image")
        try:
            return decode_rgb(data, name, max_pixels=limit)
        except ImageError as e:
            raise ApiError(400, str(e), "image") from None

    async def compute(self, job: Job) -> Job:
        try:
            future = self.batcher.submit(job)
        except QueueFull:
            raise ApiError(503, f"the server is busy ({self.config.max_queue} requests waiting); retry shortly") from None
        self.metrics.queue_depth = self.batcher.qsize()
        try:
            return await asyncio.wait_for(future, self.config.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request was not answered within {self.config.timeout_s:g} s") from None


def _number(raw, name: str, kind, default, low, high):
    """An optional numeric form field, parsed and range-checked (422 otherwise)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ApiError(422, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {str(raw)[:40]!r}",
                       name) from None
    if not (low <= value <= high):  # also refuses NaN
        raise ApiError(422, f"'{name}' must lie in [{low:g}, {high:g}], got {value:g}", name)
    return value


def _png(image: torch.Tensor) -> bytes:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def create_app(service: Service) -> FastAPI:
    """The FastAPI app around a ``Service``."""

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        service.batcher.stop()

    app = FastAPI(title="funcmem", description="Image edits with per-request generated LoRA", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.config.max_upload_bytes + 64 * 1024)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        service.metrics.request(request.url.path if request.url.path in _ROUTES else "other",
                                response.status_code, time.perf_counter() - start)
        return response

    _add_edit_routes(app, service)
    _add_info_routes(app, service)
    return app


def _add_edit_routes(app: FastAPI, service: Service) -> None:
    """``POST /v1/edit`` (a PNG) and ``POST /v1/lora`` (a zip of PEFT adapters)."""

    @app.post("/v1/edit")
    async def edit(request: Request):
        job = await service.compute(await service.parse(request, want_output=True))
        png = await asyncio.to_thread(_png, job.output)
        x, y = service.manifold.project(job.lora)
        return Response(png, media_type="image/png", headers={
            "X-Manifold-Point": f"{x:.5f},{y:.5f}", "X-Cache": "hit" if job.cache_hit else "miss",
            "X-Batch-Size": str(job.batch_size), "X-Tiles": str(len(job.tiles)), "X-Seed": str(job.extra["seed"])})

    @app.post("/v1/lora")
    async def lora(request: Request):
        job = await service.compute(await service.parse(request, want_output=False))
        gh, gw = job.grid[:2]
        data = await asyncio.to_thread(lora_archive, service.engine.memory.fm, job.lora, (gh, gw),
                                       service.engine.size, job.instruction)
        return Response(data, media_type="application/zip", headers={
            "Content-Disposition": 'attachment; filename="funcmem-lora.zip"',
            "X-Cache": "hit" if job.cache_hit else "miss", "X-Tiles": str(len(job.tiles))})


def _add_info_routes(app: FastAPI, service: Service) -> None:
    """The manifold, health, Prometheus metrics and the web page."""

    @app.get("/v1/manifold")
    async def manifold():
        return service.manifold.to_json()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "run": str(service.engine.run_dir), "model": service.engine.model_id,
                "queue": service.batcher.qsize(), "cache_entries": len(service.cache),
                "max_batch": service.config.max_batch}

    @app.get("/metrics")
    async def metrics():
        service.metrics.queue_depth = service.batcher.qsize()
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")


_ROUTES = {"/v1/edit", "/v1/lora", "/v1/manifold", "/healthz", "/metrics", "/"}
