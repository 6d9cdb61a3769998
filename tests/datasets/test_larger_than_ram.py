"""A JASPER dataset of more than 3 GB trains through use_mmap=True with a small, flat anonymous footprint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

from unistore.storage.layout import preallocate

N_PAIRS, DIM, N_NEG = 600_000, 384, 4
N_Q, N_S, N_C = 100_000, 200_000, 50
RSS_ANON_LIMIT_MB = 400
NEEDS_FREE = 5 * 1000**3


def _write(path: str, name: str, shape: tuple[int, ...], dtype: Any, fill: Any) -> None:
    """A real .npy written block by block with numpy's own open_memmap (never the whole array in RAM).

    The file's blocks are allocated before the map is written: a full disk then raises DiskFullError here
    instead of killing the test process with SIGBUS on a page of a sparse file.
    """
    file = os.path.join(path, f"{name}.npy")
    out = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
    preallocate(file, f"test data {name}")
    step = max(1, (64 << 20) // (int(np.prod(shape[1:])) * np.dtype(dtype).itemsize))
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        out[start:stop] = fill(start, stop)
    out.flush()
    del out


@pytest.mark.slow
def test_iterating_a_3gb_dataset_keeps_rss_anon_small(tmp_path: Any) -> None:
    root = str(tmp_path / "large")
    os.makedirs(root)
    free = shutil.disk_usage(root).free
    assert free > NEEDS_FREE, (f"this test writes a 3.3 GB dataset under {root}, which has {free / 1e9:.1f} GB free; "
                               f"free {NEEDS_FREE / 1e9:.0f} GB there (or point --basetemp elsewhere)")
    try:
        _check_large_dataset(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # 3.3 GB is not left behind for pytest's kept temp folders


def _check_large_dataset(root: str) -> None:
    rng = np.random.default_rng(0)

    def floats(rows: int) -> Any:
        return lambda a, b: rng.random((b - a, DIM), dtype=np.float32)

    _write(root, "question_embs", (N_Q, DIM), np.float32, floats(N_Q))
    _write(root, "source_embs", (N_S, DIM), np.float32, floats(N_S))
    _write(root, "centroid_embs", (N_C, DIM), np.float32, floats(N_C))
    for name in ("steering_centroid", "steering_keyword_weighted", "steering_residual"):
        _write(root, name, (N_PAIRS, DIM), np.float32, floats(N_PAIRS))
    _write(root, "pair_index", (N_PAIRS, 2), np.int64,
           lambda a, b: np.stack([rng.integers(0, N_Q, b - a), rng.integers(0, N_S, b - a)], axis=1))
    _write(root, "pair_cluster_id", (N_PAIRS,), np.int64, lambda a, b: rng.integers(0, N_C, b - a))
    _write(root, "pair_relevance", (N_PAIRS,), np.float32, lambda a, b: rng.random(b - a, dtype=np.float32))
    _write(root, "centroid_distances", (N_PAIRS,), np.float32, lambda a, b: rng.random(b - a, dtype=np.float32))
    _write(root, "hard_negatives", (N_PAIRS, N_NEG), np.int64, lambda a, b: rng.integers(0, N_S, (b - a, N_NEG)))
    _write(root, "negative_tiers", (N_PAIRS, N_NEG), np.int64, lambda a, b: rng.integers(0, 3, (b - a, N_NEG)))
    _write(root, "train_idx", (N_PAIRS,), np.int64, lambda a, b: np.arange(a, b))
    total = sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root))
    assert total >= 3 * 1024**3

    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from unistore.datasets import create_loader, set_epoch

        def rss_anon_mb():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024

        loader = create_loader({root!r}, "train", batch_size=2048, use_mmap=True, seed=1)
        set_epoch(loader, 45)  # late curriculum: all three steering arrays are read
        peak, rows, checksum = rss_anon_mb(), 0, 0.0
        for batch in loader:
            rows += len(batch["question_emb"])
            checksum += float(batch["steering"][:, 0].sum())
            peak = max(peak, rss_anon_mb())
        print(json.dumps({{"rows": rows, "peak": peak, "mmap": loader.dataset_obj.use_mmap,
                           "held_mb": loader.dataset_obj._compute_memory_usage(), "checksum": checksum}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == N_PAIRS and result["mmap"] is True
    assert result["checksum"] > 0
    assert result["peak"] < RSS_ANON_LIMIT_MB, f"RssAnon peaked at {result['peak']:.0f} MB for {total / 1e9:.1f} GB"
    print(f"\n{total / 1e9:.2f} GB dataset, {result['rows']} pairs: RssAnon peak {result['peak']:.0f} MB, "
          f"dataset holds {result['held_mb']:.1f} MB")
