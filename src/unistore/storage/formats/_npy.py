"""``npy``: a directory of ``.npy`` files (or one file), and raw memmap dumps.

Raw ``np.memmap`` dumps carry no header; their shape and dtype come from the
caller: ``open_store(dir, format="npy", raw={"base_embeddings": ((-1, 384), "float32")})``
(``-1`` in the first axis is inferred from the file size).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.lib.format as npf

from unistore.errors import CorruptDataError, FormatError, ShapeMismatchError, TruncatedDataError, UnsafePickleError
from unistore.storage.formats.base import (
    META_NAME,
    ArrayInfo,
    Format,
    FormatWriter,
    OpenedStore,
    apply_meta,
    file_location,
    head_bytes,
    list_members,
    read_dir_meta,
    read_range,
)
from unistore.storage.layout import ContiguousLayout, InMemoryLayout, file_stamp, preallocate
from unistore.storage.location import Location, retry_remote

_HEAD = 4096


def parse_npy_header(head: bytes, where: str) -> tuple[tuple[int, ...], np.dtype[Any], bool, int]:
    """(shape, dtype, fortran_order, data offset) of a ``.npy`` header."""
    f = io.BytesIO(head)
    try:
        version = npf.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npf.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npf.read_array_header_2_0(f)
        else:
            shape, fortran, dtype = npf._read_array_header(f, version)  # type: ignore[attr-defined]
    except ValueError as e:
        raise CorruptDataError(f"{where} has a corrupt .npy header ({e}); re-create the file") from e
    if dtype.hasobject:
        raise UnsafePickleError(f"{where} holds an object array, which numpy stores as a pickle; "
                                "unistore never unpickles data - re-save it with a numeric dtype")
    return tuple(int(s) for s in shape), dtype, bool(fortran), f.tell()


def _parse_raw_spec(key: str, spec: Any, size: int, where: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    try:
        shape, dtype = spec
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as e:
        raise ShapeMismatchError(f"raw spec for {key!r} must be (shape, dtype), got {spec!r}") from e
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    if shape and shape[0] == -1:
        if row == 0 or size % row:
            raise ShapeMismatchError(f"{where} has {size} bytes, not a whole number of {shape[1:]} {dtype} rows")
        shape = (size // row,) + shape[1:]
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != need:
        problem = "truncated" if size < need else "larger than declared"
        cls = TruncatedDataError if size < need else ShapeMismatchError
        raise cls(f"{where} is {problem}: {size} bytes on disk, but shape {shape} {dtype} needs {need}; "
                  "check the shape and dtype you passed in raw=")
    return shape, dtype


class NpyFormat(Format):
    name = "npy"

    def open(self, location: Location, raw: Mapping[str, Any] | None = None, **options: Any) -> OpenedStore:
        if options:
            raise TypeError(f"npy stores take no options {sorted(options)}")
        raw = dict(raw or {})
        if location.isdir():
            meta = read_dir_meta(location)
            members = list_members(location, ".npy")
        else:
            meta = {}
            size = retry_remote(lambda: location.fs.size(location.path), location)
            members = {os.path.splitext(location.name)[0]: (location.path, int(size))}
        keys = list(members)
        heads = head_bytes(location, [members[k][0] for k in keys], _HEAD)
        arrays: dict[str, Any] = {}
        for key, head in zip(keys, heads):
            path, size = members[key]
            floc = file_location(location, path)
            if key in raw:
                shape, dtype = _parse_raw_spec(key, raw.pop(key), size, floc.url)
                arrays[key] = ArrayInfo(key, shape, dtype, ContiguousLayout(floc, 0, shape, dtype, file_stamp(floc)),
                                        stored_nbytes=size, attrs={"raw_memmap": True})
                continue
            if not head.startswith(b"\x93NUMPY"):
                raise FormatError(f"{floc.url} has no .npy header; if it is a raw np.memmap dump, pass "
                                  f"raw={{{key!r}: (shape, dtype)}} to open_store")
            if len(head) >= _HEAD and b"\n" not in head[10:]:
                head = read_range(floc, 0, 1 << 20)
            shape, dtype, fortran, offset = parse_npy_header(head, floc.url)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if size < offset + nbytes:
                raise TruncatedDataError(f"{floc.url} is truncated: {size} bytes, header promises {offset + nbytes}; "
                                         "re-create or re-download it")
            if fortran and len(shape) > 1:
                # rows are not contiguous; such files are rare and read whole
                data = np.load(io.BytesIO(read_range(floc)), allow_pickle=False)
                layout: Any = InMemoryLayout(np.ascontiguousarray(data))
            else:
                layout = ContiguousLayout(floc, offset, shape, dtype, file_stamp(floc))
            arrays[key] = ArrayInfo(key, shape, dtype, layout, stored_nbytes=size)
        if raw:
            from unistore.errors import ArrayNotFoundError

            raise ArrayNotFoundError(f"raw= names {sorted(raw)}, which are not .npy files in {location.url}")
        return apply_meta(OpenedStore(self.name, arrays), meta)

    def writer(self, path: str, **options: Any) -> FormatWriter:
        return _NpyWriter(path, self)


class _NpyWriter(FormatWriter):
    def __init__(self, path: str, fmt: Format):
        super().__init__(path, fmt)
        os.makedirs(path, exist_ok=True)
        self.attrs: dict[str, dict[str, Any]] = {}

    def write_array(self, key: str, data: np.ndarray, chunks: tuple[int, ...] | None,
                    compression: str | None, attrs: dict[str, Any]) -> None:
        self.check_compression(compression)
        self.keep_attrs(key, attrs)
        target = os.path.join(self.path, *key.split("/")) + ".npy"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        np.save(target, np.ascontiguousarray(data), allow_pickle=False)

    def create_array(self, key: str, shape: tuple[int, ...], dtype: np.dtype[Any], chunks: tuple[int, ...] | None,
                     compression: str | None, attrs: dict[str, Any]) -> tuple[str, int] | None:
        """A preallocated ``.npy`` (the header ``np.save`` would write); any row range can be written apart."""
        self.check_compression(compression)
        if not shape:
            return None
        self.keep_attrs(key, attrs)
        target = os.path.join(self.path, *key.split("/")) + ".npy"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        np.lib.format.open_memmap(target, mode="w+", dtype=dtype, shape=shape).flush()
        preallocate(target, f"array {key!r}")
        return target, 1

    def finish(self, attrs: dict[str, Any], checksums: dict[str, str]) -> list[str]:
        with open(os.path.join(self.path, META_NAME), "w") as f:
            f.write(self.meta_json(attrs, checksums))
        return [META_NAME]

