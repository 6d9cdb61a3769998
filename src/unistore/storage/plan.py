"""The read planner: which rows become which byte ranges, blocks or chunk runs.

Pure functions over index arrays - no I/O, no state, every tuning knob an
argument (the defaults are :mod:`unistore.storage.budget`'s values at import;
the read path passes the current ones) - so each plan is tested without a
filesystem.  The engine plans, asks a byte source
for the ranges, and scatters the answer with :func:`scatter_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unistore.storage.budget import MAX_REQUEST_BYTES, MERGE_GAP_BYTES

__all__ = ["merge_ranges", "RowPlan", "plan_rows", "scatter_rows", "chunk_runs", "blocks_of", "block_runs",
           "touched_blocks"]


def merge_ranges(starts: np.ndarray, ends: np.ndarray, gap: int = MERGE_GAP_BYTES,
                 max_bytes: int = MAX_REQUEST_BYTES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge sorted ranges whose gap is at most ``gap`` into runs of at most about ``max_bytes``; returns run
    starts, run ends and the run of each range."""
    if not len(starts):
        return starts, ends, np.zeros(0, np.int64)
    gap = max(gap, 0)
    new_run = np.empty(len(starts), dtype=bool)
    new_run[:1] = True
    new_run[1:] = (starts[1:] - ends[:-1]) > gap
    run_id = np.cumsum(new_run) - 1
    if len(starts):  # cap run size so one request never balloons
        run_first = np.flatnonzero(new_run)
        span = ends - starts[run_first[run_id]]
        if span.max() > max_bytes:
            new_run[1:] |= (span[1:] // max_bytes) != (span[:-1] // max_bytes)
            run_id = np.cumsum(new_run) - 1
    firsts = np.flatnonzero(new_run)
    lasts = np.append(firsts[1:], len(starts)) - 1
    return starts[firsts], ends[lasts], run_id


@dataclass(frozen=True)
class RowPlan:
    """How rows of ``row`` bytes at ``offset`` are read as merged ranges: the distinct rows (``unique``) and where
    each asked row is among them (``inverse``), the ranges to read (``starts``/``ends``), and each distinct
    row's byte position in the ranges read back to back (``pos``)."""

    row: int
    unique: np.ndarray
    inverse: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    pos: np.ndarray


def plan_rows(offset: int, row: int, indices: np.ndarray, gap: int = MERGE_GAP_BYTES,
              max_bytes: int = MAX_REQUEST_BYTES) -> RowPlan:
    """The ranges that read rows ``indices`` (any order, repeats allowed) of an uncompressed array."""
    unique, inverse = np.unique(indices, return_inverse=True)
    starts = offset + unique * row
    run_starts, run_ends, run_id = merge_ranges(starts, starts + row, gap, max_bytes)
    run_base = np.concatenate([[0], np.cumsum(run_ends - run_starts)[:-1]]).astype(np.int64)
    pos = run_base[run_id] + (starts - run_starts[run_id])
    return RowPlan(row, unique, inverse.ravel(), run_starts, run_ends, pos)


def scatter_rows(plan: RowPlan, blobs: list[bytes]) -> np.ndarray:
    """The asked rows, ``(len(indices), row)`` uint8 in the order asked, out of the ranges of ``plan`` read
    back (one bytes-like object per range).

    Every range holds whole rows (a merged gap is whole rows too), so read back to back the ranges are a
    ``(rows, row)`` array and each asked row is one row of it: a single copy out.
    """
    buf = np.frombuffer(blobs[0] if len(blobs) == 1 else b"".join(blobs), dtype=np.uint8)
    row = plan.row
    return buf.reshape(-1, row).take((plan.pos // row)[plan.inverse], axis=0)


def chunk_runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """Sorted chunk ids as runs of consecutive ids: ``[(first, last + 1), ...]``."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(ids, breaks)]


def blocks_of(starts: np.ndarray, ends: np.ndarray, bs: int) -> np.ndarray:
    """Sorted unique numbers of the blocks of ``bs`` bytes that byte ranges ``[starts, ends)`` touch."""
    if not len(starts):
        return np.zeros(0, np.int64)
    first = starts // bs
    last = (np.maximum(ends, starts + 1) - 1) // bs
    if int((last - first).max()) <= 1:  # ranges smaller than a block: each touches one or two
        return np.unique(np.concatenate([first, last]))
    return np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first.tolist(), last.tolist())]))


def block_runs(blocks: np.ndarray, bs: int, size: int, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges covering consecutive runs of block numbers (sorted, unique), ``max_blocks`` at most each, in an
    object of ``size`` bytes."""
    new = np.ones(len(blocks), dtype=bool)
    new[1:] = np.diff(blocks) != 1
    run_id = np.cumsum(new) - 1
    pos = np.arange(len(blocks)) - np.flatnonzero(new)[run_id]  # position within its run
    new |= pos % max_blocks == 0
    firsts = blocks[new]
    lasts = blocks[np.append(np.flatnonzero(new)[1:], len(blocks)) - 1]
    return firsts * bs, np.minimum((lasts + 1) * bs, size)


def touched_blocks(nblocks: int, starts: np.ndarray, row: int, bs: int) -> np.ndarray:
    """Sorted numbers of the blocks that rows of ``row`` bytes starting at ``starts`` touch, in an object of
    ``nblocks`` blocks of ``bs`` bytes."""
    if row > bs or nblocks > 1 << 16:
        return blocks_of(starts, starts + row, bs)
    seen = np.zeros(nblocks, dtype=bool)  # a mask of the object's blocks costs less than sorting the rows'
    seen[starts // bs] = True
    seen[(starts + row - 1) // bs] = True
    return np.flatnonzero(seen)
