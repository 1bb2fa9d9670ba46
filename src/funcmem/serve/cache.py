"""A bounded LRU cache of generated LoRAs, keyed by ``EditEngine.cache_key`` (a hash of the image
bytes, the instruction and the model), so a repeated request skips the encoders and the generator."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..lora import LoRA


class LoRACache:
    """At most ``max_entries`` LoRAs; the least recently used is dropped first. Thread-safe.

    Args:
        max_entries: capacity (0 turns the cache off). One entry of the demo's run holds
            (tiles x ~10k) float32 numbers: ~40 kB per tile.
    """

    def __init__(self, max_entries: int = 256):
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._items: OrderedDict[str, LoRA] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> LoRA | None:
        with self._lock:
            lora = self._items.get(key)
            if lora is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return lora

    def put(self, key: str, lora: LoRA) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._items[key] = lora
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
