"""Dataset benchmark: DataLoader throughput of the seed dataset classes, as ratios measured in one run.

1. ClusterLabeledDataset (200k x 384, 50 clusters, batch 256, shuffled) against
   a faithful re-implementation of the seed's per-sample path (sqlite3 query +
   pickled labels + np.memmap + LRU cache, one sample at a time) on the same
   files.  Target: >= 5x.
2. JASPERSteeringDataset batches/s from each format through the mmap path,
   divided by the same batches from tensors preloaded in RAM.  Target: >= 0.5x
   for uncompressed formats.

    python benchmarks/bench_datasets.py                 # full size
    python benchmarks/bench_datasets.py --rows 20000     # quicker
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.datasets.builders import make_jasper, write_cluster_seed, write_jasper_pt  # noqa: E402
from unistore.datasets import (  # noqa: E402
    ClusterLabeledDataset,
    JASPERSteeringDataset,
    collate,
    copy_dataset,
    make_loader,
)


class SeedClusterLabeledDataset(Dataset):  # type: ignore[type-arg]
    """The seed's mechanism: one SQLite query, three unpickles and two memmap reads per sample, LRU cached."""

    def __init__(self, dataset_dir: str, label_type: str = "combined", cache_size: int = 1000):
        self.db_path = os.path.join(dataset_dir, "dataset.db")
        self.label_type = label_type
        self._cache_size = cache_size
        self._sample_cache: OrderedDict[int, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.conn = sqlite3.connect(self.db_path, check_same_thread=False)
        info = dict(self.conn.execute("SELECT key, value FROM dataset_info").fetchall())
        n, dim = int(info["dataset_size"]), int(info["embedding_dim"])
        self.n_clusters = int(info["n_clusters"])
        self.sample_ids = [r[0] for r in self.conn.execute("SELECT sample_id FROM samples ORDER BY sample_id")]
        self.base = np.memmap(os.path.join(dataset_dir, "base_embeddings.npy"), np.float32, "r", shape=(n, dim))
        self.steering = np.memmap(os.path.join(dataset_dir, "steering_embeddings.npy"), np.float32, "r",
                                  shape=(n, dim))

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, idx: int) -> Any:
        with self._cache_lock:
            if idx in self._sample_cache:
                self._sample_cache.move_to_end(idx)
                return self._sample_cache[idx]
        row = self.conn.execute(
            "SELECT embedding_idx, source_label, steering_label, combined_label FROM samples WHERE sample_id = ?",
            (self.sample_ids[idx],)).fetchone()
        labels = {"source": pickle.loads(row[1]), "steering": pickle.loads(row[2]), "combined": pickle.loads(row[3])}
        sample = (torch.from_numpy(np.array(self.base[row[0]])), torch.from_numpy(np.array(self.steering[row[0]])),
                  torch.from_numpy(labels[self.label_type].astype(np.float32)))
        with self._cache_lock:
            self._sample_cache[idx] = sample
            if len(self._sample_cache) > self._cache_size:
                self._sample_cache.popitem(last=False)
        return sample


ROUNDS = 3


def batches_per_second(loader: Any, batches: int) -> float:
    """Best of :data:`ROUNDS` timed runs of ``batches`` full batches, after one untimed run (handles, caches)."""
    best = 0.0
    for round_ in range(ROUNDS + 1):
        it = iter(loader)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        if round_:
            best = max(best, batches / (time.perf_counter() - start))
    return best


def bench_cluster(workdir: str, rows: int, batches: int) -> list[tuple[str, float]]:
    path = os.path.join(workdir, "clusters")
    t = time.perf_counter()
    write_cluster_seed(path, n=rows, dim=384, n_clusters=50)
    print(f"  wrote the seed layout ({rows} x 384, 50 clusters) in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    ours = ClusterLabeledDataset(path)
    print(f"  first open (legacy import into the catalog) {time.perf_counter() - t:.1f} s")
    seed = SeedClusterLabeledDataset(path)

    def loader(ds: Any, **kw: Any) -> Any:
        return DataLoader(ds, batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(0), **kw)

    def samples_per_second(ds: Any, **kw: Any) -> float:
        return 256 * batches_per_second(loader(ds, **kw), batches)

    base = samples_per_second(seed)
    results = [("seed per-sample path (sqlite3 + pickle + memmap + LRU)", base),
               ("ClusterLabeledDataset, plain DataLoader", samples_per_second(ours)),
               ("ClusterLabeledDataset, collate_fn=unistore.datasets.collate",
                samples_per_second(ours, collate_fn=collate))]
    print(f"\nClusterLabeledDataset, {rows} x 384, 50 clusters, batch 256 shuffled, {batches} batches")
    print("| loop | samples/s | vs seed |\n|---|---|---|")
    for name, speed in results:
        print(f"| {name} | {speed:,.0f} | {speed / base:.1f}x |")
    return results


def bench_jasper(workdir: str, pairs: int, batches: int) -> list[tuple[str, float]]:
    data = make_jasper(n_q=pairs // 5, n_s=pairs // 2, n_k=1000, n_c=50, n_pairs=pairs, dim=384, n_neg=5)
    pt = write_jasper_pt(os.path.join(workdir, "jasper-pt"), data)
    dirs = {"pt": pt}
    for label, fmt, opts in (("npy", "npy", {}), ("safetensors", "safetensors", {}), ("hdf5", "hdf5", {}),
                             ("hdf5 gzip", "hdf5", {"compression": "gzip", "chunks": (256,)}),
                             ("zarr", "zarr", {"chunks": (256,)}),
                             ("zarr zstd", "zarr", {"compression": "zstd", "chunks": (256,)})):
        dirs[label] = copy_dataset(pt, os.path.join(workdir, f"jasper-{label.replace(' ', '-')}"), fmt, **opts)

    def rate(ds: Any) -> float:
        ds.set_epoch(45)
        # the first, untimed run warms page cache and chunk caches, as in a second epoch
        return batches_per_second(make_loader(ds, 256, shuffle=True, seed=0), batches)

    preloaded = rate(JASPERSteeringDataset(pt, "train", use_mmap=False))
    print(f"\nJASPERSteeringDataset, {pairs} pairs x 384, n_neg 5, batch 256 (late curriculum), {batches} batches")
    print("| format | batches/s (mmap path) | vs preloaded in RAM |\n|---|---|---|")
    results = [("preloaded in RAM (pt)", preloaded)]
    print(f"| preloaded in RAM (pt) | {preloaded:,.0f} | 1.00x |")
    for label, path in dirs.items():
        speed = rate(JASPERSteeringDataset(path, "train", use_mmap=True))
        results.append((label, speed))
        print(f"| {label} | {speed:,.0f} | {speed / preloaded:.2f}x |")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="ClusterLabeled samples")
    parser.add_argument("--pairs", type=int, default=100_000, help="JASPER pairs")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--skip-jasper", action="store_true")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="unistore-bench-datasets-")
    try:
        if not args.skip_cluster:
            bench_cluster(workdir, args.rows, args.batches)
        if not args.skip_jasper:
            bench_jasper(workdir, args.pairs, args.batches)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
