"""Column types: :class:`NDArray` stores a numpy array as raw bytes + dtype + shape.

Never pickle: the blob is ``b"UNDA"``, a 4-byte little-endian header length, a
JSON header ``{"dtype": ..., "shape": [...]}`` and the C-ordered bytes.
Every numeric dtype (bfloat16 included) round-trips exactly; object arrays
are refused.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from sqlalchemy import LargeBinary
from sqlalchemy.types import TypeDecorator

from unistore.errors import CorruptDataError, ShapeMismatchError

__all__ = ["NDArray", "encode_array", "decode_array", "decode_stack"]

_MAGIC = b"UNDA"


def _dtype_from_name(name: str) -> np.dtype[Any]:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


_HEADERS: dict[tuple[int, tuple[int, ...]], bytes] = {}


def _header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    from unistore.storage.formats.base import dtype_name

    if dtype.hasobject or dtype.fields or (dtype.kind not in "biufc" and dtype_name(dtype) != "bfloat16"):
        raise ShapeMismatchError(f"NDArray columns hold numeric arrays only, got dtype {dtype}")
    text = json.dumps({"dtype": dtype_name(dtype), "shape": list(shape)}).encode()
    return _MAGIC + len(text).to_bytes(4, "little") + text


def encode_array(value: Any) -> bytes:
    """The blob for ``value`` (anything ``np.asarray`` accepts, numeric only).

    Raises:
        ShapeMismatchError: object, string or structured arrays.
    """
    arr = value if type(value) is np.ndarray else np.asarray(value)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    key = (arr.dtype.num, arr.shape)  # dtype.num hashes far faster than the dtype
    header = _HEADERS.get(key)
    if header is None:
        header = _header(arr.dtype, arr.shape)
        if len(_HEADERS) < 4096:  # label vectors repeat a handful of (dtype, shape) pairs
            _HEADERS[key] = header
    return header + arr.tobytes(order="C")


def decode_array(blob: bytes) -> np.ndarray:
    """The array stored by :func:`encode_array` (a fresh, writable copy).

    Raises:
        CorruptDataError: the blob is not an NDArray blob or is truncated.
    """
    blob = bytes(blob)
    if not blob.startswith(_MAGIC) or len(blob) < 8:
        raise CorruptDataError("catalog array blob has no NDArray header; the row is corrupt")
    n = int.from_bytes(blob[4:8], "little")
    try:
        header = json.loads(blob[8:8 + n])
        dtype = _dtype_from_name(header["dtype"])
        shape = tuple(int(s) for s in header["shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptDataError(f"catalog array blob has an unreadable header ({e})") from e
    body = blob[8 + n:]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(body) != expected:
        raise CorruptDataError(f"catalog array blob holds {len(body)} bytes, shape {shape} {dtype} needs {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()


def decode_stack(blobs: list[bytes], dtype: Any = None) -> np.ndarray:
    """Blobs of arrays of one shape, stacked into ``(len(blobs),) + shape`` (cast to ``dtype`` if given).

    Blobs that share one header (the usual case: label vectors of a dataset)
    are decoded with one ``frombuffer``; mixed ones one at a time.

    Raises:
        CorruptDataError: a blob is corrupt.
        ShapeMismatchError: the arrays differ in shape.
    """
    if not blobs:
        return np.empty((0,), dtype=dtype or np.float32)
    first = bytes(blobs[0])
    size = len(first)
    if first.startswith(_MAGIC) and size >= 8:
        start = 8 + int.from_bytes(first[4:8], "little")
        head = first[:start]
        if all(len(b) == size and bytes(b[:start]) == head for b in blobs):
            one = decode_array(first)  # validates the header and the length
            body = b"".join(bytes(b[start:]) for b in blobs)
            out = np.frombuffer(body, dtype=one.dtype).reshape((len(blobs),) + one.shape)
            return out.astype(dtype) if dtype is not None else out.copy()
    arrays = [decode_array(b) for b in blobs]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ShapeMismatchError(f"catalog arrays to stack differ in shape: {sorted(shapes)}")
    return np.stack([a.astype(dtype) if dtype is not None else a for a in arrays])


class NDArray(TypeDecorator[np.ndarray]):
    """A numpy array column: raw bytes + dtype + shape, never pickle."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> bytes | None:
        return None if value is None else encode_array(value)

    def process_result_value(self, value: Any, dialect: Any) -> np.ndarray | None:
        return None if value is None else decode_array(value)
