"""Cross-request batching: requests that arrive within a few milliseconds are computed together.

    batcher = Batcher(process, max_batch=16, max_wait_s=0.005, max_queue=64)
    result = await batcher.submit(item)   # from any asyncio event loop; QueueFull when full

One worker thread takes the oldest waiting item, then keeps gathering for up to ``max_wait_s``
(or until ``max_batch`` items) and calls ``process(items)`` once for all of them. Items have a
``weight`` (the service: a request's tiles) and a batch weighs at most ``max_weight``: an item
that does not fit is set aside and later, lighter ones fill the room (backfilling); set-aside
items go first in the next batch, oldest first, so none waits behind more than the batches that
were already gathered when it arrived. Large requests cannot make a small one wait for all of
them at once. The queue is
bounded: ``submit`` raises ``QueueFull`` at once instead of letting it grow without end (the
service answers 503). An item whose caller stopped waiting (a timeout) before its batch started
is dropped, not computed.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

QueueFull = queue.Full


@dataclass(eq=False)
class _Entry:
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def _deliver(entry: _Entry, result: Any = None, error: BaseException | None = None) -> None:
    try:
        entry.loop.call_soon_threadsafe(_settle, entry.future, result, error)
    except RuntimeError:  # its event loop is closed: nobody is waiting any more
        pass


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # cancelled by a timeout meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Batcher:
    """Gathers submitted items into batches for ``process`` on one worker thread.

    Args:
        process: ``process(items) -> results`` (same order and length); an exception fails every
            item of the batch with it.
        max_batch: most items per call (1: no batching, one request at a time).
        max_wait_s: how long the first item of a batch waits for company.
        max_queue: most items waiting; ``submit`` raises ``QueueFull`` beyond.
        on_batch: optional ``on_batch(items, results)`` after each call (metrics).
        weight: ``weight(item)``, what an item costs (default 1 each).
        max_weight: the most a batch may weigh (an item heavier on its own is batched alone).
    """

    def __init__(self, process: Callable[[list], list], max_batch: int = 16, max_wait_s: float = 0.005,
                 max_queue: int = 64, on_batch: Callable[[list, list], None] | None = None,
                 weight: Callable[[Any], float] = lambda item: 1, max_weight: float = float("inf")):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, max_wait_s >= 0; got {max_batch}, "
                             f"{max_queue}, {max_wait_s}")
        self.process, self.on_batch = process, on_batch
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.weight, self.max_weight = weight, max_weight
        self._held: list[_Entry] = []  # set aside (did not fit), oldest first: the next batch's first
        self._queue: queue.Queue[_Entry | None] = queue.Queue(max_queue)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="funcmem-batcher", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def qsize(self) -> int:
        return self._queue.qsize() + len(self._held)

    def submit(self, item: Any) -> asyncio.Future:
        """Queue ``item``; await the returned future for its result. Raises ``QueueFull``."""
        self.start()
        loop = asyncio.get_running_loop()
        entry = _Entry(item, loop.create_future(), loop)
        self._queue.put_nowait(entry)
        return entry.future

    def _gather(self, first: _Entry) -> list[_Entry]:
        batch, total, skipped = [first], self.weight(first.item), []

        def offer(entry: _Entry) -> None:
            nonlocal total
            if total + self.weight(entry.item) > self.max_weight:
                skipped.append(entry)
            else:
                batch.append(entry)
                total += self.weight(entry.item)

        while self._held and len(batch) < self.max_batch:
            offer(self._held.pop(0))
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch and total < self.max_weight:
            left = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is None:  # stop: finish this batch first
                self._queue.put(None)
                break
            offer(entry)
        self._held[:0] = skipped
        return batch

    def _work(self) -> None:
        while True:
            first = self._held.pop(0) if self._held else self._queue.get()
            if first is None:
                return
            batch = [e for e in self._gather(first) if not e.future.done()]
            if not batch:
                continue
            items = [e.item for e in batch]
            try:
                results = self.process(items)
                if len(results) != len(items):
                    raise RuntimeError(f"process returned {len(results)} results for {len(items)} items")
            except BaseException as error:  # every waiting caller hears of it
                for e in batch:
                    _deliver(e, None, error)
                continue
            if self.on_batch is not None:
                self.on_batch(items, results)
            for e, r in zip(batch, results):
                _deliver(e, r)
