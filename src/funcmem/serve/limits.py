"""The service's settings and limits, the errors it answers with, and the upload size guard.

Every refusal is an ``ApiError``: a status code and one clear message, sent as JSON
``{"error": message, "code": status}`` (plus ``"field"`` when one form field is at fault).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class ServeConfig:
    """What ``funcmem serve`` can be told. The defaults and why: docs/serving.md.

    Args:
        max_batch: most requests computed together (1 turns batching off).
        max_wait_ms: how long a request waits for others to join its batch.
        max_queue: most requests admitted at once (reading, decoding, waiting, computing); beyond,
            503 before the upload is decoded.
        chunk: tiles per model call (see ``engine``).
        cache_mb: size of the LoRA cache in MiB (0: no cache).
        max_upload_bytes: largest image upload; beyond, 413.
        max_pixels: largest image (width x height), checked from its header; beyond, 413.
        max_tiles: most tiles per image (``editing.apply.tile_grid``): a larger image is edited at a
            coarser scale, one too elongated to fit is refused (413).
        max_batch_tiles: most tiles in one batch (a batch stops gathering before passing it).
        image_memory_mb: MiB of decoded images (input, output and PNG answer: 8 bytes a pixel) held by
            admitted requests; a request that would pass it gets 503 before its upload is decoded.
        image_workers: small uploads decoded / answers encoded at once (images of a megapixel or more
            share one more thread).
        max_instruction_chars: longest instruction; beyond, 422.
        timeout_s: a request not answered by then gets 504, and its remaining work is dropped.
        max_strength: ``strength`` must lie in [0, max_strength].
        manifold_crops: crops of the bundled photo per example instruction for the start-up PCA.
        api_key: the key every route but /healthz and the page needs (None: no key).
        bind_host: the address the server listens on (always an allowed Host).
        allowed_hosts: more names clients may send in the Host header (``*``: any).
        docs: serve FastAPI's /docs and /openapi.json.
        read_timeout_s: a connection must send a whole request (headers and body) within this.
        max_connections: open connections at most (the one waiting longest for its request is
            closed to make room).
        keep_alive_s: an idle keep-alive connection is closed after this.
    """

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 64
    chunk: int = 16
    cache_mb: float = 128.0
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 12_500_000
    max_tiles: int = 64
    max_batch_tiles: int = 64
    image_memory_mb: float = 384.0
    image_workers: int = 2
    max_instruction_chars: int = 200
    timeout_s: float = 30.0
    max_strength: float = 2.0
    manifold_crops: int = 4
    api_key: str | None = field(default=None, repr=False)
    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    docs: bool = False
    read_timeout_s: float = 20.0
    max_connections: int = 256
    keep_alive_s: float = 5.0

    def __post_init__(self):
        names = ("max_batch", "max_queue", "chunk", "max_upload_bytes", "max_pixels", "max_tiles", "max_batch_tiles",
                 "image_workers", "max_instruction_chars", "timeout_s", "read_timeout_s", "max_connections",
                 "keep_alive_s")
        positive = {k: getattr(self, k) for k in names}
        bad = {k: v for k, v in positive.items() if not v > 0}
        if bad or self.cache_mb < 0 or self.max_wait_ms < 0:
            raise ValueError(f"these settings must be positive: {bad or {'cache_mb': self.cache_mb}}")
        if self.image_memory_mb * 2**20 < 8 * self.max_pixels:
            raise ValueError(f"image_memory_mb={self.image_memory_mb:g} cannot hold one image of max_pixels="
                             f"{self.max_pixels:,} (8 bytes a pixel: {8 * self.max_pixels / 2**20:.0f} MiB)")
        if self.max_batch_tiles < self.max_tiles:
            raise ValueError(f"max_batch_tiles={self.max_batch_tiles} must hold one image of max_tiles={self.max_tiles}")


class ApiError(Exception):
    """A refused request: HTTP ``status`` and a message for the user."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def body(self) -> dict:
        out = {"error": self.message, "code": self.status}
        if self.field:
            out["field"] = self.field
        return out


class BodyTooLarge(Exception):
    """Raised inside the app when the request body passes the limit (``BodyLimit`` answers 413)."""


class BodyLimit:
    """ASGI middleware: refuse (413) a request body above ``max_bytes`` while it arrives, whether
    or not it declares a Content-Length, so a huge upload is never read whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send) -> None:
        body = json.dumps(ApiError(413, f"the request body is larger than the limit of {self.max_bytes:,} bytes "
                                        "(send a smaller image)").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)
