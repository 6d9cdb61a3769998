"""``npy``: a directory of ``.npy`` files (or one file), and raw memmap dumps.

Raw ``np.memmap`` dumps carry no header; their shape and dtype come from the
caller: ``open_store(dir, format="npy", raw={"base_embeddings": ((-1, 384), "float32")})``
(``-1`` in the first axis is inferred from the file size).
"""

from __future__ import annotations

import ast
import io
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

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
    checked_nbytes,
    file_location,
    head_bytes,
    list_members,
    object_size,
    read_dir_meta,
    read_range,
)
from unistore.storage.layout import ContiguousLayout, InMemoryLayout, preallocate
from unistore.storage.location import Location

if TYPE_CHECKING:
    from unistore.storage.cache import DiskCache

_HEAD = 4096


#: ``.npy`` versions: the width of the header-length field and the header's text encoding
_NPY_VERSIONS = {(1, 0): (2, "latin1"), (2, 0): (4, "latin1"), (3, 0): (4, "utf8")}
#: numpy itself refuses headers longer than this
_NPY_MAX_HEADER = 1 << 20


def npy_header_end(head: bytes) -> int | None:
    """Where the data of a ``.npy`` file starts, from its first bytes (None when ``head`` is too short to tell)."""
    if len(head) < 12 or not head.startswith(b"\x93NUMPY"):
        return None
    width = _NPY_VERSIONS.get((head[6], head[7]), (None,))[0]
    if width is None:
        return None
    return 8 + width + int.from_bytes(head[8:8 + width], "little")


def parse_npy_header(head: bytes, where: str) -> tuple[tuple[int, ...], np.dtype[Any], bool, int]:
    """(shape, dtype, fortran_order, data offset) of a ``.npy`` header (versions 1.0, 2.0 and 3.0).

    The header is parsed here, not by numpy's private reader: every way a
    header can be wrong is one :class:`~unistore.errors.CorruptDataError`.

    Raises:
        CorruptDataError: bad magic, an unknown version, a header that is not a dict literal with
            ``descr``, ``fortran_order`` and ``shape``, a negative or non-integer dimension.
        TruncatedDataError: the file ends inside its header.
        UnsafePickleError: an object dtype (numpy would unpickle the data).
    """
    def corrupt(problem: str) -> CorruptDataError:
        return CorruptDataError(f"{where} has a corrupt .npy header: {problem}; re-create the file")

    if not head.startswith(b"\x93NUMPY"):
        raise corrupt("it does not start with the .npy magic bytes")
    if len(head) < 10:
        raise TruncatedDataError(f"{where} ends inside its .npy header ({len(head)} bytes)")
    version = (head[6], head[7])
    if version not in _NPY_VERSIONS:
        raise corrupt(f"format version {version[0]}.{version[1]} is not one numpy writes (1.0, 2.0 or 3.0)")
    width, encoding = _NPY_VERSIONS[version]
    if len(head) < 8 + width:
        raise TruncatedDataError(f"{where} ends inside its .npy header ({len(head)} bytes)")
    length = int.from_bytes(head[8:8 + width], "little")
    start = 8 + width
    if length > _NPY_MAX_HEADER:
        raise corrupt(f"it claims a {length}-byte header")
    if len(head) < start + length:
        raise TruncatedDataError(f"{where} ends inside its .npy header: {len(head)} bytes, the header needs "
                                 f"{start + length}; re-create or re-download it")
    try:
        text = head[start:start + length].decode(encoding)
        header = ast.literal_eval(text)
    except (UnicodeDecodeError, ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise corrupt(f"the header is not a Python dict literal ({type(e).__name__})") from None
    if not isinstance(header, dict) or not {"descr", "fortran_order", "shape"} <= set(header):
        raise corrupt("the header must be a dict with 'descr', 'fortran_order' and 'shape'")
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple):
        raise corrupt(f"shape {shape!r} is not a tuple")
    if not isinstance(fortran, bool):
        raise corrupt(f"fortran_order {fortran!r} is not True or False")
    try:
        dtype = npf.descr_to_dtype(header["descr"])
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds for a bad descr; all mean one thing here
        raise corrupt(f"descr {header['descr']!r} is not a numpy dtype ({type(e).__name__})") from None
    if dtype.hasobject:
        raise UnsafePickleError(f"{where} holds an object array, which numpy stores as a pickle; "
                                "unistore never unpickles data - re-save it with a numeric dtype")
    checked_nbytes(shape, dtype, where)
    return tuple(shape), dtype, fortran, start + length


def _parse_raw_spec(key: str, spec: Any, size: int, where: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    try:
        shape, dtype = spec
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as e:
        raise ShapeMismatchError(f"raw spec for {key!r} must be (shape, dtype), got {spec!r}") from e
    if any(s < 0 for s in shape[1:]) or (shape and shape[0] < -1) or dtype.hasobject:
        raise ShapeMismatchError(f"raw spec for {key!r}: {spec!r} needs non-negative dimensions (-1 first to "
                                 "infer rows from the file size) and a numeric dtype")
    row = math.prod(shape[1:]) * dtype.itemsize
    if shape and shape[0] == -1:
        if row == 0 or size % row:
            raise ShapeMismatchError(f"{where} has {size} bytes, not a whole number of {shape[1:]} {dtype} rows")
        shape = (size // row,) + shape[1:]
    need = math.prod(shape) * dtype.itemsize
    if size != need:
        problem = "truncated" if size < need else "larger than declared"
        cls = TruncatedDataError if size < need else ShapeMismatchError
        raise cls(f"{where} is {problem}: {size} bytes on disk, but shape {shape} {dtype} needs {need}; "
                  "check the shape and dtype you passed in raw=")
    return shape, dtype


class NpyFormat(Format):
    name = "npy"
    extensions = (".npy",)
    magic = (b"\x93NUMPY",)

    @classmethod
    def write_block(cls, array_path: str, start: int, block: np.ndarray) -> None:
        """Rows at their byte offset in the preallocated ``.npy``."""
        out = np.load(array_path, mmap_mode="r+")
        out[start:start + len(block)] = block
        out.flush()
        del out

    def open(self, location: Location, cache: DiskCache | None = None, raw: Mapping[str, Any] | None = None,
             **options: Any) -> OpenedStore:
        if options:
            raise TypeError(f"npy stores take no options {sorted(options)}")
        raw = dict(raw or {})
        if location.isdir():
            meta = read_dir_meta(location)
            members = list_members(location, ".npy")
        else:
            meta = {}
            size = object_size(location)
            members = {os.path.splitext(location.name)[0]: (location.path, int(size))}
        keys = list(members)
        heads = head_bytes(location, [members[k][0] for k in keys], _HEAD, cache)
        arrays: dict[str, Any] = {}
        for key, (head, stamp) in zip(keys, heads):
            path, size = members[key]
            floc = file_location(location, path)
            if key in raw:
                shape, dtype = _parse_raw_spec(key, raw.pop(key), size, floc.url)
                arrays[key] = ArrayInfo(key, shape, dtype, ContiguousLayout(floc, 0, shape, dtype, stamp, cache=cache),
                                        stored_nbytes=size, attrs={"raw_memmap": True})
                continue
            if not head.startswith(b"\x93NUMPY"):
                raise FormatError(f"{floc.url} has no .npy header; if it is a raw np.memmap dump, pass "
                                  f"raw={{{key!r}: (shape, dtype)}} to open_store")
            end = npy_header_end(head)
            if end is not None and len(head) < end <= min(size, _NPY_MAX_HEADER + 12):
                head = read_range(floc, 0, end, stamp)
            shape, dtype, fortran, offset = parse_npy_header(head, floc.url)
            nbytes = math.prod(shape) * dtype.itemsize  # Python ints: an absurd shape cannot overflow
            if size < offset + nbytes:
                raise TruncatedDataError(f"{floc.url} is truncated: {size} bytes, header promises {offset + nbytes}; "
                                         "re-create or re-download it")
            if fortran and len(shape) > 1:
                # rows are not contiguous; such files are rare and read whole
                data = np.load(io.BytesIO(read_range(floc, stamp=stamp)), allow_pickle=False)
                layout: Any = InMemoryLayout(np.ascontiguousarray(data))
            else:
                layout = ContiguousLayout(floc, offset, shape, dtype, stamp, cache=cache)
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
        np.save(target, np.asarray(data, order="C"), allow_pickle=False)  # a 0-d array stays 0-d

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

