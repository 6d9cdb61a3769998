"""DataLoader workers share decoded chunks through the disk cache instead of each holding its own copy."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore.datasets import make_loader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_shared_chunks import MemoryReportingDataset  # noqa: E402

ROWS, DIM, CHUNK = 40_000, 384, 1000  # 61 MB decoded


def _growth(url: str, cache: Any) -> tuple[int, np.ndarray]:
    """Summed growth of the workers' Pss_Anon over one epoch, and the rows read in order of the sampler."""
    loader = make_loader(MemoryReportingDataset(us.open_store(url, cache=cache)), 500, seed=0, num_workers=2,
                         chunk_rows=CHUNK)
    first: dict[int, int] = {}
    peak: dict[int, int] = {}
    rows = []
    for batch in loader:
        pid, mem = int(batch["pid"][0]), int(batch["pss_anon"][0])
        first.setdefault(pid, mem)
        peak[pid] = max(peak.get(pid, 0), mem)
        rows.append(batch["x"].numpy())
    assert len(first) == 2
    return sum(peak[p] - first[p] for p in first), np.concatenate(rows)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's smaps_rollup")
def test_workers_map_decoded_chunks_instead_of_copying_them(tmp_path: Any) -> None:
    data = np.random.default_rng(0).standard_normal((ROWS, DIM), dtype=np.float32)
    url = str(tmp_path / "x.zarr")
    with us.create_store(url, format="zarr") as store:
        store.write_array("x", data, chunks=(CHUNK, DIM), compression="zstd")
    order = np.concatenate(list(make_loader(us.datasets.StoreDataset(url), 500, seed=0, chunk_rows=CHUNK)
                                .batch_sampler))
    private, rows = _growth(url, False)
    np.testing.assert_array_equal(rows, data[order])
    assert private > 0.8 * data.nbytes  # each worker decoded most chunks into its own memory
    cache = str(tmp_path / "cache")
    first, rows = _growth(url, cache)  # decoding into the cache
    np.testing.assert_array_equal(rows, data[order])
    second, rows = _growth(url, cache)  # fresh workers mapping what the first epoch decoded
    np.testing.assert_array_equal(rows, data[order])
    assert first < 0.6 * private, (first, private)
    assert second < 0.15 * private, (second, private)
