"""The ratio benchmark runs as its docs say (a small array, local formats only) and prints a row per format."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_take_prints_a_ratio_for_every_format() -> None:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_take.py"), "--skip-s3",
                          "--rows", "3000", "--batches", "10"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {cells[1].strip(): cells for cells in (line.split("|") for line in out.stdout.splitlines())
            if len(cells) > 3 and cells[3].strip().endswith("x")}
    assert set(rows) == {"npy", "raw memmap", "pt", "safetensors", "hdf5", "hdf5 gzip", "zarr", "zarr zstd",
                         "(raw numpy memmap)"}, out.stdout
    for cells in rows.values():
        assert float(cells[3].strip().rstrip("x")) > 0
