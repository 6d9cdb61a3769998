"""``convert``: copy a store between any two formats and filesystems.

The copy streams row blocks through the read engine into a staged
destination that is published atomically at the end, so a failed or killed
conversion leaves the source untouched and the destination absent (or, with
``overwrite=True``, still the previous complete store).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from unistore.storage.array import Array, RaggedArray
from unistore.storage.location import Location
from unistore.storage.store import create_store, open_store

__all__ = ["convert", "ConvertReport", "store_size"]

#: Rows are copied in blocks of about this many bytes.
BLOCK_BYTES = 64 << 20
#: Arrays larger than this are staged in a temporary file-backed memmap, not in RAM.
IN_MEMORY_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class ConvertReport:
    """What ``convert`` did: arrays copied and bytes at each end."""

    arrays: int
    logical_bytes: int
    src_bytes: int
    dst_bytes: int

    @property
    def ratio(self) -> float:
        """Destination size / source size on storage."""
        return self.dst_bytes / self.src_bytes if self.src_bytes else float("nan")


def store_size(location: Location) -> int:
    """Bytes on storage under ``location`` (a file, or everything below a directory)."""
    fs = location.fs
    if fs.isdir(location.path):
        return int(sum(info.get("size") or 0 for info in fs.find(location.path, detail=True).values()))
    return int(fs.size(location.path))


def convert(src_url: str | os.PathLike[str] | Location, dst_url: str | os.PathLike[str] | Location, format: str,
            compression: str | None = None, chunks: Mapping[str, tuple[int, ...]] | tuple[int, ...] | None = None,
            storage_options: Mapping[str, Any] | None = None,
            src_storage_options: Mapping[str, Any] | None = None,
            dst_storage_options: Mapping[str, Any] | None = None, src_format: str = "auto",
            overwrite: bool = False, progress: bool = False, keys: Sequence[str] | None = None,
            rename: Mapping[str, str] | None = None, on_array: Callable[[str], None] | None = None,
            **src_options: Any) -> ConvertReport:
    """Copy every array and attr of the store at ``src_url`` into a new ``format`` store at ``dst_url``.

    ``storage_options`` apply to both ends unless ``src_storage_options`` /
    ``dst_storage_options`` are given.  ``chunks`` is one chunk shape for all
    arrays or a ``{key: chunks}`` mapping (source keys); ``compression`` applies to every
    dense array (zarr: ``zstd``, ``gzip``, ``blosc``, ``lz4``; hdf5: ``gzip``, ``lzf``).

    ``keys`` copies only those arrays, in that order; ``rename`` maps source keys
    to destination keys (``{"question_embs": "embeddings/questions"}``; keys not
    in it keep their name); ``on_array(key)`` is called before each array is copied.

    Raises:
        StoreNotFoundError: the source does not exist.
        ArrayNotFoundError: a key in ``keys`` is not in the source.
        InvalidKeyError: a ``rename`` target is not a valid key.
        StoreExistsError: the destination exists and ``overwrite`` is false.
        UnsupportedError: the destination format cannot hold some array as asked.

    >>> unistore.convert("run1_pt/", "s3://bucket/run1.zarr", format="zarr", compression="zstd")
    """
    src_opts = src_storage_options if src_storage_options is not None else storage_options
    dst_opts = dst_storage_options if dst_storage_options is not None else storage_options
    src = open_store(src_url, format=src_format, storage_options=src_opts, **src_options)
    copy = list(keys) if keys is not None else src.keys()
    arrays = {key: src[key] for key in copy}  # a missing key fails here, before anything is staged
    rename = dict(rename or {})
    dst = create_store(dst_url, format=format, storage_options=dst_opts, overwrite=overwrite)
    total = sum(a.nbytes for a in arrays.values())
    bar = _progress(total, f"convert -> {format}", progress)
    spill = tempfile.TemporaryDirectory(prefix="unistore-convert-")
    try:
        for key, arr in arrays.items():
            if on_array is not None:
                on_array(key)
            target = rename.get(key, key)
            if isinstance(arr, RaggedArray):
                dst.write_array(target, arr, attrs=arr.attrs)
                bar.update(arr.nbytes)
                continue
            key_chunks = chunks.get(key) if isinstance(chunks, Mapping) else _fit_chunks(chunks, arr.shape)
            data = _read_blocks(arr, bar, spill.name)
            dst.write_array(target, data, chunks=key_chunks, compression=compression, attrs=arr.attrs)
        dst.attrs.update(src.attrs)
        dst.commit()
    except BaseException:
        dst.abort()
        raise
    finally:
        bar.close()
        spill.cleanup()
    return ConvertReport(len(arrays), total, store_size(src.location), store_size(dst.location))


def _fit_chunks(chunks: tuple[int, ...] | None, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """One chunk shape for every array: leading entries apply, missing axes are whole."""
    if chunks is None or not shape:
        return None
    return tuple(max(1, min(chunks[i], s or 1)) if i < len(chunks) else max(s, 1) for i, s in enumerate(shape))


def _read_blocks(arr: Array, bar: Any, spill_dir: str) -> np.ndarray:
    """The whole array, read in bounded row blocks so progress is visible.

    Large arrays land in a file-backed memmap under ``spill_dir``: the pages
    are the kernel's to write back, so converting an array bigger than RAM works.
    """
    if not arr.shape or arr.shape[0] == 0:
        out = arr.read()
        bar.update(out.nbytes)
        return out
    if arr.nbytes > IN_MEMORY_BYTES:
        path = os.path.join(spill_dir, f"{len(os.listdir(spill_dir))}.bin")
        out = np.memmap(path, dtype=arr.dtype, mode="w+", shape=arr.shape)
    else:
        out = np.empty(arr.shape, arr.dtype)
    row = max(1, arr.nbytes // arr.shape[0])
    step = max(1, BLOCK_BYTES // row)
    for start in range(0, arr.shape[0], step):
        block = arr[start:start + step]
        out[start:start + len(block)] = block
        bar.update(block.nbytes)
    return out


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)
