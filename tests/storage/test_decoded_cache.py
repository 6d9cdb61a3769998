"""Decoded chunks of compressed arrays kept in the disk cache as uncompressed files that every process maps."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore.storage.cache import DiskCache, chunk_cache

from ..conftest import s3_options
from .faulty_proxy import FaultyProxy

ROWS, DIM, CHUNK = 2000, 48, 125  # 16 chunks
FORMATS = {"zarr": {"compression": "zstd"}, "hdf5": {"compression": "gzip"}}


def _write(path: str, fmt: str, data: np.ndarray) -> None:
    with us.create_store(path, format=fmt, overwrite=True) as store:
        store.write_array("emb", data, chunks=(CHUNK, DIM), **FORMATS[fmt])


def _epoch(store: us.TensorStore, seed: int) -> np.ndarray:
    arr = store["emb"]
    n = arr.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    rows = np.concatenate([arr.take(order[i:i + 200]) for i in range(0, n, 200)])
    out = np.empty_like(rows)
    out[order] = rows
    return out


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_chunks_are_decoded_once_then_mapped(tmp_path: Any, data: np.ndarray, fmt: str) -> None:
    path = str(tmp_path / f"src.{fmt}")
    _write(path, fmt, data)
    cache = DiskCache(tmp_path / "cache")
    store = us.open_store(path, cache=cache)
    chunk_cache.clear()
    np.testing.assert_array_equal(_epoch(store, 1), data)
    first = store.io_stats()
    assert first["chunks_decoded"] == ROWS // CHUNK and first["disk_misses"] == ROWS // CHUNK
    assert chunk_cache.nbytes == 0  # the process's own decoded-chunk memory is not used
    assert cache.info()["bytes"] >= data.nbytes  # uncompressed files
    again = us.open_store(path, cache=cache)  # a fresh open maps what the first decoded
    np.testing.assert_array_equal(_epoch(again, 2), data)
    second = again.io_stats()
    assert second["chunks_decoded"] == 0 and second["disk_misses"] == 0
    assert second["disk_hits"] > 0 and second["bytes_local"] >= data.nbytes
    plain = us.open_store(path, cache=False)
    np.testing.assert_array_equal(_epoch(plain, 3), data)
    assert plain.io_stats()["disk_hits"] == 0


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_rewritten_store_is_decoded_again(tmp_path: Any, data: np.ndarray, fmt: str) -> None:
    path = str(tmp_path / f"src.{fmt}")
    _write(path, fmt, data)
    cache = DiskCache(tmp_path / "cache")
    _epoch(us.open_store(path, cache=cache), 1)
    _write(path, fmt, data[::-1].copy())  # same shape, new bytes
    store = us.open_store(path, cache=cache)
    np.testing.assert_array_equal(_epoch(store, 2), data[::-1])
    assert store.io_stats()["chunks_decoded"] == ROWS // CHUNK == store.io_stats()["disk_misses"]


def test_a_corrupt_decoded_chunk_is_decoded_again_not_served(tmp_path: Any, data: np.ndarray) -> None:
    path = str(tmp_path / "src.zarr")
    _write(path, "zarr", data)
    cache = DiskCache(tmp_path / "cache")
    _epoch(us.open_store(path, cache=cache), 1)
    entries = sorted((e for e in os.scandir(cache.root) if e.is_dir() and not e.name.startswith(".")),
                     key=lambda e: e.name)
    files = [os.path.join(d, f) for top in entries for d, _, fs in os.walk(top.path) for f in fs]
    assert len(files) == ROWS // CHUNK
    with open(files[0], "r+b") as f:  # flip bytes of one entry in place
        f.seek(100)
        f.write(b"\xff" * 64)
    with open(files[1], "r+b") as f:  # and truncate another
        f.truncate(1000)
    store = us.open_store(path, cache=DiskCache(tmp_path / "cache"))
    np.testing.assert_array_equal(_epoch(store, 2), data)
    assert store.io_stats()["chunks_decoded"] == 2 and store.io_stats()["disk_misses"] == 2


def test_prefetch_decodes_into_the_cache_without_assembling(tmp_path: Any, data: np.ndarray) -> None:
    path = str(tmp_path / "src.zarr")
    _write(path, "zarr", data)
    cache = DiskCache(tmp_path / "cache")
    store = us.open_store(path, cache=cache)
    store["emb"].prefetch(np.arange(0, 3 * CHUNK))
    assert store.io_stats()["chunks_decoded"] == 3 and cache.info()["entries"] == 3
    np.testing.assert_array_equal(store["emb"].take([5, 2 * CHUNK + 1]), data[[5, 2 * CHUNK + 1]])
    assert store.io_stats()["chunks_decoded"] == 3  # the read maps what read-ahead decoded


@pytest.mark.s3
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_remote_chunks_are_fetched_and_decoded_once(s3: dict[str, Any], tmp_path: Any, fmt: str) -> None:
    """A compressed zarr or HDF5 array on S3: epoch 2 on a fresh open fetches no chunk bytes (proxy figures)."""
    data = np.random.default_rng(1).standard_normal((8 * ROWS, DIM)).astype(np.float32)  # 3 MB
    local = str(tmp_path / f"src.{fmt}")
    _write(local, fmt, data)
    name = f"src.{fmt}"
    s3["fs"].put(local + ("/" if fmt == "zarr" else ""), f"{s3['bucket']}/{name}", recursive=fmt == "zarr")
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(local) for f in fs) \
        if fmt == "zarr" else os.path.getsize(local)
    proxy = FaultyProxy(s3["endpoint"])
    try:
        url, options = f"s3://{s3['bucket']}/{name}", s3_options(proxy.endpoint)
        cache = DiskCache(tmp_path / "cache")
        store = us.open_store(url, storage_options=options, cache=cache)
        np.testing.assert_array_equal(_epoch(store, 1), data)
        assert store.io_stats()["chunks_decoded"] == len(data) // CHUNK
        proxy.reset_counts()
        again = us.open_store(url, storage_options=options, cache=cache)
        np.testing.assert_array_equal(_epoch(again, 2), data)
        assert again.io_stats()["chunks_decoded"] == 0
        assert proxy.bytes_out < 0.1 * stored, (proxy.bytes_out, stored)  # metadata only
        if fmt == "zarr":
            assert not [p for (_, p) in proxy.paths if "/c/" in p], proxy.paths
    finally:
        proxy.close()


def _sit(ready: Any, go: Any) -> None:
    ready.set()
    go.wait(30)


def test_a_forked_child_does_not_keep_its_parents_claims(tmp_path: Any) -> None:
    """A DataLoader worker forked while a thread of the parent holds a claim must not hold it after release."""
    import multiprocessing

    cache = DiskCache(tmp_path / "cache")
    mine, others, token = cache.claim("obj", ["0"])
    assert mine == ["0"] and not others
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_sit, args=(ready, go))
    child.start()
    try:
        assert ready.wait(30)
        cache.release(token)
        again, busy, token2 = DiskCache(tmp_path / "cache").claim("obj", ["0"])
        assert again == ["0"] and not busy  # free although the child, which got a copy of the file, still runs
        cache.release(token2)
    finally:
        go.set()
        child.join(30)


def test_an_entry_produced_while_producing_another_under_the_same_lock_does_not_wait_on_itself(tmp_path: Any) -> None:
    """Entries share a fixed pool of lock files: a chunk decoded under one whose bytes are fetched under the
    same lock file (or two entries of one claim sharing one) are produced by the thread holding it."""
    import threading

    cache = DiskCache(tmp_path / "cache")
    outer = cache._lock_path("obj", "outer")
    inner = next(f"b{i}" for i in range(1_000_000) if cache._lock_path("blocks", f"b{i}") == outer)
    made: list[str] = []

    def produce_outer() -> None:
        for names in cache.producing("obj", ["outer"], lambda n: n in made):
            for inner_names in cache.producing("blocks", [inner, "other"], lambda n: n in made):
                made.extend(inner_names)
            made.extend(names)

    worker = threading.Thread(target=produce_outer)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the thread waits on a lock it holds itself"
    assert sorted(made) == sorted([inner, "other", "outer"])
    mine, others, token = cache.claim("obj", ["outer"])  # every claim was released
    assert mine == ["outer"] and not others
    cache.release(token)
    mine, others, token = DiskCache(tmp_path / "cache").claim("obj", ["outer", inner])
    assert sorted(mine) == sorted(["outer", inner]) and not others  # one claim, one lock file, one producer
    cache.release(token)


@pytest.mark.s3
def test_decoded_chunks_stay_within_the_budget_under_workers(s3: dict[str, Any], tmp_path: Any) -> None:
    """A compressed zarr array on S3 larger than the disk cache, read an epoch at a time by a loader with two
    workers and read-ahead: the cache never ends an epoch over its budget, and every row is right."""
    from unistore.datasets import StoreDataset, make_loader

    data = np.random.default_rng(2).standard_normal((8 * ROWS, DIM)).astype(np.float32)  # 3 MB decoded
    url = f"s3://{s3['bucket']}/big.zarr"
    with us.create_store(url, format="zarr", storage_options=s3["options"]) as store:
        store.write_array("emb", data, chunks=(CHUNK, DIM), compression="zstd")
    budget = data.nbytes * 4 // 10
    cache = DiskCache(tmp_path / "cache", max_bytes=budget)
    dataset = StoreDataset(us.open_store(url, storage_options=s3["options"], cache=cache))
    loader = make_loader(dataset, 250, seed=3, num_workers=2)
    assert loader.read_ahead > 0
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        seen = 0
        for batch in loader:
            seen += len(batch["emb"])
            assert cache.info()["bytes"] <= budget
        assert seen == len(data) and cache.info()["bytes"] <= budget
    rows = np.random.default_rng(4).choice(len(data), 300, replace=False)
    np.testing.assert_array_equal(dataset.arrays["emb"].take(rows), data[rows])


@pytest.mark.s3
def test_threads_asking_a_zarr_arrays_identity_at_once_list_it_once(s3: dict[str, Any], tmp_path: Any,
                                                                     data: np.ndarray) -> None:
    """Read-ahead threads that start together on a fresh open share one listing of the array's objects."""
    import threading

    local = str(tmp_path / "src.zarr")
    _write(local, "zarr", data)
    s3["fs"].put(local + "/", f"{s3['bucket']}/race.zarr", recursive=True)
    proxy = FaultyProxy(s3["endpoint"])
    try:
        store = us.open_store(f"s3://{s3['bucket']}/race.zarr", storage_options=s3_options(proxy.endpoint),
                              cache=DiskCache(tmp_path / "cache"))
        reader = store["emb"].layout.reader
        proxy.latency = 0.05  # widen the window in which the threads overlap
        proxy.reset_counts()
        go = threading.Barrier(8)
        seen: list[str | None] = []

        def ask() -> None:
            go.wait()
            seen.append(reader.identity())

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lists = sum(n for (method, path), n in proxy.paths.items() if method == "GET" and path.rstrip("/")
                    == f"/{s3['bucket']}")
        assert lists == 1, proxy.paths
        assert len(set(seen)) == 1 and seen[0] is not None and seen[0].startswith("zarr|s3://")
        np.testing.assert_array_equal(store["emb"].take([3, 1999]), data[[3, 1999]])
    finally:
        proxy.close()
