"""Decoded chunks shared by DataLoader workers: anonymous memory of 8 workers vs 1.

A local zstd zarr array read for one epoch (chunk-aware order) by a
DataLoader with 1 and with 8 worker processes, once with each process's own
decoded-chunk LRU (``cache=False``) and once with the disk cache, where
decoded chunks are uncompressed files every worker maps.  Each worker reports
its proportional anonymous memory (``Pss_Anon`` of ``/proc/self/smaps_rollup``,
so pages shared copy-on-write with the parent are split, not counted 8
times) with every batch; the table gives, summed over the workers, the growth
from each worker's first batch to its peak, and the total at the end.

    python benchmarks/bench_shared_chunks.py
    python benchmarks/bench_shared_chunks.py --rows 200000 --workers 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import unistore as us  # noqa: E402
from unistore.datasets import StoreDataset, make_loader  # noqa: E402


def pss_anon() -> int:
    """Proportional anonymous memory of this process, in bytes."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss_Anon in /proc/self/smaps_rollup (Linux >= 5.1 needed)")


class MemoryReportingDataset(StoreDataset):
    """Rows of the store, plus the reading worker's pid and ``Pss_Anon`` with every batch."""

    def _get_batch(self, indices: np.ndarray) -> Any:
        import torch

        batch = super()._get_batch(indices)
        batch["pid"] = torch.full((len(indices),), os.getpid())
        batch["pss_anon"] = torch.full((len(indices),), pss_anon())
        return batch


def epoch(url: str, cache: Any, workers: int, chunk: int) -> dict[str, float]:
    ds = MemoryReportingDataset(us.open_store(url, cache=cache))
    loader = make_loader(ds, 256, seed=0, num_workers=workers, chunk_rows=chunk)
    first: dict[int, int] = {}
    peak: dict[int, int] = {}
    last: dict[int, int] = {}
    rows = 0
    t = time.perf_counter()
    for batch in loader:
        pid, mem = int(batch["pid"][0]), int(batch["pss_anon"][0])
        first.setdefault(pid, mem)
        peak[pid] = max(peak.get(pid, 0), mem)
        last[pid] = mem
        rows += len(batch["x"])
    elapsed = time.perf_counter() - t
    return {"workers": len(first), "growth": sum(peak[p] - first[p] for p in first), "total": sum(last.values()),
            "rows/s": rows / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    data = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
    with tempfile.TemporaryDirectory() as work:
        url = os.path.join(work, "emb.zarr")
        with us.create_store(url, format="zarr") as store:
            store.write_array("x", data, chunks=(args.chunk, args.dim), compression="zstd")
        print(f"# Anonymous memory of DataLoader workers reading a zstd zarr array, {args.rows} x {args.dim} float32 "
              f"({data.nbytes / 1e6:.0f} MB decoded), one epoch, chunk-aware order\n")
        print("| decoded chunks kept | workers | growth, all workers (MB) | Pss_Anon at end, all workers (MB) "
              "| rows/s |")
        print("|---|---|---|---|---|")
        results = {}
        modes = ("per process (cache=False)", "disk cache, epoch 1 (decoding)", "disk cache, epoch 2 (mapped)")
        for label in modes:
            for workers in (1, args.workers):
                cache_arg = os.path.join(work, f"cache-{workers}") if "disk" in label else False
                r = epoch(url, cache_arg, workers, args.chunk)
                results[(label, workers)] = r
                print(f"| {label} | {r['workers']} | {r['growth'] / 1e6:,.1f} | {r['total'] / 1e6:,.1f} "
                      f"| {r['rows/s']:,.0f} |")
        private = results[(modes[0], 1)]["growth"]
        for label in modes:
            print(f"\n{label}: {args.workers} workers' growth / 1 worker's with a private cache = "
                  f"{results[(label, args.workers)]['growth'] / max(private, 1):.2f}x")
        for label in modes:
            one, many = results[(label, 1)], results[(label, args.workers)]
            print(f"\n{label}: {args.workers} workers' growth / 1 worker's = "
                  f"{many['growth'] / max(one['growth'], 1):.2f}x; total Pss_Anon {args.workers} / 1 = "
                  f"{many['total'] / max(one['total'], 1):.2f}x")


if __name__ == "__main__":
    main()
