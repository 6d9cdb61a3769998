"""Checksums of stored arrays: ``sha256:<hex>`` of their C-ordered bytes, and of staged blocks.

Kept apart from the store and from the Dask jobs, which both compute them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["checksum_of", "stream_checksum", "bytes_view", "sha256_hex"]


def checksum_of(parts: Sequence[np.ndarray]) -> str:
    """``sha256:<hex>`` of the C-ordered bytes of ``parts`` (values then offsets for ragged)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(bytes_view(p))
    return "sha256:" + h.hexdigest()


def bytes_view(data: np.ndarray) -> memoryview:
    """The raw bytes of ``data`` (works for extension dtypes such as bfloat16)."""
    flat = np.ascontiguousarray(data).reshape(-1)
    return (flat.view(np.uint8) if flat.size else np.empty(0, np.uint8)).data


def stream_checksum(arr: Any, block_rows: int | None) -> str:
    """:func:`checksum_of` a dense array as stored now, read ``block_rows`` rows (else about 64 MiB) at a time."""
    h = hashlib.sha256()
    if not arr.shape:
        h.update(bytes_view(arr.read()))
        return "sha256:" + h.hexdigest()
    row = max(1, arr.nbytes // max(arr.shape[0], 1))
    step = block_rows or max(1, (64 << 20) // row)
    for start in range(0, arr.shape[0], step):
        h.update(bytes_view(arr[start:start + step]))
    return "sha256:" + h.hexdigest()


def sha256_hex(raw: bytes | memoryview) -> str:
    """The plain hex SHA-256 of a staged block (its ``.sha256`` marker)."""
    return hashlib.sha256(raw).hexdigest()
