"""Loader utilities: ``create_loader``, ``set_epoch`` and ``validate_first_batch``."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from unistore.datasets.base import collate
from unistore.datasets.readahead import ReadAhead, ReadsAhead, WorkerReadAhead
from unistore.datasets.sampler import StoreSampler, dist_rank_and_world
from unistore.storage import budget

__all__ = ["create_loader", "set_epoch", "validate_first_batch", "make_loader", "auto_chunk_rows", "auto_read_ahead"]

log = logging.getLogger("unistore")

try:
    from torch.utils.data import DataLoader as _TorchLoader
except ImportError:  # pragma: no cover
    _TorchLoader = object  # type: ignore[assignment,misc]


class _Loader(_TorchLoader):  # type: ignore[misc,valid-type]
    """A ``DataLoader`` that knows its dataset object and where it stands in the epoch.

    ``state_dict()`` counts batches actually handed to the training loop (not
    those the workers prefetched), so ``load_state_dict`` resumes at the first
    sample the loop has not seen.
    """

    dataset_obj: Any
    #: batches read ahead of the training loop (0: off); see :func:`make_loader`
    read_ahead: int = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: Any = self.sampler
        self._start = sampler._resume
        self._delivered = 0
        ahead = None
        # worker processes start with this epoch (persistent ones only with the first)
        forking = bool(self.num_workers) and not (self.persistent_workers and getattr(self, "_iterator", None))
        reads_ahead = isinstance(self.dataset_obj, ReadsAhead)
        if forking and reads_ahead:
            self.dataset_obj.prepare_for_workers()  # fresh workers each epoch inherit, not re-ask, cache keys
        # nothing to read ahead when every row is in the disk cache already (a later epoch): the thread would
        # only compete with the reads
        wanted = self.read_ahead > 0 and reads_ahead and not self.dataset_obj.is_cached()
        self.read_ahead_stats: dict[str, Any] = {"where": "nowhere"}
        unit_rows = sampler.chunk_rows if _samples_are_rows(self.dataset_obj) else None
        in_workers = wanted and self.num_workers > 0 and not self.persistent_workers and \
            isinstance(self.dataset, ReadsAhead)
        if in_workers:
            # each worker reads ahead in a thread of its own: chunks are fetched and decoded in the
            # processes that assemble the batches, and this process, which receives them, stays free
            dataset: Any = self.dataset
            dataset.worker_read_ahead = WorkerReadAhead(
                sampler.order()[self._start:], int(self.batch_size or 1), self.read_ahead, unit_rows)
            self.read_ahead_stats = {"where": "workers"}
        if forking:
            # what this process holds is frozen while the workers fork, so their garbage collector never walks
            # it: it neither collects garbage of this process (an unclosed client session warns when it is
            # collected) nor writes to the pages of objects it only reads
            gc.freeze()
        try:
            batches = super().__iter__()  # worker processes start here: before any read-ahead thread exists
        finally:
            if forking:
                gc.unfreeze()
            if in_workers:
                self.dataset.worker_read_ahead = None  # type: ignore[attr-defined]
        if forking and reads_ahead:
            # the workers hold what this process mapped for them; kept here, the blocks evicted during the
            # epoch would keep their disk space until the next one
            self.dataset_obj.release_mappings()
        if wanted and not in_workers:
            # persistent workers hold last epoch's dataset: read ahead from here, past the batches
            # the workers already have in hand
            lead = self.num_workers * (self.prefetch_factor or 2) if self.num_workers else 0
            ahead = ReadAhead(self.dataset_obj, sampler.order()[self._start:], int(self.batch_size or 1),
                               self.read_ahead + lead, unit_rows)
            self.read_ahead_stats = ahead.stats
            self.read_ahead_stats["where"] = "loop"
        try:
            for batch in batches:
                self._delivered += 1
                if ahead is not None:
                    ahead.advance()
                yield batch
        finally:
            if ahead is not None:
                ahead.close()

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state with ``consumed`` = samples this loader delivered in the current epoch."""
        sampler: Any = self.sampler
        state = sampler.state_dict()
        delivered = getattr(self, "_start", 0) + getattr(self, "_delivered", 0) * int(self.batch_size or 1)
        state["consumed"] = min(delivered, len(sampler))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration starts at the first sample not delivered before ``state`` was taken."""
        sampler: Any = self.sampler
        sampler.load_state_dict(state)


def _sample_rows(dataset: Any) -> tuple[np.ndarray | None, list[Any]] | None:
    """``dataset.sample_rows()`` for a unistore dataset (see :meth:`StoreDataset.sample_rows`), else None."""
    return dataset.sample_rows() if isinstance(dataset, ReadsAhead) else None


def _samples_are_rows(dataset: Any) -> bool:
    """Whether sample ``i`` of ``dataset`` is row ``i`` of its arrays (a plain :class:`StoreDataset`)."""
    said = _sample_rows(dataset)
    return said is not None and said[0] is None


def auto_chunk_rows(dataset: Any) -> int | None:
    """The block length to shuffle by, for a dataset whose samples read rows of remote arrays.

    The array with the widest rows among those the samples read
    (:meth:`StoreDataset.sample_rows`) sets it, since it dominates what an
    epoch fetches: its chunk length when chunked; for an uncompressed array
    read through a disk cache, the rows in ``budget.REMOTE_BLOCK_BYTES`` (8 MiB),
    fetched as a few large ranges, each once.  None for local stores (a plain
    shuffle costs nothing there once chunks are cached), for uncompressed
    remote arrays without a disk cache (their rows are fetched one range
    each, in any order), and for datasets that cannot say which rows their
    samples read, or hold them in memory.
    """
    from unistore.storage.array import Array

    said = _sample_rows(dataset)
    if said is None or dataset.store.location.is_local:
        return None
    arrays = [a for a in said[1] if isinstance(a, Array) and a.shape and a.shape[0]]
    if not arrays:
        return None
    heaviest = max(arrays, key=lambda a: a.nbytes // a.shape[0])  # its reads dominate what an epoch fetches
    if heaviest.chunks:
        return int(heaviest.chunks[0])
    if not _remote_cached(heaviest):
        return None
    return max(1, budget.REMOTE_BLOCK_BYTES // max(1, heaviest.nbytes // heaviest.shape[0]))


def _remote_cached(array: Any) -> bool:
    """Whether ``array`` is read from remote storage through a disk cache."""
    from unistore.storage.array import Array

    return isinstance(array, Array) and array.remote_cached


def auto_read_ahead(dataset: Any, sampler: StoreSampler, batch_size: int) -> int:
    """Batches to read ahead by default: for remote arrays read through a disk cache, enough to cover the
    sampler's next two windows of blocks (at least 4), so the next window is fetched while this one is
    used; 0 (off) otherwise."""
    if not isinstance(dataset, ReadsAhead) or not any(_remote_cached(a) for a in dataset.arrays.values()):
        return 0
    window_rows = (sampler.chunk_rows or 0) * sampler.effective_window
    return max(4, -(-2 * window_rows // max(batch_size, 1)))


def _require_process_group() -> None:
    """``distributed=True`` without rank and world size needs an initialised ``torch.distributed`` group (as
    torch's ``DistributedSampler`` does): otherwise every rank would silently train on all the data."""
    import torch.distributed as dist

    from unistore.errors import ProcessGroupError

    if not (dist.is_available() and dist.is_initialized()):
        raise ProcessGroupError("distributed=True needs the default process group: call "
                                "torch.distributed.init_process_group(...) first (torchrun sets RANK and "
                                "WORLD_SIZE), or pass rank= and world_size= yourself")


def make_loader(dataset: Any, batch_size: int, *, shuffle: bool = True, seed: int = 0, distributed: bool = False,
                rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                num_workers: int = 0, chunk_rows: int | str | None = "auto", read_ahead: int | str = "auto",
                read_ahead_bytes: int = 256 << 20, partitions: int | None = None, **loader_kwargs: Any) -> Any:
    """A DataLoader over any unistore dataset with a :class:`StoreSampler` and batch collation.

    ``distributed=True`` takes rank and world size from ``torch.distributed``
    (initialise the process group first) unless they are given; given
    without it, they are used as they are (a launcher of its own).
    ``partitions`` fixes the parts the epoch's order is built from (default:
    this run's world size, then the one in a state loaded), so that a run
    resumed at another world size keeps its order (see :class:`StoreSampler`).
    ``chunk_rows`` selects the sampler's chunk-aware order: ``"auto"`` (the
    default) uses it when the samples read rows of chunked arrays in a remote
    store, or of uncompressed ones through a disk cache (see
    :func:`auto_chunk_rows`), an int forces it, None turns it off.  Samples
    are grouped by the rows they read (:meth:`StoreDataset.sample_rows`: a
    split, a subset or pairs over the rows are grouped by their rows' chunks).
    ``read_ahead=N`` reads the next ``N`` batches of the order ahead of
    their use (``dataset.prefetch``), at most ``read_ahead_bytes`` of rows
    (256 MiB by default), reading 8 batches (or 4 blocks of the chunk-aware
    order, split among the workers) at once; ``"auto"``
    (the default) reads ahead two windows of the chunk-aware order for remote
    arrays read through a disk cache (:func:`auto_read_ahead`) and nothing
    otherwise, 0 turns it off.  It runs in each worker
    process, in a thread of its own, or with ``num_workers=0`` or
    ``persistent_workers=True`` in a thread of this process.  Workers share
    what it brings through the persistent disk cache
    (``open_store(..., cache=...)``), where one process fetches each block or
    chunk and the others wait for it.
    """
    from unistore._optional import require

    require("torch", "make_loader and create_loader")
    if distributed and (rank is None or world_size is None):
        _require_process_group()
        d_rank, d_world = dist_rank_and_world()
        rank = d_rank if rank is None else rank
        world_size = d_world if world_size is None else world_size
    if chunk_rows == "auto":
        chunk_rows = auto_chunk_rows(dataset) if shuffle else None
    elif isinstance(chunk_rows, str):
        raise ValueError(f"chunk_rows must be 'auto', an int or None, got {chunk_rows!r}")
    said = _sample_rows(dataset) if chunk_rows is not None else None
    sampler = StoreSampler(dataset, shuffle=shuffle, seed=seed, rank=0 if rank is None else rank,
                           world_size=1 if world_size is None else world_size, drop_last=drop_last,
                           chunk_rows=chunk_rows, rows=None if said is None else said[0], partitions=partitions)
    loader_kwargs.setdefault("collate_fn", collate)
    loader = _Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                     drop_last=drop_last, **loader_kwargs)
    loader.dataset_obj = dataset
    if read_ahead == "auto":
        read_ahead = auto_read_ahead(dataset, sampler, batch_size)
    elif isinstance(read_ahead, str):
        raise ValueError(f"read_ahead must be 'auto' or a number of batches, got {read_ahead!r}")
    loader.read_ahead = _read_ahead_depth(dataset, batch_size, int(read_ahead), int(read_ahead_bytes))
    return loader


def _read_ahead_depth(dataset: Any, batch_size: int, batches: int, max_bytes: int) -> int:
    """``batches``, fewer where that many batches' rows would exceed ``max_bytes`` (at least one)."""
    if batches <= 0:
        return 0
    if not isinstance(dataset, ReadsAhead):
        return batches
    row = sum(int(a.nbytes // max(len(a), 1)) for a in dataset.arrays.values())
    if row <= 0:
        return batches
    return max(1, min(batches, max_bytes // (row * max(batch_size, 1))))


def create_loader(dataset_dir: str | os.PathLike[str] | Any, split: str = "train", batch_size: int = 32,
                  num_workers: int = 0, distributed: bool = False, *, shuffle: bool | None = None, seed: int = 0,
                  epoch: int = 0, drop_last: bool = False, pin_memory: bool = False,
                  storage_format: str = "auto", use_mmap: bool | None = None, device: Any = None,
                  storage_options: Mapping[str, Any] | None = None, rank: int | None = None,
                  world_size: int | None = None, **loader_kwargs: Any) -> Any:
    """A DataLoader over a JASPER dataset (or any unistore dataset object), ready to train.

    ``loader.dataset_obj`` is the dataset; ``set_epoch(loader, epoch)`` moves
    both its curriculum and the sampler.  Shuffles the train split (not val or
    test) unless ``shuffle`` says otherwise; ``distributed=True`` gives each
    rank of the initialised ``torch.distributed`` group a disjoint shard.

    >>> loader = create_loader("output/dataset", "train", batch_size=32, num_workers=4)
    >>> for epoch in range(100):
    ...     set_epoch(loader, epoch)
    ...     for batch in loader: ...
    """
    from unistore.datasets.jasper import JASPERSteeringDataset

    if isinstance(dataset_dir, (str, os.PathLike)):
        dataset = JASPERSteeringDataset(dataset_dir, split, epoch=epoch, device=device, storage_format=storage_format,
                                        use_mmap=use_mmap, storage_options=storage_options, seed=seed)
    else:
        dataset = dataset_dir
    shuffle = split == "train" if shuffle is None else shuffle
    loader = make_loader(dataset, batch_size, shuffle=shuffle, seed=seed, distributed=distributed, rank=rank,
                         world_size=world_size, drop_last=drop_last, num_workers=num_workers,
                         pin_memory=pin_memory, **loader_kwargs)
    set_epoch(loader, epoch)
    return loader


def set_epoch(loader: Any, epoch: int) -> None:
    """Set ``epoch`` on the loader's dataset (curriculum) and on its sampler (shuffle order).

    Takes effect for iterations started afterwards, as with torch's ``DistributedSampler``.
    """
    dataset = getattr(loader, "dataset_obj", None) or loader.dataset
    for target in (dataset, getattr(dataset, "dataset", None), loader.sampler,
                   getattr(loader.batch_sampler, "sampler", None)):
        if target is not None and hasattr(target, "set_epoch"):
            target.set_epoch(epoch)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(f"validate_first_batch: {message}")


def _finite(name: str, tensor: Any) -> None:
    import torch

    if tensor.is_floating_point():
        bad = ~torch.isfinite(tensor)
        _check(not bool(bad.any()), f"{name} has {int(bad.sum())} NaN/Inf values")


def _within(name: str, tensor: Any, lo: float, hi: float) -> None:
    if tensor.numel():
        low, high = float(tensor.min()), float(tensor.max())
        _check(lo <= low and high <= hi, f"{name} values span [{low:g}, {high:g}], expected within [{lo:g}, {hi:g}]")


JASPER_KEYS = ("question_emb", "target_source_emb", "steering", "negative_embs", "cluster_id", "relevance",
               "centroid_distance", "steering_variant", "negative_tiers")


def validate_first_batch(loader: Any) -> Any:
    """Check the loader's first batch and return it.

    JASPER batches: every documented key present, shapes consistent
    (``[B, D]``, ``[B, n_neg, D]``, ``[B]``, ``[B, n_neg]``), no NaN/Inf, cluster
    ids within the number of clusters, relevance in [0, 1], centroid distance
    in [0, 2], steering variant in 0-3 and tiers in 0-2.  ClusterLabeled
    batches ``(base, steering, label[, metadata])``: matching ``[B, D]``
    embeddings, ``[B, n_clusters]`` labels in [0, 1], no NaN/Inf.

    Raises:
        AssertionError: saying which check failed and with what values.
    """
    batch = next(iter(loader))
    dataset = getattr(loader, "dataset_obj", None) or loader.dataset
    n_clusters = getattr(dataset, "n_clusters", None) or getattr(getattr(dataset, "dataset", None), "n_clusters", None)
    if isinstance(batch, dict):
        missing = [k for k in JASPER_KEYS if k not in batch]
        _check(not missing, f"batch lacks keys {missing}")
        q = batch["question_emb"]
        _check(q.ndim == 2, f"question_emb has shape {tuple(q.shape)}, expected [B, D]")
        b, d = q.shape
        neg = batch["negative_embs"]
        _check(neg.ndim == 3 and neg.shape[0] == b and neg.shape[2] == d,
               f"negative_embs has shape {tuple(neg.shape)}, expected [{b}, n_neg, {d}]")
        for key in ("target_source_emb", "steering"):
            _check(tuple(batch[key].shape) == (b, d), f"{key} has shape {tuple(batch[key].shape)}, expected [{b}, {d}]")
        for key in ("cluster_id", "relevance", "centroid_distance", "steering_variant"):
            _check(tuple(batch[key].shape) == (b,), f"{key} has shape {tuple(batch[key].shape)}, expected [{b}]")
        _check(tuple(batch["negative_tiers"].shape) == tuple(neg.shape[:2]),
               f"negative_tiers has shape {tuple(batch['negative_tiers'].shape)}, expected {tuple(neg.shape[:2])}")
        for key in JASPER_KEYS:
            _finite(key, batch[key])
        _within("cluster_id", batch["cluster_id"], 0, (n_clusters or 1 << 62) - 1)
        _within("relevance", batch["relevance"], 0.0, 1.0)
        _within("centroid_distance", batch["centroid_distance"], 0.0, 2.0)
        _within("steering_variant", batch["steering_variant"], 0, 3)
        _within("negative_tiers", batch["negative_tiers"], 0, 2)
        return batch
    _check(isinstance(batch, (tuple, list)) and len(batch) in (3, 4),
           f"expected a JASPER dict or a (base, steering, label[, metadata]) batch, got {type(batch).__name__}")
    base, steering, label = batch[0], batch[1], batch[2]
    _check(base.ndim == 2 and tuple(steering.shape) == tuple(base.shape),
           f"base {tuple(base.shape)} and steering {tuple(steering.shape)} embeddings must both be [B, D]")
    _check(label.ndim == 2 and label.shape[0] == base.shape[0], f"label has shape {tuple(label.shape)}, expected "
           f"[{base.shape[0]}, n_clusters]")
    if n_clusters:
        _check(label.shape[1] == n_clusters, f"label has {label.shape[1]} columns, the dataset has {n_clusters} "
               "clusters")
    for name, tensor in (("base", base), ("steering", steering), ("label", label)):
        _finite(name, tensor)
    _within("label", label, 0.0, 1.0)
    return batch
