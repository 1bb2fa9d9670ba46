"""The HTTP service on a trained run (FastAPI).

    POST /v1/edit      multipart image + instruction (+ seed, strength) -> the edited image, PNG
    POST /v1/lora      same inputs -> the generated LoRA, a zip of PEFT adapters (``lora_export``)
    GET  /v1/manifold  the reference points of the parameter-manifold picture (JSON)
    GET  /healthz      {"status": "ok", ...} (no key needed)
    GET  /metrics      Prometheus text (``metrics``)
    GET  /             the web page (static/index.html; no key needed, it asks for one)

A request goes: ``security.Guard`` (Host, cross-site, API key) -> body size limit -> form read ->
``admission`` (503 when full; before decoding) -> header checks (format, pixels, tiles) ->
decode (uint8, in a small pool) -> ``Batcher`` (cross-request batching) -> ``EditEngine.run``
(chunks; dropped when past its deadline) -> PNG (in the pool). Generated LoRAs are kept in a
``LoRACache`` bounded in bytes. Every refusal is JSON ``{"error", "code"[, "field"]}``:

    400  the image cannot be decoded (any reason, any format); a malformed form; a Host not allowed
    401  an API key is needed (or was wrong)
    403  a cross-site request
    413  the upload, the image (pixels) or its tiles (side ratio) are too large
    415  the body is not a form (multipart/form-data)
    422  a field is missing or invalid (empty / too long instruction, bad seed or strength)
    503  the server holds as many requests or image bytes as it may (try again)
    504  the request was not answered within the timeout (its work is dropped)
"""

from __future__ import annotations

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile

from ..editing.apply import TooManyTiles, tile_grid
from ..editing.images import ImageError, decode_rgb8, probe
from ..editing.text import clean_instruction
from .admission import Admission, Full, Ticket
from .batching import Batcher, QueueFull
from .cache import LoRACache
from .engine import EditEngine, Job
from .limits import ApiError, BodyLimit, BodyTooLarge, ServeConfig
from .lora_export import lora_archive
from .manifold import Manifold, fit_manifold
from .metrics import Metrics
from .security import Guard

STATIC = Path(__file__).parent / "static"
MAX_SEED = 2**63 - 1
PNG_LEVEL = 1  # zlib level of the returned PNG: see docs/serving.md for the measured cost
IMAGE_BYTES_PER_PIXEL = 8  # reserved per pixel: the uint8 input and output (3 + 3), the PNG answer (~2)
LARGE_PIXELS = 1_000_000  # from here an image's pixel work goes to the one large-image thread


class Service:
    """The engine, its batcher, cache, admission, metrics and manifold: everything the routes use.

    Args:
        engine: a loaded ``EditEngine``.
        config: batching and limits.
        manifold: the manifold basis (default: fitted now, ``manifold.fit_manifold``).
    """

    def __init__(self, engine: EditEngine, config: ServeConfig | None = None, manifold: Manifold | None = None):
        self.engine, self.config = engine, config or ServeConfig()
        self.cache = LoRACache(int(self.config.cache_mb * 2**20))
        self.admission = Admission(self.config.max_queue, int(self.config.image_memory_mb * 2**20))
        self.pool = ThreadPoolExecutor(self.config.image_workers, thread_name_prefix="funcmem-image")
        self.large_pool = ThreadPoolExecutor(1, thread_name_prefix="funcmem-large-image")
        self.metrics = Metrics()
        self.manifold = manifold if manifold is not None else fit_manifold(engine, self.config.manifold_crops)
        self.batcher = Batcher(self._process, self.config.max_batch, self.config.max_wait_ms / 1000,
                               self.config.max_queue, self._observe, weight=lambda job: len(job.tiles),
                               max_weight=self.config.max_batch_tiles)

    @classmethod
    def from_run(cls, run, config: ServeConfig | None = None) -> "Service":
        config = config or ServeConfig()
        return cls(EditEngine(run, chunk=config.chunk, max_tiles=config.max_tiles), config)

    def _process(self, jobs: list[Job]) -> list[Job]:
        self.engine.run(jobs, self.cache if self.config.cache_mb else None)
        return jobs

    def _observe(self, jobs: list[Job], _) -> None:
        self.metrics.batch(len(jobs), sum(len(j.tiles) for j in jobs), sum(j.cache_hit for j in jobs))

    async def in_pool(self, pixels: int, fn, *args):
        """``fn(*args)`` off the event loop: decoding, blending, encoding. Images of ``LARGE_PIXELS``
        or more share one thread, so large uploads take at most one core from the model."""
        pool = self.large_pool if pixels >= LARGE_PIXELS else self.pool
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def admit(self) -> Ticket:
        try:
            return self.admission.enter()
        except Full as e:
            raise ApiError(503, str(e)) from None

    # ---- parsing a request

    async def form(self, request: Request):
        """The request's multipart form (415 / 400 / 413 otherwise); 503 at once when full."""
        if not request.headers.get("content-type", "").startswith(("multipart/form-data",
                                                                    "application/x-www-form-urlencoded")):
            raise ApiError(415, "send the request as multipart/form-data with an 'image' file and an 'instruction'")
        if self.admission.full():  # don't even read the body
            raise ApiError(503, f"the server is busy ({self.admission.requests} requests in flight); retry shortly")
        try:
            return await request.form(max_files=1, max_fields=8)
        except BodyTooLarge:
            raise
        except Exception as e:  # starlette's MultiPartException / HTTPException: a malformed form
            raise ApiError(400, f"malformed multipart form: {getattr(e, 'detail', None) or e}") from None

    async def parse(self, form, ticket: Ticket, want_output: bool) -> Job:
        """The form's fields checked, the image admitted, decoded and tiled -> a ``Job`` (or ``ApiError``)."""
        cfg = self.config
        upload = form.get("image")
        if upload is None:
            raise ApiError(422, "the 'image' file field is missing", "image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "'image' must be a file upload, not a text field", "image")
        data = await upload.read()
        if len(data) > cfg.max_upload_bytes:
            raise ApiError(413, f"the image file is {len(data):,} bytes; the limit is {cfg.max_upload_bytes:,}", "image")
        instruction = _instruction(form.get("instruction"), cfg.max_instruction_chars)
        strength = _number(form.get("strength"), "strength", float, 1.0, 0.0, cfg.max_strength)
        seed = _number(form.get("seed"), "seed", int, 0, 0, MAX_SEED)
        name = upload.filename or "upload"
        pixels = self._check_header(data, name)
        try:
            ticket.reserve(IMAGE_BYTES_PER_PIXEL * pixels)
        except Full as e:
            raise ApiError(503, str(e)) from None
        key = self.engine.cache_key(data, instruction)
        job = await self.in_pool(pixels, self._decode_and_prepare, data, name, instruction, strength, key,
                                 want_output, ticket.start + cfg.timeout_s)
        job.extra["seed"] = seed
        return job

    def _check_header(self, data: bytes, name: str) -> int:
        """Format, pixels and tiles from the header alone (nothing decoded) -> the pixel count."""
        try:
            _, w, h = probe(data, name)
        except ImageError as e:
            if isinstance(e.__cause__, Image.DecompressionBombError):  # PIL's own guard, far above our limit
                raise ApiError(413, f"the image is refused as a decompression bomb; the limit is "
                                    f"{self.config.max_pixels:,} pixels", "image") from None
            raise ApiError(400, str(e), "image") from None
        if w * h > self.config.max_pixels:
            raise ApiError(413, f"the image is {w}x{h} = {w * h:,} pixels; the limit is {self.config.max_pixels:,}",
                           "image")
        try:
            tile_grid(h, w, self.engine.size, self.config.max_tiles)
        except TooManyTiles as e:
            raise ApiError(413, str(e), "image") from None
        return w * h

    def _decode_and_prepare(self, data: bytes, name: str, *job_args) -> Job:
        try:
            image = decode_rgb8(data, name, max_pixels=self.config.max_pixels, max_aspect=float("inf"))
        except ImageError as e:
            raise ApiError(400, str(e), "image") from None
        return self.engine.prepare(torch.from_numpy(image), *job_args)

    async def compute(self, job: Job) -> Job:
        try:
            future = self.batcher.submit(job)
        except QueueFull:
            raise ApiError(503, f"the server is busy ({self.config.max_queue} requests waiting); retry shortly") from None
        self.metrics.queue_depth = self.batcher.qsize()
        try:
            return await asyncio.wait_for(future, max(0.0, job.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request was not answered within {self.config.timeout_s:g} s") from None


def _instruction(raw, limit: int) -> str:
    if raw is None:
        raise ApiError(422, "the 'instruction' field is missing", "instruction")
    if not isinstance(raw, str):
        raise ApiError(422, "'instruction' must be a text field", "instruction")
    if len(raw) > 4 * limit:  # before cleaning: don't normalise megabytes
        raise ApiError(422, f"the instruction is {len(raw)} characters long; the limit is {limit}", "instruction")
    try:
        return clean_instruction(raw, limit)
    except ValueError as e:
        raise ApiError(422, str(e), "instruction") from None


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


def _answer(job: Job) -> bytes:
    """A computed job's edited image (``EditEngine.finish``) as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(EditEngine.finish(job).numpy()).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def create_app(service: Service) -> FastAPI:
    """The FastAPI app around a ``Service``."""

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        service.batcher.stop()

    cfg = service.config
    app = FastAPI(title="funcmem", description="Image edits with per-request generated LoRA", lifespan=lifespan,
                  docs_url="/docs" if cfg.docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if cfg.docs else None)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=cfg.max_upload_bytes + 64 * 1024)
    app.add_middleware(Guard, api_key=cfg.api_key, bind_host=cfg.bind_host, allowed_hosts=cfg.allowed_hosts)

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
        form = await service.form(request)
        try:
            with service.admit() as ticket:
                job = await service.compute(await service.parse(form, ticket, want_output=True))
                png = await service.in_pool(job.image.numel() // 3, _answer, job)
        finally:
            await form.close()
        x, y = service.manifold.project(job.lora)
        return Response(png, media_type="image/png", headers={
            "X-Manifold-Point": f"{x:.5f},{y:.5f}", "X-Cache": "hit" if job.cache_hit else "miss",
            "X-Batch-Size": str(job.batch_size), "X-Tiles": str(len(job.tiles)), "X-Seed": str(job.extra["seed"])})

    @app.post("/v1/lora")
    async def lora(request: Request):
        form = await service.form(request)
        try:
            with service.admit() as ticket:
                job = await service.compute(await service.parse(form, ticket, want_output=False))
                data = await service.in_pool(0, lora_archive, service.engine.memory.fm, job.lora, job.grid[:2],
                                             service.engine.size, job.instruction, job.deadline, job.grid.stride)
        except TimeoutError:
            raise ApiError(504, f"the archive was not ready within {service.config.timeout_s:g} s") from None
        finally:
            await form.close()
        return Response(data, media_type="application/zip", headers={
            "Content-Disposition": 'attachment; filename="funcmem-lora.zip"',
            "X-Cache": "hit" if job.cache_hit else "miss", "X-Tiles": str(len(job.tiles))})


def _add_info_routes(app: FastAPI, service: Service) -> None:
    """The manifold, health, Prometheus metrics and the web page."""

    @app.get("/v1/manifold")
    async def manifold():
        return service.manifold.to_json()

    @app.get("/healthz")
    async def healthz():  # no paths, nothing secret: it answers without a key
        return {"status": "ok", "model": service.engine.model_id, "auth": service.config.api_key is not None,
                "in_flight": service.admission.requests, "queue": service.batcher.qsize()}

    @app.get("/metrics")
    async def metrics():
        service.metrics.queue_depth = service.batcher.qsize()
        return PlainTextResponse(service.metrics.render(service.cache, service.admission),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")


_ROUTES = {"/v1/edit", "/v1/lora", "/v1/manifold", "/healthz", "/metrics", "/"}
