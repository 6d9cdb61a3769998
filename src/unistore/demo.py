"""The main job (``make demo``): one embedding dataset in every format, read through ``take``.

Generates ``rows x dim`` float32 embeddings plus labels and ragged keyword
ids, writes them as npy, pt, safetensors, hdf5 and zarr (plus a raw memmap
dump as the baseline), reads random batches of 256 rows from each, and
prints bytes on disk, rows/s and the ratio to a raw numpy memmap.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: (label, format, file name, write options) for every store the demo writes.
DEMO_STORES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("npy", "npy", "emb_npy", {}),
    ("raw memmap via npy", "npy", "emb_raw", {}),
    ("pt (dir)", "pt", "emb_pt", {}),
    ("safetensors", "safetensors", "emb.safetensors", {}),
    ("hdf5 contiguous", "hdf5", "emb.h5", {}),
    ("hdf5 gzip", "hdf5", "emb_gzip.h5", {"compression": "gzip", "chunks": (256, None)}),
    ("zarr", "zarr", "emb.zarr", {}),
    ("zarr zstd", "zarr", "emb_zstd.zarr", {"compression": "zstd", "chunks": (256, None)}),
]


def make_dataset(rows: int, dim: int, seed: int = 0) -> dict[str, Any]:
    """Deterministic embeddings, labels and ragged keyword ids."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((rows, dim), dtype=np.float32)
    labels = rng.integers(0, 50, size=rows, dtype=np.int64)
    lengths = rng.integers(0, 6, size=min(rows, 10_000))
    keywords = [rng.integers(0, 1000, size=int(n)).tolist() for n in lengths]
    return {"embeddings": emb, "labels": labels, "keyword_ids": keywords}


def write_stores(workdir: str, data: dict[str, Any], progress: bool = True) -> dict[str, str]:
    """Write ``data`` in every demo format under ``workdir``; returns label -> URL."""
    from unistore.storage.store import create_store

    os.makedirs(workdir, exist_ok=True)
    urls = {}
    emb = data["embeddings"]
    for label, fmt, name, opts in DEMO_STORES:
        url = os.path.join(workdir, name)
        if label.startswith("raw"):
            os.makedirs(url, exist_ok=True)
            emb.tofile(os.path.join(url, "embeddings.npy"))  # headerless, as the ClusterLabeled layout
            urls[label] = url
            continue
        chunks = opts.get("chunks")
        if chunks:
            chunks = tuple(emb.shape[i] if c is None else c for i, c in enumerate(chunks))
        with create_store(url, format=fmt, overwrite=True) as store:
            store.write_array("embeddings", emb, chunks=chunks, compression=opts.get("compression"))
            store.write_array("labels", data["labels"])
            store.write_array("keyword_ids", data["keyword_ids"])
            store.attrs["description"] = "unistore demo embeddings"
        urls[label] = url
        if progress:
            print(f"  wrote {label:<20s} {url}", flush=True)
    return urls


def rows_per_second(read: Callable[[np.ndarray], Any], batches: list[np.ndarray], rounds: int = 3) -> float:
    """Best-of-``rounds`` rows/s of ``read`` over the same index batches."""
    best = float("inf")
    read(batches[0])  # warm up handles and page cache
    for _ in range(rounds):
        start = time.perf_counter()
        for idx in batches:
            read(idx)
        best = min(best, time.perf_counter() - start)
    return sum(len(b) for b in batches) / best


def disk_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run_demo(rows: int = 200_000, dim: int = 384, workdir: str = "demo-data", batches: int = 200,
             batch_size: int = 256, keep: bool = True) -> list[dict[str, Any]]:
    """Write the demo dataset in every format and print the read-speed table."""
    from unistore.storage.store import open_store

    print(f"unistore demo: {rows} x {dim} float32 embeddings, labels and ragged keyword ids -> {workdir}")
    data = make_dataset(rows, dim)
    urls = write_stores(workdir, data)
    rng = np.random.default_rng(1)
    index_batches = [rng.integers(0, rows, size=batch_size) for _ in range(batches)]

    raw_path = os.path.join(urls["raw memmap via npy"], "embeddings.npy")
    memmap = np.memmap(raw_path, dtype=np.float32, mode="r", shape=(rows, dim))
    baseline = rows_per_second(lambda idx: memmap[idx], index_batches)

    results = [{"format": "numpy memmap (baseline)", "bytes": disk_bytes(raw_path), "rows_s": baseline, "ratio": 1.0}]
    for label, _fmt, _name, _opts in DEMO_STORES:
        options: dict[str, Any] = {"raw": {"embeddings": ((-1, dim), "float32")}} if label.startswith("raw") else {}
        store = open_store(urls[label], **options)
        arr = store["embeddings"]
        got = arr.take(index_batches[0])
        if not np.array_equal(got, data["embeddings"][index_batches[0]]):
            raise AssertionError(f"{label}: take returned wrong rows")
        speed = rows_per_second(arr.take, index_batches)
        results.append({"format": label, "bytes": disk_bytes(urls[label]), "rows_s": speed, "ratio": speed / baseline})

    print()
    print(f"{'format':<26s} {'bytes on disk':>14s} {'rows/s':>12s} {'vs memmap':>10s}")
    for r in results:
        print(f"{r['format']:<26s} {r['bytes']:>14,d} {r['rows_s']:>12,.0f} {r['ratio']:>9.2f}x")
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return results
