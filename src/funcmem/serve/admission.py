"""Admission: how many requests the service holds at once, and how many bytes of decoded images.

A request is admitted after its form arrived and before anything is decoded; it holds its place
until its response is encoded. Two budgets, both checked before decoding, both answered with 503
when full (the client retries; the server never queues more than it can hold):

- ``max_requests`` requests in flight (reading the image, waiting for a batch, computing, encoding);
- ``max_image_bytes`` of decoded images: a request reserves bytes for its pixels (the service: 8
  a pixel, for its uint8 input and output and its PNG answer), read from the image header, so
  sixteen 12-megapixel uploads cannot all be decoded at once while small ones still get in.
"""

from __future__ import annotations

import threading
import time


class Full(Exception):
    """The service holds as much as it may; the message says which budget is spent."""


class Ticket:
    """One admitted request (a context manager: leaving it gives its place and bytes back)."""

    def __init__(self, admission: "Admission"):
        self.admission = admission
        self.start = time.monotonic()
        self.image_bytes = 0

    def reserve(self, nbytes: int) -> None:
        """Hold ``nbytes`` of the image budget (``Full`` when they do not fit)."""
        self.admission._reserve(self, nbytes)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.admission._leave(self)


class Admission:
    """The two budgets of the module doc. Thread-safe.

    Args:
        max_requests: requests admitted at once.
        max_image_bytes: bytes of decoded images reserved at once.
    """

    def __init__(self, max_requests: int, max_image_bytes: int):
        self.max_requests, self.max_image_bytes = max_requests, max_image_bytes
        self.requests = 0
        self.image_bytes = 0
        self.refused = 0
        self._lock = threading.Lock()

    def full(self) -> bool:
        """Whether a new request would be refused now (a cheap look before reading its body)."""
        return self.requests >= self.max_requests

    def enter(self) -> Ticket:
        """Admit one request (``Full`` when ``max_requests`` are in flight)."""
        with self._lock:
            if self.requests >= self.max_requests:
                self.refused += 1
                raise Full(f"the server is busy ({self.requests} requests in flight); retry shortly")
            self.requests += 1
        return Ticket(self)

    def _reserve(self, ticket: Ticket, nbytes: int) -> None:
        with self._lock:
            if self.image_bytes + nbytes > self.max_image_bytes:
                self.refused += 1
                raise Full(f"the server is busy with large images ({self.image_bytes / 2**20:.0f} MiB of "
                           f"{self.max_image_bytes / 2**20:.0f} MiB in use, this one needs {nbytes / 2**20:.0f}); "
                           "retry shortly")
            self.image_bytes += nbytes
            ticket.image_bytes += nbytes

    def _leave(self, ticket: Ticket) -> None:
        with self._lock:
            self.requests -= 1
            self.image_bytes -= ticket.image_bytes
            ticket.image_bytes = 0
