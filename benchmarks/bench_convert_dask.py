"""Conversion on Dask: a .pt directory -> zarr zstd, single process vs a 2-worker LocalCluster.

Reports wall time of each and their ratio, the peak RSS of each Dask worker
process, and source bytes read / source size.

    python benchmarks/bench_convert_dask.py              # 4 GB source
    python benchmarks/bench_convert_dask.py --gb 0.5     # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import unistore as us  # noqa: E402


def write_pt_dir(path: str, gb: float, dim: int = 384, arrays: int = 4) -> int:
    import torch

    os.makedirs(path)
    rows = int(gb * 1e9 / arrays / (dim * 4))
    rng = np.random.default_rng(0)
    for i in range(arrays):
        data = rng.standard_normal((rows, dim), dtype=np.float32)
        torch.save(torch.from_numpy(data), os.path.join(path, f"emb{i}.pt"))
        del data
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the forking parent's peak over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=4.0, help="size of the .pt source")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from dask.distributed import Client, LocalCluster

    workdir = tempfile.mkdtemp(prefix="unistore-bench-dask-")
    try:
        src = os.path.join(workdir, "src_pt")
        size = write_pt_dir(src, args.gb)
        print(f"source: {size / 1e9:.2f} GB .pt directory (4 arrays)")
        t = time.perf_counter()
        us.convert(src, os.path.join(workdir, "single.zarr"), "zarr", compression="zstd")
        single = time.perf_counter() - t
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            t = time.perf_counter()
            report = us.convert(src, os.path.join(workdir, "dask.zarr"), "zarr", compression="zstd",
                                scheduler=client)
            parallel = time.perf_counter() - t
            rss = sorted(client.run(peak_rss_mb).values())
        a, b = us.open_store(os.path.join(workdir, "single.zarr")), us.open_store(os.path.join(workdir, "dask.zarr"))
        assert a.checksums == b.checksums
        print("\n| path | wall s | vs single | peak RSS per worker | source bytes read / size |")
        print("|---|---|---|---|---|")
        print(f"| single process | {single:.1f} | 1.00x | - | - |")
        print(f"| LocalCluster, {args.workers} workers | {parallel:.1f} | {single / parallel:.2f}x | "
              f"{', '.join(f'{r:.0f} MB' for r in rss)} | {report.source_bytes_read / report.src_bytes:.3f} |")
        print(f"\nblocks copied {report.blocks_copied}, checksums equal to the single-process result")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
