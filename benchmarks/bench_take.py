"""Ratio benchmark of the read path: ``take`` vs raw memmap and vs each format's own library.

One run, one machine: every number is a ratio of speeds measured side by side
on the same random batches (default 200k x 384 float32, batches of 256 rows).
Then, against a local S3 protocol server (moto), requests and bytes fetched
per batch for each format.

    python benchmarks/bench_take.py                 # full run (~3 min)
    python benchmarks/bench_take.py --rows 20000    # quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import numpy as np

import unistore as us
from unistore.demo import best_rows_per_second


def rows_per_second(read: Any, batches: list[np.ndarray], rounds: int = 1) -> float:
    """Best rows/s of one reader over ``batches`` in ``rounds`` rounds."""
    return best_rows_per_second({"read": read}, batches, rounds=rounds, progress=False)["read"]


def paired(take: Any, baseline: Any, batches: list[np.ndarray], rounds: int = 15) -> tuple[float, float]:
    """Best rows/s of ``take`` and ``baseline``, alternating round by round."""
    best_take = best_base = 0.0
    for _ in range(rounds):
        best_base = max(best_base, rows_per_second(baseline, batches, rounds=1))
        best_take = max(best_take, rows_per_second(take, batches, rounds=1))
    return best_take, best_base


def native_readers(workdir: str, urls: dict[str, str], rows: int, dim: int) -> dict[str, Any]:
    """Each format's own fastest random-row call, for the 'vs library' column."""
    import h5py
    import torch
    import zarr
    from safetensors import safe_open

    npy = np.load(os.path.join(urls["npy"], "embeddings.npy"), mmap_mode="r")
    pt = torch.load(os.path.join(urls["pt"], "embeddings.pt"), mmap=True, weights_only=True)
    st = safe_open(urls["safetensors"], framework="np")
    st_slice = st.get_slice("embeddings")
    h5 = h5py.File(urls["hdf5"], "r")["embeddings"]
    h5gz = h5py.File(urls["hdf5 gzip"], "r")["embeddings"]
    z = zarr.open_group(urls["zarr"], mode="r")["embeddings"]
    zz = zarr.open_group(urls["zarr zstd"], mode="r")["embeddings"]

    def h5_fancy(ds: Any) -> Any:
        def read(idx: np.ndarray) -> Any:
            uniq, inverse = np.unique(idx, return_inverse=True)  # h5py needs increasing indices
            return ds[uniq][inverse]
        return read

    return {
        "npy": ("np.load(mmap_mode='r')[idx]", lambda idx: npy[idx]),
        "raw memmap": ("np.memmap[idx]", None),
        "pt": ("torch.load(mmap=True)[idx]", lambda idx: pt[torch.from_numpy(idx)]),
        "safetensors": ("safe_open().get_slice() per row", lambda idx: np.stack([st_slice[int(i):int(i) + 1][0]
                                                                                   for i in idx])),
        "hdf5": ("h5py fancy index", h5_fancy(h5)),
        "hdf5 gzip": ("h5py fancy index", h5_fancy(h5gz)),
        "zarr": ("zarr oindex", lambda idx: z.oindex[idx]),
        "zarr zstd": ("zarr oindex", lambda idx: zz.oindex[idx]),
    }


STORES = [  # label, format, name, chunks, compression
    ("npy", "npy", "npy", None, None),
    ("raw memmap", "npy", "raw", None, None),
    ("pt", "pt", "pt", None, None),
    ("safetensors", "safetensors", "emb.safetensors", None, None),
    ("hdf5", "hdf5", "emb.h5", None, None),
    ("hdf5 gzip", "hdf5", "gz.h5", 256, "gzip"),
    ("zarr", "zarr", "emb.zarr", 256, None),
    ("zarr zstd", "zarr", "zstd.zarr", 256, "zstd"),
]


def write_all(workdir: str, emb: np.ndarray) -> dict[str, str]:
    urls = {}
    for label, fmt, name, chunk_rows, compression in STORES:
        url = os.path.join(workdir, name)
        if label == "raw memmap":
            os.makedirs(url)
            emb.tofile(os.path.join(url, "embeddings.npy"))
        else:
            with us.create_store(url, format=fmt) as store:
                store.write_array("embeddings", emb, compression=compression,
                                  chunks=(chunk_rows, emb.shape[1]) if chunk_rows else None)
        urls[label] = url
    return urls


def open_array(url: str, label: str, dim: int, options: dict[str, Any] | None = None) -> Any:
    raw = {"raw": {"embeddings": ((-1, dim), "float32")}} if label == "raw memmap" else {}
    store = us.open_store(url, storage_options=options, **raw)
    return store, store["embeddings"]


def local_table(workdir: str, rows: int, dim: int, n_batches: int) -> list[list[str]]:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((rows, dim), dtype=np.float32)
    urls = write_all(workdir, emb)
    batches = [rng.integers(0, rows, 256) for _ in range(n_batches)]
    memmap = np.memmap(os.path.join(urls["raw memmap"], "embeddings.npy"), dtype=np.float32, mode="r",
                       shape=(rows, dim))
    natives = native_readers(workdir, urls, rows, dim)
    table = [["format", "take rows/s", "take / raw memmap", "library call", "library rows/s", "take / library"]]
    for label, *_ in STORES:
        _, arr = open_array(urls[label], label, dim)
        np.testing.assert_array_equal(arr.take(batches[0]), emb[batches[0]])
        arr[...]  # chunked formats: measure with their chunks cached (a second epoch)
        # baseline re-measured beside each format so drift in the machine cancels out
        speed, base = paired(arr.take, lambda idx: memmap[idx], batches)
        name, native = natives[label]
        if native is None:
            native_speed = base
        else:
            few = batches[: max(3, n_batches // 20)] if "get_slice" in name or "oindex" in name or "gzip" in label \
                else batches
            native_speed = rows_per_second(native, few, rounds=1 if few is not batches else 3)
        table.append([label, f"{speed:,.0f}", f"{speed / base:.2f}x", name, f"{native_speed:,.0f}",
                      f"{speed / native_speed:.1f}x"])
    table.append(["(raw numpy memmap)", f"{base:,.0f}", "1.00x", "", "", ""])
    return table


def s3_table(workdir: str, rows: int, dim: int, n_batches: int) -> list[list[str]]:
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"key": "bench", "secret": "bench",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    fs = s3fs.S3FileSystem(**options)
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((rows, dim), dtype=np.float32)
    local = write_all(os.path.join(workdir, "s3src"), emb)
    batches = [rng.integers(0, rows, 256) for _ in range(n_batches)]
    needed = 256 * dim * 4
    table = [["format", "requests / batch", "bytes / batch", "fetched / needed", "fraction of array"]]
    try:
        for label, *_ in STORES:
            remote = f"bench/{os.path.basename(local[label])}"
            if os.path.isdir(local[label]):
                fs.put(local[label] + "/", remote, recursive=True)
            else:
                fs.put_file(local[label], remote)
            store, arr = open_array(f"s3://{remote}", label, dim, options)
            from unistore.storage.cache import chunk_cache

            chunk_cache.clear()
            store.reset_io_stats()
            for idx in batches:
                np.testing.assert_array_equal(arr.take(idx), emb[idx])
                chunk_cache.clear()  # every batch cold: what one epoch costs
            stats = store.io_stats()
            req, nbytes = stats["requests"] / n_batches, stats["bytes"] / n_batches
            table.append([label, f"{req:.0f}", f"{nbytes:,.0f}", f"{nbytes / needed:.1f}x",
                          f"{nbytes / emb.nbytes:.2%}"])
    finally:
        server.stop()
    return table


def markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--s3-rows", type=int, default=20_000, help="rows of the S3 dataset (moto reads whole "
                        "objects per range request, so keep it modest)")
    parser.add_argument("--s3-batches", type=int, default=5)
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="unistore-bench-") as workdir:
        print(f"## local: {args.rows} x {args.dim} float32, batches of 256 random rows\n", flush=True)
        print(markdown(local_table(workdir, args.rows, args.dim, args.batches)), flush=True)
        if not args.skip_s3:
            print(f"\n## S3 protocol server (moto): {args.s3_rows} x {args.dim} float32, "
                  f"{args.s3_batches} cold batches of 256 rows\n", flush=True)
            print(markdown(s3_table(workdir, args.s3_rows, args.dim, args.s3_batches)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
