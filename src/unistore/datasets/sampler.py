"""One sampler for every unistore dataset: deterministic, rank-aware and resumable at any world size.

The epoch's order is a function of the dataset, the seed, the epoch and a
partition count fixed for the run (by default the world size of its first
launch), never of how many ranks read it now: every rank computes the same
order and takes its own contiguous stretch of it.  A run stopped mid-epoch
resumes from ``state_dict()`` (one rank's state describes the whole run) at
the same or another world size: what no rank had drawn is dealt out again
over the ranks there are now, each sample once.  The sampler follows torch's
``Stateful`` contract (``state_dict`` / ``load_state_dict``), which
``torchdata``'s ``StatefulDataLoader`` uses where it is installed; nothing
here needs it.
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
    """Indices of one rank's share of an epoch.

    The epoch's **order** (what every rank together draws, rank after rank)
    depends on ``(seed, epoch, partitions)`` and the dataset alone:

    - ``shuffle=True``: a permutation drawn from ``numpy.random.default_rng([seed, epoch])``,
      taken as ``partitions`` strided parts one after another (part ``p`` is
      positions ``p, p + partitions, ...``); ``set_epoch`` changes it, the
      same ``(seed, epoch)`` gives it back.  ``shuffle=False``: ``0..n-1``.
    - ``chunk_rows=`` (chunk-aware order, for chunked or remote data): the
      rows are cut into blocks of ``chunk_rows`` (a store's chunks); each
      epoch shuffles the order of the blocks, deals them out to
      ``partitions`` contiguous parts, and shuffles the rows within each
      window of ``window_chunks`` consecutive blocks of a part (no window
      straddles two parts; the window is capped at one part's blocks).  A
      chunk belongs to one part; what is given up is mixing across windows (a
      batch draws from ``window_chunks`` chunks, not from the whole dataset).
      ``rows=`` (one per sample) says which row each sample reads, for
      datasets whose samples are not their rows (a split or subset of the
      rows, pairs indexing them): the blocks are then the samples whose rows
      fall in the same ``chunk_rows`` of storage.

    Rank ``r`` of ``world_size`` (taken from ``torch.distributed`` when it is
    initialised and they are not given) takes the ``r``-th of ``world_size``
    equal contiguous stretches of the order: with as many ranks as
    partitions, rank ``r`` reads part ``r``; with fewer or more, a rank reads
    neighbouring parts or a piece of one, so a chunk is still read by one
    rank, about once per epoch (ranks share only the windows where their
    stretches meet).  Shards are disjoint and of equal length; when the
    length does not divide evenly, the last stretch is padded with the
    order's first few indices (as torch's ``DistributedSampler`` pads), or,
    with ``drop_last=True``, the order is cut to a multiple of ``world_size``.

    ``partitions`` (default: this run's world size, then the one recorded in
    the state loaded) is what keeps the order when the world size changes:
    ``state_dict()`` records the epoch, how many indices this rank drew, the
    world size and the part of the order that epoch was dealt from; since
    every rank draws as many indices, any one rank's state tells what the
    whole run had drawn.  After ``load_state_dict`` at any world size, the
    rest of the epoch is dealt out over the ranks there are now, each sample
    once (padding only at its very end), and later epochs have the order an
    uninterrupted run would have.

    >>> sampler = StoreSampler(dataset, seed=0)          # rank/world from torch.distributed
    >>> loader = DataLoader(dataset, batch_size=256, sampler=sampler)
    >>> for epoch in range(10):
    ...     sampler.set_epoch(epoch)
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False, chunk_rows: int | None = None,
                 window_chunks: int = 4, rows: np.ndarray | None = None, partitions: int | None = None):
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
        if partitions is not None and partitions < 1:
            raise ValueError(f"partitions must be positive, got {partitions}")
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        if chunk_rows is not None and chunk_rows < 1 or window_chunks < 1:
            raise ValueError(f"chunk_rows and window_chunks must be positive, got {chunk_rows}, {window_chunks}")
        self.chunk_rows = chunk_rows
        self.window_chunks = int(window_chunks)
        #: parts the epoch's order is built from (see the class docstring)
        self.partitions = int(partitions) if partitions is not None else world_size
        self._partitions_given = partitions is not None
        self.epoch = 0
        #: ``(epoch, [(start, stop), ...])``: the stretches of that epoch's order left to deal out (a resumed
        #: epoch), or None: the whole order
        self._segments: tuple[int, list[tuple[int, int]]] | None = None
        self._finished = False  # the last iteration ran to its end
        self._resume = 0  # where the next iteration starts in order() (the loader reads it)
        self._drawn = 0  # indices drawn by the current iteration

    # ------------------------------------------------------------------ the order
    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """The whole epoch's order (every rank's samples, rank after rank, without padding): a function of
        the dataset, ``seed``, ``epoch`` and ``partitions``, not of the world size."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle and self.chunk_rows is not None:
            return self._chunk_order(epoch)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            return np.concatenate([perm[p::self.partitions] for p in range(self.partitions)]) if self.n else perm
        return np.arange(self.n)

    def _left(self, epoch: int) -> list[tuple[int, int]] | None:
        """The stretches of ``epoch``'s order this iteration deals out (None: all of it)."""
        if self._segments is None or self._segments[0] != epoch or self._finished:
            return None
        return self._segments[1]

    def _share(self, length: int) -> int:
        return length // self.world_size if self.drop_last else -(-length // self.world_size)

    def order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's indices for ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        full = self.global_order(epoch)
        left = self._left(epoch)
        dealt = full if left is None else (np.concatenate([full[a:b] for a, b in left]) if left else full[:0])
        share = self._share(len(dealt))
        total = share * self.world_size
        if total > len(dealt):  # padded with the epoch's first samples (resize repeats from the start)
            dealt = np.concatenate([dealt, np.resize(full, total - len(dealt))])
        return dealt[self.rank * share:(self.rank + 1) * share]

    @property
    def num_samples(self) -> int:
        """Indices this rank draws in the current epoch (a resumed epoch: in what is left of it)."""
        left = self._left(self.epoch)
        return self._share(self.n if left is None else sum(b - a for a, b in left))

    @property
    def effective_window(self) -> int:
        """Blocks mixed together: ``window_chunks``, but no more than one partition's share of the blocks."""
        if self.chunk_rows is None:
            return 0
        return max(1, min(self.window_chunks, self._n_blocks() // self.partitions))

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
        # each partition's share of the shuffled blocks is windowed on its own, so no window straddles two
        bounds = np.linspace(0, n_blocks, self.partitions + 1).round().astype(np.int64)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            for w in range(lo, hi, window):
                samples = np.concatenate([np.arange(b * self.chunk_rows, min((b + 1) * self.chunk_rows, self.n))
                                          if groups is None else groups[b] for b in blocks[w:min(w + window, hi)]])
                parts.append(rng.permutation(samples))
        return np.concatenate(parts) if parts else np.arange(0)

    def __iter__(self) -> Iterator[int]:
        if self._finished:  # the pass over a resumed epoch ended: the next pass is a whole epoch
            self._segments, self._finished = None, False
        order = self.order()
        start, self._resume = self._resume, 0
        self._drawn = start
        for i in order[start:].tolist():
            self._drawn += 1
            yield i
        self._finished = self._segments is not None

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        """Where the run stands: epoch, indices this rank drew in it, the world size, and what the order depends
        on.  Every rank draws as many, so one rank's state describes the whole run."""
        left = self._segments[1] if self._segments is not None and self._segments[0] == self.epoch else None
        return {"epoch": self.epoch, "consumed": self._drawn, "seed": self.seed, "shuffle": self.shuffle,
                "rank": self.rank, "world_size": self.world_size, "n": self.n, "drop_last": self.drop_last,
                "chunk_rows": self.chunk_rows, "window_chunks": self.window_chunks,
                "partitions": self.partitions, "segments": None if left is None else [list(s) for s in left]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at this sampler's world size: the next iteration yields this rank's share of what no rank had
        drawn of ``state``'s epoch (saved at any world size); later epochs follow the order of the state's
        partitions.

        Raises:
            ShapeMismatchError: the state belongs to another dataset length, seed, order or partition count.
        """
        for key in ("seed", "shuffle", "n", "drop_last", "chunk_rows", "window_chunks"):
            if key in state and state[key] != getattr(self, key):
                raise ShapeMismatchError(f"sampler state has {key}={state[key]!r}, this sampler has "
                                         f"{getattr(self, key)!r}; it was saved for another run")
        saved_world = int(state.get("world_size", self.world_size))
        partitions = int(state.get("partitions", saved_world))  # a state without them: one per rank it had
        if self._partitions_given and partitions != self.partitions:
            raise ShapeMismatchError(f"sampler state has partitions={partitions}, this sampler was given "
                                     f"partitions={self.partitions}; leave partitions unset to resume that run")
        self.partitions = partitions
        epoch = int(state["epoch"])
        left = state.get("segments")
        segments = [(0, self.n)] if left is None else [(int(a), int(b)) for a, b in left]
        self.epoch = epoch
        self._segments = (epoch, undrawn(segments, saved_world, int(state["consumed"]), bool(state.get(
            "drop_last", self.drop_last))))
        self._finished = False
        self._resume = self._drawn = 0


def undrawn(segments: list[tuple[int, int]], world_size: int, consumed: int,
            drop_last: bool = False) -> list[tuple[int, int]]:
    """The stretches of an epoch's order left once each of ``world_size`` ranks drew ``consumed`` indices of
    its share of ``segments`` (stretches of the order, dealt out in turn as :meth:`StoreSampler.order` deals
    them); padding drawn at the end is not part of the order and is not left over."""
    total = sum(b - a for a, b in segments)
    share = total // world_size if drop_last else -(-total // world_size)
    left: list[tuple[int, int]] = []
    for r in range(world_size):
        lo, hi = r * share + min(consumed, share), min((r + 1) * share, total)
        at = 0  # where the segment begins among those dealt out
        for a, b in segments:
            s, e = max(lo, at), min(hi, at + b - a)
            if s < e:
                if left and left[-1][1] == a + s - at:
                    left[-1] = (left[-1][0], a + e - at)
                else:
                    left.append((a + s - at, a + e - at))
            at += b - a
    return left
