"""A bounded LRU cache of generated LoRAs, keyed by ``EditEngine.cache_key`` (a hash of the image
bytes, the instruction and the model), so a repeated request (the page sent again with another
strength, say) skips the encoders and the generator.

Bounded in bytes, not entries: one entry holds a LoRA per tile, so entries differ in size by the
tile limit (a one-tile request is ~1/64 of a 64-tile one)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..lora import LoRA


def lora_bytes(lora: LoRA) -> int:
    """Bytes held by a LoRA's factors."""
    return sum(a.nbytes + b.nbytes for a, b in lora.factors.values())


class LoRACache:
    """LoRAs up to ``max_bytes`` in all; the least recently used go first. Thread-safe.

    Args:
        max_bytes: capacity (0 turns the cache off). An entry larger than it is not kept.
    """

    def __init__(self, max_bytes: int = 128 * 2**20):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[LoRA, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> LoRA | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, lora: LoRA) -> None:
        size = lora_bytes(lora)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += size - (old[1] if old else 0)
            self._items[key] = (lora, size)
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)
