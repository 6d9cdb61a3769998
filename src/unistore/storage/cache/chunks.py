"""The decoded-chunk LRU: chunks of compressed arrays, decoded, kept in each process's memory."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from unistore.storage import budget

__all__ = ["ChunkCache", "chunk_cache"]


class ChunkCache:
    """A per-process LRU of decoded chunks, bounded in bytes.

    Arrays that fit in the budget get a *dense* entry: one buffer the size of
    the array (pages are only touched as chunks arrive) plus a mask of which
    chunks are decoded, so a warm gather is a single row gather at memmap
    speed or better.  Larger arrays keep individual chunks.  The budget defaults to
    1 GiB per process (``UNISTORE_CHUNK_CACHE_BYTES``); an entry larger than
    the whole budget is used for one read and not kept.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._sizes: dict[Any, int] = {}
        self._nbytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._data:
                self._nbytes -= self._sizes.pop(key)
                del self._data[key]
            self._data[key] = value
            self._sizes[key] = nbytes
            self._nbytes += nbytes
            while self._nbytes > self.max_bytes:
                old, _ = self._data.popitem(last=False)
                self._nbytes -= self._sizes.pop(old)

    def dense(self, token: str, shape: tuple[int, ...], dtype: np.dtype[Any], n_chunks: int) -> Any:
        """The (buffer, decoded-mask) entry of an array that fits in the budget."""
        key = ("dense", token)
        entry = self.get(key)
        if entry is None:
            entry = (np.empty(shape, dtype), np.zeros(n_chunks, dtype=bool))
            self.put(key, entry, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return entry

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()
            self._nbytes = 0

    @property
    def nbytes(self) -> int:
        return self._nbytes


#: this process's decoded-chunk LRU (:data:`~unistore.storage.budget.CHUNK_CACHE_BYTES`)
chunk_cache = ChunkCache(budget.CHUNK_CACHE_BYTES)
