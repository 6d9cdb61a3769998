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


#: rounds of the read-speed table; each reader's figure is its best round
ROUNDS = 3


def best_rows_per_second(readers: dict[str, Callable[[np.ndarray], Any]], batches: list[np.ndarray],
                         rounds: int = ROUNDS, progress: bool = True) -> dict[str, float]:
    """Rows/s of each reader over the same index batches: the best of ``rounds`` rounds taken in turn (every
    reader once per round), so a machine that slows down for a while slows every reader's round alike
    instead of one reader's figure."""
    from tqdm.auto import tqdm

    best = dict.fromkeys(readers, float("inf"))
    for read in readers.values():
        read(batches[0])  # warm up handles and page cache
    bar = tqdm(total=rounds * len(readers), desc="reading", unit="reader", leave=False,
               disable=not progress or None)
    for _ in range(rounds):
        for name, read in readers.items():
            start = time.perf_counter()
            for idx in batches:
                read(idx)
            best[name] = min(best[name], time.perf_counter() - start)
            bar.update(1)
    bar.close()
    rows = sum(len(b) for b in batches)
    return {name: rows / seconds for name, seconds in best.items()}


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
    baseline_name = "numpy memmap (baseline)"
    readers: dict[str, Callable[[np.ndarray], Any]] = {baseline_name: lambda idx: memmap[idx]}
    for label, _fmt, _name, _opts in DEMO_STORES:
        options: dict[str, Any] = {"raw": {"embeddings": ((-1, dim), "float32")}} if label.startswith("raw") else {}
        arr = open_store(urls[label], **options)["embeddings"]
        got = arr.take(index_batches[0])
        if not np.array_equal(got, data["embeddings"][index_batches[0]]):
            raise AssertionError(f"{label}: take returned wrong rows")
        readers[label] = arr.take
    print(f"\nreading {batches} random batches of {batch_size} rows from each, best of {ROUNDS} rounds taken in turn")
    speeds = best_rows_per_second(readers, index_batches)
    baseline = speeds[baseline_name]
    results = [{"format": baseline_name, "bytes": disk_bytes(raw_path), "rows_s": baseline, "ratio": 1.0}]
    results += [{"format": label, "bytes": disk_bytes(urls[label]), "rows_s": speeds[label],
                 "ratio": speeds[label] / baseline} for label, *_ in DEMO_STORES]

    print()
    print(f"{'format':<26s} {'bytes on disk':>14s} {'rows/s':>12s} {'vs memmap':>10s}")
    for r in results:
        print(f"{r['format']:<26s} {r['bytes']:>14,d} {r['rows_s']:>12,.0f} {r['ratio']:>9.2f}x")
    print("(chunked formats decode whole chunks: they are the slower rows above. The ratios move by about a tenth "
          "between runs on a busy machine; each is its reader's best round.)")
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def closing_words(workdir: str) -> str:
    """Where the demo's data is, how big, how to remove it, and what to try next."""
    from unistore.cli import human_size

    size = disk_bytes(workdir) if os.path.exists(workdir) else 0
    where = os.path.abspath(workdir)
    return "\n".join([
        "",
        f"The demo's data is in {where} ({human_size(size)}), with its catalog ({os.path.join(where, 'catalog.db')}).",
        f"Remove it with: rm -rf {workdir}" + ("   (make clean removes it and .venv)"
                                                if os.path.normpath(workdir) == "demo-data" else ""),
        "",
        "Try next:",
        f"  unistore info {os.path.join(workdir, 'emb_zstd.zarr')}        what a store holds",
        f"  unistore convert {os.path.join(workdir, 'emb_npy')} /tmp/emb.h5 --to hdf5   any format into any other",
        "  docs/reads.md (reading and caching), docs/training.md (training from a bucket); make docs builds the site",
    ])
