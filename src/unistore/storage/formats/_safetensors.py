"""``safetensors``: one file (header metadata -> attrs) or a directory of them.

The header (8-byte length + JSON) *is* the byte layout, so reads never decode
anything: every tensor is a :class:`ContiguousLayout`.  In a directory, keys
are ``<file stem>/<tensor name>``.  Files are written with the
``safetensors`` library itself.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from unistore.errors import CorruptDataError, TruncatedDataError, UnsupportedError
from unistore.storage.formats.base import (
    META_KEY,
    ArrayInfo,
    Format,
    FormatWriter,
    OpenedStore,
    apply_meta,
    bfloat16,
    file_location,
    head_bytes,
    list_members,
    loads_meta,
    read_dir_meta,
    read_range,
)
from unistore.storage.layout import ContiguousLayout, file_stamp
from unistore.storage.location import Location, retry_remote

_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "U64": np.uint64,
    "I32": np.int32, "U32": np.uint32, "I16": np.int16, "U16": np.uint16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "C64": np.complex64,
}
if bfloat16 is not None:
    _DTYPES["BF16"] = bfloat16
_MAX_HEADER = 100 * 1024 * 1024
_FIRST_READ = 64 * 1024


def parse_header(head: bytes, size: int, where: str) -> tuple[dict[str, Any], int]:
    """(header dict, data start offset) of a safetensors file, validated against ``size``."""
    if len(head) < 8:
        raise TruncatedDataError(f"{where} is {len(head)} bytes long, too short for a safetensors header")
    n = int.from_bytes(head[:8], "little")
    if n > _MAX_HEADER or 8 + n > size:
        raise CorruptDataError(f"{where} claims a {n}-byte safetensors header in a {size}-byte file; "
                               "the file is corrupt or not safetensors")
    try:
        header = json.loads(head[8:8 + n])
    except ValueError as e:
        raise CorruptDataError(f"{where} has a safetensors header that is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptDataError(f"{where}: safetensors header is not a JSON object")
    return header, 8 + n


def _tensor_info(key: str, name: str, entry: Any, data_start: int, size: int, floc: Location,
                 stamp: int) -> ArrayInfo:
    try:
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptDataError(f"{floc.url}: tensor {name!r} has an unreadable or unsupported header entry "
                               f"{entry!r}") from e
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != nbytes or begin < 0:
        raise CorruptDataError(f"{floc.url}: tensor {name!r} spans {end - begin} bytes but shape {shape} "
                               f"{entry['dtype']} needs {nbytes}")
    if data_start + end > size:
        raise TruncatedDataError(f"{floc.url} is truncated: tensor {name!r} ends at byte {data_start + end} "
                                 f"of a {size}-byte file; re-create or re-download it")
    return ArrayInfo(key, shape, dtype, ContiguousLayout(floc, data_start + begin, shape, dtype, stamp),
                     stored_nbytes=nbytes)


class SafetensorsFormat(Format):
    name = "safetensors"

    def open(self, location: Location, **options: Any) -> OpenedStore:
        if options:
            raise TypeError(f"safetensors stores take no options {sorted(options)}")
        if location.isdir():
            meta = read_dir_meta(location)
            members = list_members(location, ".safetensors")
            prefixed = True
        else:
            size = int(retry_remote(lambda: location.fs.size(location.path), location))
            members = {"": (location.path, size)}
            meta, prefixed = {}, False
        keys = list(members)
        heads = head_bytes(location, [members[k][0] for k in keys], _FIRST_READ)
        opened = OpenedStore(self.name, {})
        for stem, head in zip(keys, heads):
            path, size = members[stem]
            floc = file_location(location, path)
            if len(head) >= 8 and 8 + int.from_bytes(head[:8], "little") > len(head) and size > len(head):
                end = min(size, 8 + int.from_bytes(head[:8], "little"))
                head = read_range(floc, 0, end)
            header, data_start = parse_header(head, size, floc.url)
            stamp = file_stamp(floc)
            file_meta = header.pop("__metadata__", None) or {}
            if not prefixed:
                meta = loads_meta(file_meta.pop(META_KEY, None))
                opened.attrs.update({k: v for k, v in file_meta.items()})
            for name, entry in header.items():
                key = f"{stem}/{name}" if prefixed else name
                opened.arrays[key] = _tensor_info(key, name, entry, data_start, size, floc, stamp)
        return apply_meta(opened, meta)

    def writer(self, path: str, **options: Any) -> FormatWriter:
        return _SafetensorsWriter(path, self)


class _SafetensorsWriter(FormatWriter):
    """Collects tensors and writes one file with ``safetensors.serialize_file`` on finish."""

    def __init__(self, path: str, fmt: Format):
        super().__init__(path, fmt)
        self.tensors: dict[str, np.ndarray] = {}

    def write_array(self, key: str, data: np.ndarray, chunks: tuple[int, ...] | None,
                    compression: str | None, attrs: dict[str, Any]) -> None:
        self.check_compression(compression)
        if not any(np.dtype(data.dtype) == np.dtype(d) for d in _DTYPES.values()):
            raise UnsupportedError(f"safetensors cannot store dtype {data.dtype} (array {key!r}); "
                                   "use npy, hdf5 or zarr, or cast it")
        self.keep_attrs(key, attrs)
        self.tensors[key] = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False)

    def finish(self, attrs: dict[str, Any], checksums: dict[str, str]) -> list[str]:
        from safetensors import TensorSpec, serialize_file

        meta = {META_KEY: self.meta_json(attrs, checksums)}
        meta.update({k: v for k, v in attrs.items() if isinstance(v, str) and k != META_KEY})
        specs = {
            k: TensorSpec(dtype=v.dtype.name, shape=v.shape, data_ptr=v.ctypes.data, data_len=v.nbytes)
            for k, v in self.tensors.items()
        }
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        serialize_file(specs, self.path, metadata=meta)
        return []

