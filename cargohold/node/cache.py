"""A byte-bounded LRU for small immutable content (manifests) keyed by digest."""

from __future__ import annotations

from collections import OrderedDict


class ContentCache:
    def __init__(self, max_bytes: int = 64 * 1024 * 1024, max_item: int = 4 * 1024 * 1024):
        self.max_bytes = max_bytes
        self.max_item = max_item
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_item or key in self._items:
            return
        self._items[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted)
