"""Training from a bucket: bytes fetched per epoch, the disk cache, and the chunk-aware order.

1. A compressed zarr array (zstd, 250-row chunks) on the S3 server behind a
   counting proxy: bytes fetched per epoch / stored bytes for a plain shuffle
   and for the chunk-aware order (``StoreSampler(chunk_rows=...)``), with 1
   and 16 ranks (each rank a fresh process-like open: own chunk cache, no disk
   cache), figures from the proxy.
2. The same array with the persistent disk cache: requests and bytes at the
   wire in epoch 1 and epoch 2.
3. What the chunk-aware order gives up: source chunks mixed per batch, distance
   between consecutive samples in the source, correlation of epoch position and row.
4. DataLoader samples/s (2 workers, chunk-aware, read-ahead, disk cache) from
   S3 with 30 ms added per request, divided by the same from local disk,
   epochs 1 and 2 (npy and zarr zstd), with the machine's CPU use in epoch 1,
   and epoch 1 again with memory warmed (page cache filled and freed just before), with
   what this machine charges for memory it has not used lately.
   The S3 server runs in a process of its own (``benchmarks/s3_server.py``).
5. Locally, a zstd zarr array 4x larger than the decoded-chunk cache
   (``UNISTORE_CHUNK_CACHE_BYTES``): shuffled-epoch rows/s divided by a raw
   memmap's, plain vs chunk-aware order; then with decoded chunks kept in the
   disk cache (epoch 1 decodes into it, later epochs map it).

    python benchmarks/bench_remote_training.py
    python benchmarks/bench_remote_training.py --rows 50000 --ranks 8
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

from wire import cpu_busy, s3_behind_proxy  # noqa: E402

import unistore as us  # noqa: E402
from unistore.datasets import StoreSampler  # noqa: E402
from unistore.storage.cache import (
    DiskCache,  # noqa: E402
    chunk_cache,  # noqa: E402
)

BATCH = 256


def run_epoch(arr: Any, order: np.ndarray) -> float:
    t = time.perf_counter()
    for i in range(0, len(order), BATCH):
        arr.take(order[i:i + BATCH])
    return len(order) / (time.perf_counter() - t)


def orders(n: int, chunk: int, ranks: int, chunk_aware: bool, epoch: int = 0) -> list[np.ndarray]:
    out = []
    for r in range(ranks):
        s = StoreSampler(n, seed=0, rank=r, world_size=ranks, chunk_rows=chunk if chunk_aware else None)
        s.set_epoch(epoch)
        out.append(np.array(list(s)))
    return out


def _quality(parts: list[np.ndarray], chunk: int) -> list[str]:
    """Per rank, averaged: distinct chunks per batch, median distance between consecutive rows, and the rank
    correlation of a sample's position in the rank's order with its row."""
    per_batch, dist, corr = [], [], []
    for order in parts:
        per_batch += [len(np.unique(order[i:i + BATCH] // chunk)) for i in range(0, len(order), BATCH)]
        dist.append(np.median(np.abs(np.diff(order))))
        ranks = np.argsort(np.argsort(order))
        corr.append(abs(np.corrcoef(np.arange(len(order)), ranks)[0, 1]))
    return [f"{np.mean(per_batch):.1f}", f"{np.mean(dist):,.0f}", f"{np.mean(corr):.3f}"]


def shuffle_quality(n: int, chunk: int) -> None:
    """What the chunk-aware order gives up, at 1, 8 and 64 ranks and after a run stopped at 8 ranks resumes at
    6: how many source chunks a batch mixes, how far apart consecutive samples are in the source, and how
    much a rank's order follows the source's."""
    rows = [["order", "ranks", "distinct chunks per batch (mean)", "median distance between consecutive rows",
             "rank correlation of position and row"]]
    for name, aware in (("plain shuffle", False), ("chunk-aware (window 4)", True)):
        for ranks in (1, 8, 64):
            rows.append([name, str(ranks)] + _quality(orders(n, chunk, ranks, aware), chunk))
        first = [StoreSampler(n, seed=0, rank=r, world_size=8, chunk_rows=chunk if aware else None)
                 for r in range(8)]
        for s in first:
            it = iter(s)
            for _ in range(len(s) // 2):
                next(it)
        resumed = []
        for r in range(6):
            s = StoreSampler(n, seed=0, rank=r, world_size=6, chunk_rows=chunk if aware else None)
            s.load_state_dict(first[0].state_dict())
            resumed.append(s.order())
        rows.append([name, "8, resumed at 6 mid-epoch (its rest)"] + _quality(resumed, chunk))
    print(f"\n## Shuffle quality, {n} rows in {n // chunk} chunks of {chunk}, batches of {BATCH}\n")
    print(table(rows))


def table(rows: list[list[str]]) -> str:
    lines = [f"| {' | '.join(rows[0])} |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + [f"| {' | '.join(r)} |" for r in rows[1:]])


def remote_tables(work: str, data: np.ndarray, chunk: int, ranks: int) -> None:
    local = os.path.join(work, "remote-src.zarr")
    with us.create_store(local, format="zarr") as store:
        store.write_array("emb", data, chunks=(chunk, data.shape[1]), compression="zstd")
        store.commit()
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(local, "emb")) for f in fs
                 if f != "zarr.json")
    with s3_behind_proxy() as wire:
        proxy, options = wire.proxy, wire.options
        url = wire.upload(local, "emb.zarr")

        def chunk_bytes() -> int:
            return proxy.bytes_out

        rows = [["order", "ranks", "bytes fetched / stored (epoch, all ranks)", "GET requests"]]
        for chunk_aware in (False, True):
            for world in (1, ranks):
                proxy.reset_counts()
                for order in orders(len(data), chunk, world, chunk_aware):
                    chunk_cache.clear()  # each rank is its own process: its own decoded-chunk cache
                    arr = us.open_store(url, storage_options=options, cache=False)["emb"]
                    run_epoch(arr, order)
                rows.append(["chunk-aware" if chunk_aware else "plain shuffle", str(world),
                             f"{chunk_bytes() / stored:.2f}", str(proxy.requests["GET"])])
        print(f"\n## S3 (moto behind a counting proxy): zarr zstd {data.shape[0]} x {data.shape[1]}, {chunk}-row "
              f"chunks, {stored / 1e6:.1f} MB stored, batches of {BATCH}, decoded-chunk cache "
              f"{chunk_cache.max_bytes >> 20} MiB per rank\n")
        print(table(rows))

        cache = DiskCache(os.path.join(work, "disk-cache"))
        rows = [["epoch", "GET requests", "bytes at the wire / stored", "rows/s"]]
        for epoch in (1, 2):
            chunk_cache.clear()
            store = us.open_store(url, storage_options=options, cache=cache)
            proxy.reset_counts()
            rate = run_epoch(store["emb"], orders(len(data), chunk, 1, True, epoch)[0])
            chunk_gets = sum(n for (m, p), n in proxy.paths.items() if m == "GET" and "/c/" in p)
            rows.append([str(epoch), f"{proxy.requests['GET']} ({chunk_gets} for chunks)",
                         f"{proxy.bytes_out / stored:.3f}", f"{rate:,.0f}"])
        print(f"\n## The same, chunk-aware, with the persistent disk cache ({cache.root})\n")
        print(table(rows))


def many_ranks_table(work: str, world: int, dim: int = 96, chunk: int = 25) -> None:
    """``world`` ranks (fresh opens, each with its own chunk cache) over an array of 40 chunks per rank:
    bytes fetched by all ranks together / stored, and chunks a rank read outside its shard."""
    n = 40 * chunk * world
    data = np.random.default_rng(3).standard_normal((n, dim), dtype=np.float32)
    local = os.path.join(work, "ranks.zarr")
    with us.create_store(local, format="zarr") as store:
        store.write_array("emb", data, chunks=(chunk, dim), compression="zstd")
        store.commit()
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(local, "emb")) for f in fs
                 if f != "zarr.json")
    with s3_behind_proxy("ranks") as wire:
        url = wire.upload(local, "ranks.zarr")
        wire.proxy.reset_counts()
        reads = 0
        for order in orders(n, chunk, world, True):
            chunk_cache.clear()
            run_epoch(us.open_store(url, storage_options=wire.options, cache=False)["emb"], order)
            reads += len(np.unique(order // chunk))
        n_chunks = -(-n // chunk)
        print(f"\n## {world} ranks, chunk-aware, zarr zstd {n} x {dim} in {n_chunks} chunks of {chunk} rows "
              f"({stored / 1e6:.1f} MB stored), each rank a fresh open\n")
        print(f"bytes fetched by all ranks together / stored: {wire.proxy.bytes_out / stored:.3f} "
              f"({wire.proxy.requests['GET']} GETs); chunks read by two ranks (where shards meet): "
              f"{reads - n_chunks} of {n_chunks}")


def loader_epoch(dataset: Any, chunk_rows: int | None, epoch: int, read_ahead: int | str) -> float:
    from unistore.datasets import make_loader

    loader = make_loader(dataset, BATCH, seed=0, num_workers=2, chunk_rows=chunk_rows, read_ahead=read_ahead)
    loader.sampler.set_epoch(epoch)
    t = time.perf_counter()
    n = sum(len(b["x"]) for b in loader)
    return n / (time.perf_counter() - t)


def write_file(path: str, nbytes: int) -> float:
    """Seconds to write ``nbytes`` into a new file at ``path`` (2 MiB at a time)."""
    payload = np.ones(2 << 20, np.uint8)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(payload)):
            f.write(payload)
    return time.perf_counter() - t


def warm_memory(work: str, nbytes: int) -> None:
    """Write ``nbytes`` into a file and delete it, so that the next page-cache pages come from memory this
    machine has used a moment ago (see :func:`first_touch_cost`).

    Page-cache pages, not an anonymous array: warming with an array of the
    same size moved npy's epoch 1 from 0.45x to 0.44x, with the page cache
    from 0.38x to 0.49x.
    """
    write_file(os.path.join(work, "warm"), nbytes)
    os.remove(os.path.join(work, "warm"))


def first_touch_cost(work: str, nbytes: int = 300 << 20) -> tuple[float, float]:
    """Seconds to write ``nbytes`` into new files twice: into memory the machine has not used lately, then
    into the memory just freed by deleting the first file.

    A virtual machine whose host hands back the guest's free memory (as
    this one's does) charges a page the first time it is used again: a
    first epoch from a bucket, which fills the page cache with the data it
    caches, pays that where an epoch over a local file already in the page
    cache does not.
    """
    first, second = os.path.join(work, "touch-first"), os.path.join(work, "touch-second")
    cold = write_file(first, nbytes)
    os.remove(first)
    recycled = write_file(second, nbytes)
    os.remove(second)
    return cold, recycled


def latency_table(work: str, data: np.ndarray, chunk: int, latency_ms: float, formats: list[str],
                  rounds: int = 3) -> None:
    """DataLoader samples/s from S3 (with latency per request) / from local disk, epochs 1 and 2.

    This machine's speed drifts by 20% and more between runs a minute apart,
    so each figure is the best of ``rounds`` rounds, taken in turn (a local
    epoch, then a first S3 epoch with a fresh disk cache and a fresh open,
    then a second one from that cache, then another first epoch with a
    fresh cache, just after filling and freeing twice the stored size of
    page cache: :func:`first_touch_cost`), as the local figure always was.
    """
    from unistore.datasets import StoreDataset, StoreSampler
    from unistore.datasets.loader import auto_chunk_rows, auto_read_ahead

    rows = [["store", "block (rows)", "read-ahead (batches)", "local samples/s", "S3 epoch 1", "S3 epoch 2",
             "epoch 1 / local", "epoch 2 / local", "epoch 1, memory warmed / local", "epoch 1 GETs (bytes)",
             "epoch 2 GETs", "epoch 1 CPU busy"]]
    cold, recycled = first_touch_cost(work)
    with s3_behind_proxy("lat") as wire:
        proxy, options = wire.proxy, wire.options
        for name, fmt, opts in (("npy", "npy", {}), ("zarr zstd", "zarr", {"chunks": (chunk, data.shape[1]),
                                                                            "compression": "zstd"})):
            if fmt not in formats:
                continue
            local = os.path.join(work, f"lat-{fmt}")
            with us.create_store(local, format=fmt) as store:
                store.write_array("x", data, **opts)
                store.commit()
            url = wire.upload(local, fmt)
            local_rates, firsts, seconds, warmed, busy, gets, fetched, second_gets = [], [], [], [], [], [], [], 0
            for r in range(rounds):
                # a fresh directory each round, the earlier ones kept: on ext4 without a journal (this machine's
                # disk) a new file's inode is searched for past every inode freed in the last 5 to 300 s, which
                # a cache filled just after another was deleted pays for (perf: about a quarter of worker time)
                root = os.path.join(work, f"lat-cache-{fmt}-{r}")
                remote = StoreDataset(us.open_store(url, storage_options=options, cache=DiskCache(root)))
                rows_per_unit = auto_chunk_rows(remote)  # what make_loader picks: the chunks, or 8 MiB of rows
                ahead = auto_read_ahead(remote, StoreSampler(remote, chunk_rows=rows_per_unit), BATCH)
                local_rates.append(loader_epoch(StoreDataset(local), rows_per_unit, r, 0))
                proxy.latency = latency_ms / 1000
                proxy.reset_counts()
                busy0, total0 = cpu_busy()
                server0 = wire.server_cpu_seconds()
                firsts.append(loader_epoch(remote, rows_per_unit, r, "auto"))
                busy1, total1 = cpu_busy()
                busy.append(((busy1 - busy0) / (total1 - total0),
                             (wire.server_cpu_seconds() - server0) / (busy1 - busy0)))
                gets.append(proxy.requests["GET"])
                fetched.append(proxy.bytes_out / wire.stored(url))
                proxy.reset_counts()
                seconds.append(loader_epoch(remote, rows_per_unit, r + 1, "auto"))
                second_gets += proxy.requests["GET"]
                again = StoreDataset(us.open_store(url, storage_options=options,
                                                   cache=DiskCache(os.path.join(work, f"lat-cache-{fmt}-{r}-warm"))))
                warm_memory(work, 2 * wire.stored(url))
                warmed.append(loader_epoch(again, rows_per_unit, r, "auto"))
                proxy.latency = 0.0
            local_rate, first, second = max(local_rates), max(firsts), max(seconds)
            cpu, server = busy[firsts.index(first)]
            rows.append([name, str(rows_per_unit), str(ahead), f"{local_rate:,.0f}", f"{first:,.0f}", f"{second:,.0f}",
                         f"{first / local_rate:.2f}x", f"{second / local_rate:.2f}x",
                         f"{max(warmed) / local_rate:.2f}x", f"{max(gets)} ({max(fetched):.2f}x stored)",
                         str(second_gets), f"{cpu:.0%} ({server:.0%} the S3 server)"])
            print(f"{name}, each round: local {' '.join(f'{v:,.0f}' for v in local_rates)}; S3 epoch 1 "
                  f"{' '.join(f'{v:,.0f}' for v in firsts)}; S3 epoch 2 {' '.join(f'{v:,.0f}' for v in seconds)}; "
                  f"S3 epoch 1, memory warmed {' '.join(f'{v:,.0f}' for v in warmed)}")
    print(f"\n## DataLoader (2 workers, make_loader's defaults: chunk-aware order, read-ahead; disk cache) from S3 "
          f"with {latency_ms:g} ms added per request vs local disk: {data.shape[0]} x {data.shape[1]} float32, "
          f"best of {rounds} rounds (epoch 1 GETs and bytes: the most of any round; epoch 2 GETs: all rounds)\n")
    print(table(rows))
    print(f"\nThis machine writes 300 MB into memory it has not used lately in {cold:.2f} s, into memory freed a "
          f"moment before in {recycled:.2f} s ({cold / recycled:.0f}x): epoch 1 fills the page cache with what it "
          f"caches, an epoch over a local file already in the page cache does not")


def local_table(work: str, data: np.ndarray, chunk: int) -> None:
    path = os.path.join(work, "local.zarr")
    with us.create_store(path, format="zarr") as store:
        store.write_array("emb", data, chunks=(chunk, data.shape[1]), compression="zstd")
        store.commit()
    raw = os.path.join(work, "raw.npy")
    np.save(raw, data)
    mm = np.load(raw, mmap_mode="r")
    plain = orders(len(data), chunk, 1, False)[0]
    aware = orders(len(data), chunk, 1, True)[0]
    t = time.perf_counter()
    for i in range(0, len(plain), BATCH):
        mm[np.sort(plain[i:i + BATCH])]
    memmap_rate = len(plain) / (time.perf_counter() - t)
    rows = [["order", "decoded chunks", "rows/s", "vs raw memmap"]]
    for name, order in (("plain shuffle", plain), ("chunk-aware", aware)):
        chunk_cache.clear()
        arr = us.open_store(path, cache=False)["emb"]
        n = len(order) if name == "chunk-aware" else min(len(order), 20 * BATCH)  # plain is slow: a sample
        rate = run_epoch(arr, order[:n])
        rows.append([name, "per-process LRU (1/4 of the array)", f"{rate:,.0f}", f"{rate / memmap_rate:.4f}x"])
    # decoded into the disk cache: epoch 1 decodes each chunk once into it, later epochs map the files
    root = os.path.join(work, "local-cache")
    arr = us.open_store(path, cache=DiskCache(root))["emb"]
    for label, how, epoch, aware_order, fresh in (
            ("chunk-aware", "disk cache, epoch 1 (decoding into it)", 0, True, True),
            ("chunk-aware", "disk cache, mapped: a new process's first epoch (checks each entry once)", 1, True, True),
            ("chunk-aware", "disk cache, mapped: later epochs", 2, True, False),
            ("plain shuffle", "disk cache, mapped: later epochs", 3, False, False)):
        if fresh:
            arr = us.open_store(path, cache=DiskCache(root))["emb"]  # what a new process sees of the cache
        rate = run_epoch(arr, orders(len(data), chunk, 1, aware_order, epoch=epoch)[0])
        rows.append([label, how, f"{rate:,.0f}", f"{rate / memmap_rate:.4f}x"])
    print(f"\n## Local zarr zstd {data.shape[0]} x {data.shape[1]} ({data.nbytes / 1e6:.0f} MB, {chunk}-row chunks), "
          f"process decoded-chunk LRU {chunk_cache.max_bytes >> 20} MiB (1/4 of the array), or the disk cache; "
          f"raw memmap {memmap_rate:,.0f} rows/s\n")
    print(table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--remote-rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--remote-chunk", type=int, default=250, help="rows per chunk of the S3 array")
    parser.add_argument("--ranks", type=int, default=16)
    parser.add_argument("--parts", default="quality,local,s3,ranks64,latency",
                        help="comma-separated: quality, local, s3 (bytes per epoch), ranks64, latency")
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--latency-rows", type=int, default=200_000)
    parser.add_argument("--latency-formats", default="npy,zarr")
    parser.add_argument("--latency-rounds", type=int, default=3)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        data = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
        chunk_cache.max_bytes = data.nbytes // 4
        chunk_cache.clear()
        if "quality" in parts:
            shuffle_quality(args.rows, args.chunk)
        if "local" in parts:
            local_table(work, data, args.chunk)
        if "s3" in parts:
            remote = data[:args.remote_rows]
            chunk_cache.max_bytes = remote.nbytes // 4
            remote_tables(work, remote, args.remote_chunk, args.ranks)
        if "ranks64" in parts:
            many_ranks_table(work, 64)
        if "latency" in parts:
            chunk_cache.max_bytes = 1 << 30
            latency_table(work, data[:args.latency_rows], args.chunk, args.latency_ms, args.latency_formats.split(","),
                          args.latency_rounds)


if __name__ == "__main__":
    main()
