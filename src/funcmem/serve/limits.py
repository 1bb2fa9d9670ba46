"""The service's settings and limits, the errors it answers with, and the upload size guard.

Every refusal is an ``ApiError``: a status code and one clear message, sent as JSON
``{"error": message, "code": status}`` (plus ``"field"`` when one form field is at fault).
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class ServeConfig:
    """What ``funcmem serve`` can be told.

    Args:
        max_batch: most requests computed together (1 turns batching off).
        max_wait_ms: how long a request waits for others to join its batch.
        max_queue: most requests waiting; beyond, 503.
        chunk: tiles per model call (see ``engine``).
        cache_size: LoRAs kept in the LRU cache (0: no cache).
        max_upload_bytes: largest image upload; beyond, 413.
        max_pixels: largest image (width x height), checked before decoding; beyond, 413.
        max_instruction_chars: longest instruction; beyond, 422.
        timeout_s: a request not answered by then gets 504.
        max_strength: ``strength`` must lie in [0, max_strength].
        manifold_crops: crops of the bundled photo per example instruction for the start-up PCA.
    """

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 64
    chunk: int = 16
    cache_size: int = 256
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 16_000_000
    max_instruction_chars: int = 200
    timeout_s: float = 30.0
    max_strength: float = 2.0
    manifold_crops: int = 4


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
