"""Read-ahead: what the next batches of an epoch need, read in a background thread before they are asked for.

The loader (:func:`~unistore.datasets.make_loader`) asks a dataset through
one declared protocol, :class:`ReadsAhead`; a dataset that does not offer
it is read as it is asked for.  Where DataLoader workers assemble the
batches, each worker reads ahead for the batches it will be asked for
(:class:`WorkerReadAhead`, handed to the dataset as its
``worker_read_ahead``); otherwise the training loop's process does
(:class:`ReadAhead`).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Protocol, runtime_checkable

import numpy as np

from unistore.storage import budget

__all__ = ["ReadsAhead", "ReadAhead", "WorkerReadAhead"]

log = logging.getLogger("unistore")


@runtime_checkable
class ReadsAhead(Protocol):
    """What the loader asks of a dataset it reads ahead for and starts worker processes of (every
    :class:`~unistore.datasets.StoreDataset` offers it)."""

    #: the worker's read-ahead while a loader's workers start (None otherwise); its ``saw(dataset, indices)`` is
    #: told each batch the worker is asked for
    worker_read_ahead: Any
    #: the :class:`~unistore.TensorStore` the samples are read from
    store: Any
    #: the arrays a batch reads, by key (:class:`~unistore.storage.array.Array` / ``RaggedArray``)
    arrays: dict[str, Any]

    def sample_rows(self) -> tuple[np.ndarray | None, list[Any]] | None:
        """Which row each sample reads, and of which arrays (see
        :meth:`~unistore.datasets.StoreDataset.sample_rows`); None when that cannot be said."""

    def prepare_for_workers(self) -> None:
        """Learn now what worker processes would each ask storage for, so they inherit it."""

    def release_mappings(self) -> None:
        """Let go of what :meth:`prepare_for_workers` mapped, once the workers have started."""

    def is_cached(self) -> bool:
        """Whether every row is in the disk cache already (then nothing is read ahead)."""

    def prefetch(self, indices: Any) -> None:
        """Bring the batch ``indices`` into the caches without assembling it."""


class ReadAhead:
    """Reads what the next ``depth`` batches of the sampler's order need, in a background thread.

    The sampler itself is not advanced (its state stays what the loop consumed);
    the thread walks the epoch's order and stays at most ``depth`` batches
    ahead of the batches delivered.  A failed read-ahead is only logged: the
    real read raises.

    With ``unit_rows`` (the chunk-aware order's blocks, samples being rows),
    it reads by block rather than by batch: the order's rows of each block,
    once, when the first batch that needs the block comes within ``depth``,
    up to 4 blocks at once.  Batch by batch, the 8 reads would all wait on the
    same blocks (every batch of a window touches all of its blocks).
    ``share=(i, n)`` splits the blocks among ``n`` readers walking the same
    order (DataLoader workers): reader ``i`` takes every ``n``-th block in
    order of first use, so the workers fetch different blocks at once and
    each waits for (or, if it gets there first, fetches) the others' blocks.
    """

    def __init__(self, dataset: Any, order: np.ndarray, batch_size: int, depth: int,
                 unit_rows: int | None = None, share: tuple[int, int] = (0, 1)):
        self.dataset, self.order, self.batch_size, self.depth = dataset, order, batch_size, depth
        self.unit_rows, self.share = unit_rows, share
        self.stats: dict[str, Any] = {"batches": 0, "units": 0, "errors": 0}
        self._delivered = 0
        self._stop = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="unistore-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        n_batches = -(-len(self.order) // self.batch_size)
        units = _Units(self.order, self.unit_rows) if self.unit_rows else None
        mine, readers = self.share
        k = 1  # batch 0 is being read by the loop itself
        # up to ``depth`` batches ahead, 8 read at once: on a distant bucket each waits on latency, not bandwidth
        width = min(self.depth, budget.MAX_READS_AHEAD if units is None else budget.MAX_BLOCKS_AHEAD)
        with ThreadPoolExecutor(width, thread_name_prefix="unistore-read-ahead") as pool:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda k=k: self._stop or k < self._delivered + 1 + self.depth)  # type: ignore[misc]
                    if self._stop:
                        return
                    if units is None:  # batches the reader passed need no reading ahead; blocks are
                        k = max(k, self._delivered + 1)  # numbered as first used, all alike in every reader
                if k >= n_batches:
                    return
                if units is None:
                    pool.submit(self._one, k)
                else:
                    for seq, rows in units.new(k * self.batch_size, (k + 1) * self.batch_size):
                        if seq % readers == mine:
                            pool.submit(self._read, rows, "units")
                k += 1

    def _one(self, k: int) -> None:
        self._read(self.order[k * self.batch_size:(k + 1) * self.batch_size], "batches")

    def _read(self, indices: np.ndarray, what: str) -> None:
        if self._stop:
            return
        try:
            self.dataset.prefetch(indices)
            self.stats[what] += 1
        except Exception as e:  # noqa: BLE001 - the loop's own read of these rows reports it
            self.stats["errors"] += 1
            log.debug("read-ahead of %d rows failed: %s", len(indices), e)

    def advance(self) -> None:
        with self._cv:
            self._delivered += 1
            self._cv.notify()

    def reached(self, k: int) -> None:
        """Batch ``k`` of the order is being read now: read ahead of it."""
        with self._cv:
            if k > self._delivered:
                self._delivered = k
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)


class _Units:
    """The blocks of ``unit_rows`` rows an order touches, each handed out once, in order of first use."""

    def __init__(self, order: np.ndarray, unit_rows: int):
        units = order // unit_rows
        self.order, self.units = order, units
        self.by_unit = np.argsort(units, kind="stable")  # positions in the order, grouped by block
        self.bounds = np.searchsorted(units[self.by_unit], np.arange(int(units.max(initial=-1)) + 2))
        self.seen = np.zeros(len(self.bounds), bool)
        self.count = 0

    def new(self, start: int, stop: int) -> list[tuple[int, np.ndarray]]:
        """``(sequence number, rows of the order in the block)`` of the blocks first used in ``order[start:stop]``."""
        out = []
        for u in dict.fromkeys(self.units[start:stop].tolist()):
            if not self.seen[u]:
                self.seen[u] = True
                out.append((self.count, self.order[self.by_unit[self.bounds[u]:self.bounds[u + 1]]]))
                self.count += 1
        return out


class WorkerReadAhead:
    """Read-ahead that travels with the dataset into DataLoader worker processes.

    The loader attaches it to the dataset just before the workers start;
    :meth:`StoreDataset.__getitems__` tells it which batch of the epoch's
    order a worker is reading, and the worker reads the ``depth`` batches
    after it in a thread of its own.  Workers reading ahead over the same
    chunks do not fetch them twice: the disk cache lets one fetch while the
    others wait.  Nothing runs in the loop's process.
    """

    def __init__(self, order: np.ndarray, batch_size: int, depth: int, unit_rows: int | None = None):
        self.order, self.batch_size, self.depth, self.unit_rows = order, batch_size, depth, unit_rows
        self._pid = -1
        self._lock = threading.Lock()
        self._ahead: ReadAhead | None = None
        self._position = np.zeros(0, np.int64)

    def __getstate__(self) -> tuple[np.ndarray, int, int, int | None]:
        return (self.order, self.batch_size, self.depth, self.unit_rows)

    def __setstate__(self, state: tuple[np.ndarray, int, int, int | None]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def saw(self, dataset: Any, indices: np.ndarray) -> None:
        """A worker is reading ``indices``: start (once per process) or move its read-ahead."""
        if not len(indices) or not len(self.order):
            return
        if self._pid != os.getpid():
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            if info is None:
                return  # not a worker process
            with self._lock:
                if self._pid != os.getpid():
                    import atexit

                    position = np.zeros(int(self.order.max()) + 1, np.int64)
                    position[self.order] = np.arange(len(self.order))
                    self._position = position
                    # the workers split the order's blocks among them: each fetches its own while reading
                    self._ahead = ReadAhead(dataset, self.order, self.batch_size, self.depth, self.unit_rows,
                                             share=(info.id, info.num_workers))
                    atexit.register(self._ahead.close)
                    self._pid = os.getpid()
        first = int(indices[0])
        if self._ahead is not None and first < len(self._position):
            self._ahead.reached(int(self._position[first]) // self.batch_size)


