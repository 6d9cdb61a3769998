"""Lazy array handles: :class:`Array` (dense) and :class:`RaggedArray` (lists of lists).

Nothing is read until ``take`` or indexing asks for rows; every read is one
batched gather through :mod:`unistore.storage.engine`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unistore.errors import OutOfBoundsError, ShapeMismatchError
from unistore.storage.engine import gather, prefetch, read_rows, wholly_cached
from unistore.storage.formats.base import ArrayInfo, RaggedInfo, bfloat16, dtype_name
from unistore.storage.layout import ChunkedLayout, ContiguousLayout, InMemoryLayout, IOStats

__all__ = ["Array", "RaggedArray", "to_tensor", "normalize_indices", "DASK_BLOCK_BYTES"]

#: ``Array.to_dask()`` aims at blocks of about this many bytes.
DASK_BLOCK_BYTES = 64 << 20


def _token(arr: Array) -> str:
    """A name for ``arr``'s dask graph: the same stored array (and version) gives the same name."""
    import hashlib
    import pickle

    return hashlib.sha1(pickle.dumps(arr.__getstate__())).hexdigest()[:16]


def to_tensor(data: np.ndarray) -> Any:
    """A ``torch.Tensor`` sharing ``data``'s memory (bfloat16 included)."""
    import torch

    if bfloat16 is not None and data.dtype == bfloat16:
        return torch.from_numpy(np.asarray(data, order="C").view(np.uint16)).view(torch.bfloat16)
    if not data.flags.writeable:
        data = data.copy()
    return torch.from_numpy(np.asarray(data, order="C"))  # np.ascontiguousarray would make a 0-d array 1-d


def normalize_indices(indices: Any, n: int, key: str) -> np.ndarray:
    """Validate row indices: integers, negative counting from the end, in bounds.

    Raises:
        OutOfBoundsError: an index is outside ``[-n, n)``.
        ShapeMismatchError: the indices are not a 1-D sequence of integers.
    """
    if type(indices) is np.ndarray and indices.dtype == np.int64 and indices.ndim == 1:
        idx = indices  # what samplers and loaders hand in: nothing to convert
    else:
        idx = np.asarray(indices)
        if idx.dtype == bool or (idx.size and idx.dtype.kind not in "iu"):
            raise ShapeMismatchError(f"take() on {key!r} needs integer row indices, got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise ShapeMismatchError(f"take() on {key!r} needs a 1-D list of row indices, got shape {idx.shape}")
        idx = idx.astype(np.int64, copy=False)
    if idx.size:
        if int(idx.view(np.uint64).max()) < n:
            return idx  # one pass: negative indices read as unsigned are past any length
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -n or hi >= n:
            bad = lo if lo < -n else hi
            raise OutOfBoundsError(f"row index {bad} is out of bounds for {key!r} with {n} rows")
        if lo < 0:
            idx = np.where(idx < 0, idx + n, idx)
    return idx


class Array:
    """A lazy handle on one dense array of a :class:`~unistore.TensorStore`.

    >>> a = store["embeddings"]
    >>> a.shape, a.dtype
    ((200000, 384), dtype('float32'))
    >>> rows = a.take([7, 3, 7])        # ndarray, rows in the order asked
    >>> rows = a.take(idx, as_tensor=True)
    >>> a[10:20], a[5], np.asarray(a)
    """

    __slots__ = ("_info", "format", "_stats")

    def __init__(self, info: ArrayInfo, fmt: str, stats: IOStats | None = None):
        self._info = info
        self.format = fmt
        self._stats = stats if stats is not None else IOStats()

    @property
    def key(self) -> str:
        return self._info.key

    @property
    def shape(self) -> tuple[int, ...]:
        return self._info.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._info.dtype

    @property
    def ndim(self) -> int:
        return len(self._info.shape)

    @property
    def chunks(self) -> tuple[int, ...] | None:
        """Chunk shape, or ``None`` for contiguous arrays."""
        return self._info.chunks

    @property
    def compression(self) -> str | None:
        return self._info.compression

    @property
    def attrs(self) -> dict[str, Any]:
        return self._info.attrs

    @property
    def nbytes(self) -> int:
        """Size of the decoded array in bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def prepare_for_workers(self) -> None:
        """Ask storage now, in this process, for what keys this array in a disk cache (an object's ETag and
        size, a zarr array's listing), so processes this one starts or pickles the array to inherit it; an
        uncompressed remote array also has the blocks the cache holds mapped, so forked workers inherit the
        mapping."""
        layout = self._info.layout
        if isinstance(layout, ContiguousLayout):
            layout.source.prepare_for_workers()
        elif isinstance(layout, ChunkedLayout) and hasattr(layout.reader, "identity"):
            layout.reader.identity()

    def release_mapping(self) -> None:
        """Let go of this process's mapping of a cached remote array, once the workers started from it have
        their own: blocks evicted while it would be kept free their disk space; the next read maps afresh."""
        if isinstance(self._info.layout, ContiguousLayout):
            self._info.layout.source.release()

    @property
    def remote_cached(self) -> bool:
        """Whether this array is read from remote storage through a disk cache."""
        layout = self._info.layout
        if isinstance(layout, ContiguousLayout):
            return layout.source.cached_remote
        if isinstance(layout, ChunkedLayout):
            loc = layout.reader.location
            return loc is not None and not loc.is_local and layout.reader.cache is not None
        return False

    def is_cached(self) -> bool:
        """Whether every row of this array is in place in the disk cache: every block of a remote uncompressed
        array, or every decoded chunk of a chunked one (listed there, not read); False for whatever else."""
        return wholly_cached(self._info.layout)

    @property
    def stored_nbytes(self) -> int | None:
        """Bytes on storage, where the format knows it (listed when first asked, for zarr)."""
        return _stored(self._info)

    @property
    def layout(self) -> Any:
        return self._info.layout

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"<unistore.Array {self.key!r} shape={self.shape} dtype={dtype_name(self.dtype)} "
                f"format={self.format} chunks={self.chunks}>")

    def __getstate__(self) -> tuple[ArrayInfo, str]:
        return (self._info, self.format)

    def __setstate__(self, state: tuple[ArrayInfo, str]) -> None:
        self._info, self.format = state
        self._stats = IOStats()

    def take(self, indices: Any, as_tensor: bool = False) -> Any:
        """Rows ``indices`` (any order, duplicates allowed) as one batched read.

        Returns an ndarray of shape ``(len(indices),) + shape[1:]``, or a
        ``torch.Tensor`` with ``as_tensor=True``.

        Raises:
            OutOfBoundsError: an index is outside the array.
            ShapeMismatchError: ``indices`` is not a 1-D integer sequence.
        """
        info = self._info
        if not info.shape:
            raise ShapeMismatchError(f"{info.key!r} is 0-d; read it with a[...]")
        idx = normalize_indices(indices, info.shape[0], info.key)
        out = gather(info.layout, idx, self._stats)
        return to_tensor(out) if as_tensor else out

    def prefetch(self, indices: Any) -> None:
        """Bring rows ``indices`` into the caches without returning them (what a read-ahead calls).

        Raises:
            OutOfBoundsError: an index is outside the array.
        """
        if not self.shape:
            return
        prefetch(self._info.layout, normalize_indices(indices, self.shape[0], self.key), self._stats)

    def read(self, as_tensor: bool = False) -> Any:
        """The whole array."""
        out = self._read_slice(0, self.shape[0]) if self.shape else self._read_scalar()
        return to_tensor(out) if as_tensor else out

    def _read_scalar(self) -> np.ndarray:
        from dataclasses import replace

        layout = self._info.layout
        if isinstance(layout, InMemoryLayout):
            return np.asarray(layout.data)
        return read_rows(replace(layout, shape=(1,)), 0, 1, self._stats).reshape(())

    def _read_slice(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0,) + self.shape[1:], self.dtype)
        return read_rows(self._info.layout, start, stop, self._stats)

    def __getitem__(self, sel: Any) -> np.ndarray:
        if sel is Ellipsis or sel == ():
            return self.read()
        rest: tuple[Any, ...] = ()
        if isinstance(sel, tuple):
            sel, rest = sel[0], sel[1:]
            if sel is Ellipsis:
                return self.read()[(Ellipsis,) + rest]
        if not self.shape:
            raise IndexError(f"{self.key!r} is 0-d; use a[...]")
        n = self.shape[0]
        if isinstance(sel, slice):
            start, stop, step = sel.indices(n)
            out = self._read_slice(start, stop) if step == 1 else self.take(np.arange(start, stop, step))
        elif isinstance(sel, (int, np.integer)):
            out = self.take(np.array([int(sel)]))[0]
            return out[rest] if rest else out
        else:
            out = self.take(sel)
        return out[(slice(None),) + rest] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read()
        return out.astype(dtype) if dtype is not None else out

    def block_rows(self, target_bytes: int = DASK_BLOCK_BYTES) -> int:
        """Rows per block of about ``target_bytes``: whole stored chunks for chunked arrays."""
        row = max(1, self.nbytes // max(self.shape[0], 1)) if self.shape else 1
        rows = max(1, target_bytes // row)
        if self.chunks:
            rows = max(1, rows // self.chunks[0]) * self.chunks[0]
        return min(rows, max(self.shape[0], 1)) if self.shape else 1

    def to_dask(self, block_rows: int | None = None) -> Any:
        """A lazy ``dask.array`` over this array, read through the layer block by block.

        Blocks split the first axis only: whole stored chunks for chunked arrays
        (so each chunk is decoded by one task), about 64 MiB of rows otherwise.
        The graph holds this handle (metadata, not data): it pickles into
        ``dask.distributed`` worker processes, which reopen the store themselves.

        >>> emb = store["embeddings"].to_dask()
        >>> emb.mean(axis=0).compute()

        Raises:
            MissingDependencyError: dask is not installed (``pip install 'unistore[dask]'``).
        """
        try:
            import dask.array as da
        except ImportError as e:
            from unistore.errors import MissingDependencyError

            raise MissingDependencyError(f"to_dask() needs dask ({e}); pip install 'unistore[dask]'") from e
        if not self.shape:
            return da.from_array(np.asarray(self.read()), chunks=())
        rows = block_rows or self.block_rows()
        return da.from_array(self, chunks=(rows,) + tuple(self.shape[1:]), asarray=False, fancy=False, lock=False,
                             name=f"unistore-{self.format}-{self.key}-" + _token(self))


class RaggedArray:
    """Rows of different lengths (e.g. keyword ids per pair).

    Row ``i`` is ``values[offsets[i]:offsets[i+1]]``; ``take`` returns a list
    of 1-D arrays (or tensors) in the order asked.
    """

    __slots__ = ("_info", "format", "_stats", "_values", "_offsets")

    def __init__(self, info: RaggedInfo, fmt: str, stats: IOStats | None = None):
        self._info = info
        self.format = fmt
        self._stats = stats if stats is not None else IOStats()
        self._values = Array(info.values, fmt, self._stats)
        self._offsets: np.ndarray | None = None

    def __getstate__(self) -> tuple[RaggedInfo, str]:
        return (self._info, self.format)

    def __setstate__(self, state: tuple[RaggedInfo, str]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    @property
    def key(self) -> str:
        return self._info.key

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._info.offsets.shape[0] - 1,)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._info.values.dtype

    @property
    def chunks(self) -> None:
        return None

    @property
    def compression(self) -> str | None:
        return self._info.values.compression

    @property
    def attrs(self) -> dict[str, Any]:
        return self._info.attrs

    @property
    def nbytes(self) -> int:
        return self._values.nbytes + self._info.offsets.shape[0] * 8

    @property
    def stored_nbytes(self) -> int | None:
        a, b = _stored(self._info.values), _stored(self._info.offsets)
        return None if a is None else a + (b or 0)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"<unistore.RaggedArray {self.key!r} rows={len(self)} dtype={dtype_name(self.dtype)} "
                f"format={self.format}>")

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = Array(self._info.offsets, self.format, self._stats).read().astype(np.int64)
        return self._offsets

    @property
    def values(self) -> Array:
        return self._values

    def take(self, indices: Any, as_tensor: bool = False) -> list[Any]:
        """Rows ``indices`` as a list of 1-D arrays (tensors with ``as_tensor=True``)."""
        idx = normalize_indices(indices, len(self), self.key)
        off = self.offsets
        starts, stops = off[idx], off[idx + 1]
        lengths = stops - starts
        if lengths.sum() == 0:
            flat = np.empty(0, self.dtype)
        else:
            # one gather for every value of every requested row
            flat_idx = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
            flat_idx += np.arange(int(lengths.sum()))
            flat = self._values.take(flat_idx)
        parts = np.split(flat, np.cumsum(lengths)[:-1])
        return [to_tensor(p) for p in parts] if as_tensor else parts

    def read(self) -> list[np.ndarray]:
        return self.take(np.arange(len(self)))

    def to_list(self) -> list[list[Any]]:
        return [p.tolist() for p in self.read()]

    def __getitem__(self, sel: Any) -> Any:
        if isinstance(sel, (int, np.integer)):
            return self.take([int(sel)])[0]
        if isinstance(sel, slice):
            return self.take(np.arange(*sel.indices(len(self))))
        if sel is Ellipsis:
            return self.read()
        return self.take(sel)


def _stored(info: ArrayInfo) -> int | None:
    """``info.stored_nbytes``, asking the format's callable once when it gave one."""
    value = info.stored_nbytes
    if callable(value):
        value = info.stored_nbytes = value()
    return value
