"""The dataset base every unistore dataset class is written on.

A dataset says what one batch is made of (``_get_batch(indices)``); the base
turns that into ``__getitem__`` and ``__getitems__``, so a ``DataLoader``
fetches a whole batch with one ``take`` per array instead of one read per
sample.  The batch comes back as a :class:`Batch`: a sequence of per-sample
views (what torch's default collate expects) that also carries the batch
already assembled, which :func:`collate` hands straight to the training loop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from unistore.errors import ShapeMismatchError
from unistore.storage.array import Array, RaggedArray
from unistore.storage.store import TensorStore, open_store

__all__ = ["Batch", "SampleTuple", "SampleDict", "StoreDataset", "collate", "row_of", "as_index_array"]

try:  # a Dataset subclass when torch is there, so isinstance checks and Subset work
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover - torch is optional for the storage layer only
    _TorchDataset = object  # type: ignore[assignment,misc]


class SampleTuple(tuple):  # type: ignore[type-arg]
    """One sample of a :class:`Batch` (a plain tuple to its users; torch's collate recognises it)."""

    __slots__ = ()


class SampleDict(dict):  # type: ignore[type-arg]
    """One sample of a :class:`Batch` (a plain dict to its users; torch's collate recognises it)."""

    __slots__ = ()


def row_of(collated: Any, j: int) -> Any:
    """Sample ``j`` of an assembled batch (tensors, arrays, tuples, dicts and lists of them)."""
    if isinstance(collated, tuple):
        return SampleTuple(_row(c, j) for c in collated)
    if isinstance(collated, dict):
        return SampleDict((k, _row(v, j)) for k, v in collated.items())
    return collated[j]


def _row(collated: Any, j: int) -> Any:
    if isinstance(collated, tuple):
        return tuple(_row(c, j) for c in collated)
    if isinstance(collated, dict):
        return {k: _row(v, j) for k, v in collated.items()}
    return collated[j]


class Batch(Sequence[Any]):
    """A batch read in one go.

    ``collated`` is the batch as a training loop wants it (stacked tensors);
    indexing gives per-sample views, so torch's ``default_collate`` (used by a
    plain ``DataLoader``) still works.  :func:`collate` skips that round trip.
    """

    __slots__ = ("collated", "_n")

    def __init__(self, collated: Any, n: int):
        self.collated = collated
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(self._n))]
        if not -self._n <= j < self._n:
            raise IndexError(f"sample {j} of a batch of {self._n}")
        return row_of(self.collated, j % self._n)

    def __repr__(self) -> str:
        return f"<unistore.datasets.Batch of {self._n}>"


def collate(batch: Any) -> Any:
    """``collate_fn`` for unistore datasets: an assembled :class:`Batch` as is, anything else by torch.

    A plain ``DataLoader`` (torch's ``default_collate``) does the same, through
    the hook registered below; pass this where another collate function is
    the default.

    >>> DataLoader(dataset, batch_size=256, collate_fn=unistore.datasets.collate)
    """
    if isinstance(batch, Batch):
        return batch.collated
    from torch.utils.data import default_collate

    return default_collate(batch)


def _collate_samples(batch: Any, *, collate_fn_map: Any = None) -> Any:
    """torch collate hook for :class:`SampleTuple` / :class:`SampleDict`: a whole :class:`Batch` needs no work."""
    if isinstance(batch, Batch):
        return batch.collated
    from torch.utils.data._utils.collate import collate as torch_collate

    plain = [tuple(s) if isinstance(s, tuple) else dict(s) for s in batch]  # samples gathered one by one
    return torch_collate(plain, collate_fn_map=collate_fn_map)


try:  # torch documents extending default_collate by adding to this map
    from torch.utils.data._utils.collate import default_collate_fn_map

    default_collate_fn_map.setdefault(SampleTuple, _collate_samples)
    default_collate_fn_map.setdefault(SampleDict, _collate_samples)
except ImportError:  # pragma: no cover - torch absent
    pass


def as_index_array(indices: Any) -> np.ndarray:
    """Indices from a DataLoader (list, tensor or array) as a 1-D int64 array."""
    if hasattr(indices, "numpy") and not isinstance(indices, np.ndarray):
        indices = indices.numpy()
    return np.asarray(indices, dtype=np.int64).reshape(-1)


class StoreDataset(_TorchDataset):  # type: ignore[misc,valid-type]
    """A map-style dataset over rows of one or more arrays of a :class:`~unistore.TensorStore`.

    Sample ``i`` is ``{key: array[i] for key in keys}``.  A batch is one
    ``take`` per array, so any format on any filesystem is read in one gather
    per batch.  Arrays may be dense or ragged (ragged rows come back as a list
    of 1-D tensors).  Subclasses override :meth:`_get_batch` to say what their
    batch is made of and inherit the rest.

    The dataset pickles as the store's URL and metadata: DataLoader workers
    (fork, spawn, forkserver) reopen files lazily.

    >>> ds = StoreDataset("s3://bucket/run1.zarr", keys=["embeddings", "labels"],
    ...                   storage_options={...})
    >>> loader = DataLoader(ds, batch_size=256, shuffle=True, collate_fn=collate)

    Raises:
        StoreNotFoundError / ArrayNotFoundError: no such store or array.
        ShapeMismatchError: the arrays have different numbers of rows.
    """

    #: the read-ahead of a loader's worker processes (:class:`~unistore.datasets.readahead.WorkerReadAhead`), set
    #: by the loader while its workers start (they inherit it), else None
    worker_read_ahead: Any = None

    def __init__(self, store: TensorStore | str | os.PathLike[str], keys: Sequence[str] | None = None, *,
                 storage_options: Mapping[str, Any] | None = None, format: str = "auto", as_numpy: bool = False):
        from unistore._optional import require

        require("torch", "the dataset classes")
        self._open_arrays(store, keys, storage_options=storage_options, format=format)
        self.as_numpy = as_numpy
        lengths = {k: len(a) for k, a in self.arrays.items()}
        if len(set(lengths.values())) > 1:
            raise ShapeMismatchError(f"arrays of {self.store.location.url} have different numbers of rows: "
                                     f"{lengths}; pass keys= with arrays of one length")
        self._len = next(iter(lengths.values()), 0)

    def _open_arrays(self, store: TensorStore | str | os.PathLike[str], keys: Sequence[str] | None, *,
                     storage_options: Mapping[str, Any] | None = None, format: str = "auto") -> None:
        """Set ``store``, ``keys`` and ``arrays`` (lazy handles: nothing is read)."""
        self.store = store if isinstance(store, TensorStore) else open_store(store, format=format,
                                                                             storage_options=storage_options)
        self.keys = list(keys) if keys is not None else self.store.keys()
        self.arrays: dict[str, Array | RaggedArray] = {k: self.store[k] for k in self.keys}

    def __len__(self) -> int:
        return self._len

    def _get_batch(self, indices: np.ndarray) -> Any:
        """The assembled batch for ``indices`` (validated, any order, duplicates allowed)."""
        as_tensor = not self.as_numpy
        return {k: a.take(indices, as_tensor=as_tensor) for k, a in self.arrays.items()}

    def __getitems__(self, indices: Any) -> Batch:
        idx = as_index_array(indices)
        ahead = self.worker_read_ahead  # make_loader's read-ahead, in worker processes
        if ahead is not None:
            ahead.saw(self, idx)
        return Batch(self._get_batch(idx), len(idx))

    def sample_rows(self) -> tuple[np.ndarray | None, list[Array]] | None:
        """Which row each sample reads, and of which arrays: what the loader's chunk-aware order groups samples by.

        ``(None, arrays)`` when sample ``i`` is row ``i`` of every array (this
        class); ``(rows, arrays)`` for a subclass whose sample ``i`` reads row
        ``rows[i]`` of ``arrays`` (a split or subset of them); None when the
        order does not matter or cannot be told (a subclass that says nothing,
        or one holding its data in memory).
        """
        if type(self)._get_batch is not StoreDataset._get_batch:
            return None
        return None, [a for a in self.arrays.values() if isinstance(a, Array)]

    def prepare_for_workers(self) -> None:
        """Learn, once in this process, what worker processes would each ask storage for on their first read
        (the identities that key the disk cache), so that they inherit it instead."""
        for arr in self.arrays.values():
            if isinstance(arr, Array):
                arr.prepare_for_workers()

    def release_mappings(self) -> None:
        """Once worker processes have started (and inherited what :meth:`prepare_for_workers` mapped), let go of
        this process's mappings of cached remote arrays (:meth:`Array.release_mapping`)."""
        for arr in self.arrays.values():
            if isinstance(arr, Array):
                arr.release_mapping()

    def is_cached(self) -> bool:
        """Whether every array is remote and wholly in place in the disk cache (see :meth:`Array.is_cached`):
        the loader then reads nothing ahead."""
        return bool(self.arrays) and all(isinstance(a, Array) and a.is_cached() for a in self.arrays.values())

    def prefetch(self, indices: Any) -> None:
        """Bring the batch ``indices`` into the caches before it is asked for (the loader's read-ahead).

        Sample ``i`` being row ``i`` of every array, each array fetches its
        rows with :meth:`Array.prefetch` (remote uncompressed rows go to the
        disk cache without being assembled).  Subclasses that map samples to
        rows differently read the batch with ``_get_batch`` and drop it.
        """
        idx = as_index_array(indices)
        if type(self)._get_batch is not StoreDataset._get_batch:
            self._get_batch(idx)
            return
        for arr in self.arrays.values():
            if isinstance(arr, Array):
                arr.prefetch(idx)
            else:
                arr.take(idx)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.store.location.url} rows={len(self)} keys={self.keys}>"
