"""One sampler for every unistore dataset: deterministic, rank-aware and resumable.

The order of an epoch is a function of ``(seed, epoch)`` alone, so every rank
computes the same permutation and takes its own stride of it; a run stopped
mid-epoch resumes from ``state_dict()`` at the next sample it had not drawn.
The sampler follows torch's ``Stateful`` contract (``state_dict`` /
``load_state_dict``), which ``torchdata``'s ``StatefulDataLoader`` uses where
it is installed; nothing here needs it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import numpy as np

from unistore.errors import ShapeMismatchError

__all__ = ["StoreSampler", "dist_rank_and_world"]

try:
    from torch.utils.data import Sampler as _TorchSampler
except ImportError:  # pragma: no cover
    _TorchSampler = object  # type: ignore[assignment,misc]


def dist_rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` group, else ``(0, 1)``."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StoreSampler(_TorchSampler):  # type: ignore[misc,valid-type]
    """Indices of one rank's shard of an epoch.

    - ``shuffle=True``: a permutation drawn from ``numpy.random.default_rng([seed, epoch])``;
      ``set_epoch`` changes it, the same ``(seed, epoch)`` gives it back.
    - ``rank`` / ``world_size`` (taken from ``torch.distributed`` when it is
      initialised and they are not given): rank ``r`` takes positions
      ``r, r + world_size, ...`` of the epoch's order.  Shards are disjoint and
      of equal length.  Their union is the whole dataset: when the length does
      not divide evenly, the order is padded with its own first few indices
      (as torch's ``DistributedSampler`` does), or, with ``drop_last=True``,
      cut to a multiple of ``world_size``.
    - ``state_dict()`` records the epoch and how many indices were drawn;
      after ``load_state_dict`` the next iteration yields exactly the rest.
    - ``chunk_rows=`` (chunk-aware order, for chunked or remote data): the
      rows are cut into blocks of ``chunk_rows`` (a store's chunks); each
      epoch shuffles the order of the blocks, then the rows within each window
      of ``window_chunks`` consecutive blocks, and rank ``r`` takes the
      ``r``-th contiguous stretch of that order.  A chunk is then read by one
      rank (ranks share only the windows at their boundaries; the window is
      capped at one rank's share of the blocks), about once per epoch, while
      it is in use; what is given up is mixing across windows (a batch draws
      from ``window_chunks`` chunks, not from the whole dataset).
      ``rows=`` (one per sample) says which row each sample reads, for
      datasets whose samples are not their rows (a split or subset of the
      rows, pairs indexing them): the blocks are then the samples whose rows
      fall in the same ``chunk_rows`` of storage.

    >>> sampler = StoreSampler(dataset, seed=0)          # rank/world from torch.distributed
    >>> loader = DataLoader(dataset, batch_size=256, sampler=sampler)
    >>> for epoch in range(10):
    ...     sampler.set_epoch(epoch)
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False, chunk_rows: int | None = None,
                 window_chunks: int = 4, rows: np.ndarray | None = None):
        self.n = data_source if isinstance(data_source, int) else len(data_source)
        if rows is not None and len(rows) != self.n:
            raise ShapeMismatchError(f"rows has {len(rows)} entries, one per sample is {self.n}")
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._groups: list[np.ndarray] | None = None
        if rank is None or world_size is None:
            d_rank, d_world = dist_rank_and_world()
            rank = d_rank if rank is None else rank
            world_size = d_world if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        if chunk_rows is not None and chunk_rows < 1 or window_chunks < 1:
            raise ValueError(f"chunk_rows and window_chunks must be positive, got {chunk_rows}, {window_chunks}")
        self.chunk_rows = chunk_rows
        self.window_chunks = int(window_chunks)
        self.epoch = 0
        self.num_samples = self.n // world_size if drop_last else -(-self.n // world_size)
        self._resume = 0  # where the next iteration starts (set by load_state_dict)
        self._drawn = 0  # indices drawn by the current iteration

    def order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's indices for ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle and self.chunk_rows is not None:
            full = self._chunk_order(epoch)
        elif self.shuffle:
            full = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        else:
            full = np.arange(self.n)
        total = self.num_samples * self.world_size
        full = full[:total] if total <= self.n else np.resize(full, total)  # resize repeats from the start
        if self.chunk_rows is not None:  # contiguous stretches: each rank reads its own chunks
            return full[self.rank * self.num_samples:(self.rank + 1) * self.num_samples]
        return full[self.rank:total:self.world_size]

    @property
    def effective_window(self) -> int:
        """Blocks mixed together: ``window_chunks``, but no more than one rank's share of the blocks."""
        if self.chunk_rows is None:
            return 0
        return max(1, min(self.window_chunks, self._n_blocks() // self.world_size))

    def _n_blocks(self) -> int:
        assert self.chunk_rows is not None
        return -(-self.n // self.chunk_rows) if self.rows is None else len(self._blocks())

    def _blocks(self) -> list[np.ndarray]:
        """With ``rows``: the samples of each block of ``chunk_rows`` rows that some sample reads, in row order."""
        if self._groups is None:
            assert self.rows is not None and self.chunk_rows is not None
            ids = self.rows // self.chunk_rows
            by_row = np.argsort(ids, kind="stable")
            self._groups = np.split(by_row, np.flatnonzero(np.diff(ids[by_row])) + 1) if self.n else []
        return self._groups

    def _chunk_order(self, epoch: int) -> np.ndarray:
        """Blocks of ``chunk_rows`` in shuffled order, rows shuffled within windows of ``window_chunks`` blocks."""
        assert self.chunk_rows is not None
        rng = np.random.default_rng([self.seed, epoch, 1])
        groups = None if self.rows is None else self._blocks()
        n_blocks = self._n_blocks()
        window = self.effective_window
        parts = []
        blocks = rng.permutation(n_blocks)
        # each rank's share of the shuffled blocks is windowed on its own, so no window straddles two ranks
        bounds = np.linspace(0, n_blocks, self.world_size + 1).round().astype(np.int64)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            for w in range(lo, hi, window):
                samples = np.concatenate([np.arange(b * self.chunk_rows, min((b + 1) * self.chunk_rows, self.n))
                                          if groups is None else groups[b] for b in blocks[w:min(w + window, hi)]])
                parts.append(rng.permutation(samples))
        return np.concatenate(parts) if parts else np.arange(0)

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        start, self._resume = self._resume, 0
        self._drawn = start
        for i in order[start:].tolist():
            self._drawn += 1
            yield i

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Where this rank stands: epoch, indices drawn in it, and what the order depends on."""
        return {"epoch": self.epoch, "consumed": self._drawn, "seed": self.seed, "shuffle": self.shuffle,
                "rank": self.rank, "world_size": self.world_size, "n": self.n, "drop_last": self.drop_last,
                "chunk_rows": self.chunk_rows, "window_chunks": self.window_chunks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields the indices of ``state``'s epoch not yet drawn.

        Raises:
            ShapeMismatchError: the state belongs to another dataset length, seed or world size.
        """
        for key in ("seed", "shuffle", "world_size", "n", "drop_last", "chunk_rows", "window_chunks"):
            if key in state and state[key] != getattr(self, key):
                raise ShapeMismatchError(f"sampler state has {key}={state[key]!r}, this sampler has "
                                         f"{getattr(self, key)!r}; it was saved for another run")
        self.epoch = int(state["epoch"])
        self._resume = min(int(state["consumed"]), self.num_samples)
        self._drawn = self._resume
