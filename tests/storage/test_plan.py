"""The read planner (unistore.storage.plan): pure functions, tested without a filesystem."""

from __future__ import annotations

import numpy as np
import pytest

from unistore.storage.plan import (
    block_runs,
    blocks_of,
    chunk_runs,
    merge_ranges,
    plan_rows,
    scatter_rows,
    touched_blocks,
)


def test_ranges_closer_than_the_gap_merge_and_runs_stay_bounded() -> None:
    starts = np.array([0, 100, 10_000, 10_050], np.int64)
    ends = starts + 50
    run_starts, run_ends, run_id = merge_ranges(starts, ends, gap=60, max_bytes=1 << 20)
    assert run_starts.tolist() == [0, 10_000] and run_ends.tolist() == [150, 10_100]
    assert run_id.tolist() == [0, 0, 1, 1]
    # gap 0 merges only touching ranges; a cap of 100 bytes splits a long run
    assert merge_ranges(starts, ends, gap=0)[0].tolist() == [0, 100, 10_000]  # the last two touch
    touching = np.arange(0, 1000, 50, dtype=np.int64)
    run_starts, run_ends, _ = merge_ranges(touching, touching + 50, gap=0, max_bytes=200)
    assert (run_ends - run_starts).max() <= 200 and run_starts[0] == 0 and run_ends[-1] == 1000
    assert merge_ranges(np.zeros(0, np.int64), np.zeros(0, np.int64))[0].size == 0


@pytest.mark.parametrize("gap", [0, 16, 1 << 20])
def test_rows_planned_then_scattered_come_back_in_the_order_asked(gap: int) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, size=(500, 12), dtype=np.uint8)
    blob = b"HEADER" + data.tobytes()
    indices = rng.integers(0, 500, size=300)  # repeats, any order
    plan = plan_rows(6, 12, indices, gap=gap, max_bytes=4096)
    assert np.all(plan.ends - plan.starts <= 4096 + 12)
    # ranges (and the gaps merged into them) are whole rows: read back to back, every row starts at a multiple
    # of the row size, which is what lets scatter_rows copy rows out in one pass
    assert np.all((plan.ends - plan.starts) % 12 == 0) and np.all(plan.pos % 12 == 0)
    read = [blob[s:e] for s, e in zip(plan.starts.tolist(), plan.ends.tolist())]
    np.testing.assert_array_equal(scatter_rows(plan, read), data[indices])
    # the requests cover exactly the distinct rows when nothing is merged across a gap
    if gap == 0:
        assert sum(e - s for s, e in zip(plan.starts, plan.ends)) <= 12 * len(np.unique(indices))


def test_consecutive_rows_are_one_range() -> None:
    plan = plan_rows(0, 8, np.arange(10, 20))
    assert plan.starts.tolist() == [80] and plan.ends.tolist() == [160]


def test_chunk_runs_and_blocks() -> None:
    assert chunk_runs(np.array([0, 1, 2, 5, 6, 9])) == [(0, 3), (5, 7), (9, 10)]
    assert chunk_runs(np.zeros(0, np.int64)) == []
    starts = np.array([0, 1000, 5000], np.int64)
    assert blocks_of(starts, starts + 10, 1024).tolist() == [0, 4]
    assert blocks_of(np.array([1000]), np.array([5000]), 1024).tolist() == [0, 1, 2, 3, 4]
    assert blocks_of(np.array([1020]), np.array([1030]), 1024).tolist() == [0, 1]  # a row across a boundary
    assert touched_blocks(8, starts, 10, 1024).tolist() == [0, 4]
    assert touched_blocks(8, np.array([1020]), 10, 1024).tolist() == [0, 1]


def test_block_runs_cover_consecutive_blocks_up_to_the_limit_and_the_object_end() -> None:
    s, e = block_runs(np.array([0, 1, 2, 3, 7, 8]), 100, 850, max_blocks=3)
    assert s.tolist() == [0, 300, 700] and e.tolist() == [300, 400, 850]
