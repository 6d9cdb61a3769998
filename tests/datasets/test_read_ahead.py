"""The loader's read-ahead and chunk-aware order, with DataLoader worker processes, locally and on S3."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pytest
import torch

import unistore as us
from unistore.datasets import StoreDataset, make_loader
from unistore.storage.cache import DiskCache

from ..conftest import s3_options
from ..storage.faulty_proxy import FaultyProxy

ROWS, DIM = 3000, 32


def _write(url: str, fmt: str, data: np.ndarray, **options: Any) -> None:
    with us.create_store(url, format=fmt, storage_options=options.pop("storage_options", None)) as store:
        store.write_array("x", data, **options)
        store.write_array("y", np.arange(len(data)))


def _batches(loader: Any, pause: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for b in loader:
        out.append((b["x"].numpy(), b["y"].numpy()))
        time.sleep(pause)  # a training step: the read-ahead thread gets its turn however busy the machine is
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_read_ahead_and_chunk_aware_give_the_same_batches(tmp_path: Any, workers: int) -> None:
    data = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    url = str(tmp_path / "d.zarr")
    _write(url, "zarr", data, chunks=(100, DIM), compression="zstd")
    ds = StoreDataset(url)
    plain = _batches(make_loader(ds, 64, seed=3, num_workers=workers))
    loader = make_loader(ds, 64, seed=3, num_workers=workers, read_ahead=3)
    ahead = _batches(loader, pause=0.01)
    assert len(ahead) == len(plain)
    for (xa, ya), (xb, yb) in zip(ahead, plain):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    if workers:  # each worker reads ahead in a thread of its own
        assert loader.read_ahead_stats["where"] == "workers"
    else:
        assert loader.read_ahead_stats["batches"] > 0 and loader.read_ahead_stats["errors"] == 0
    aware = _batches(make_loader(ds, 64, seed=3, num_workers=workers, chunk_rows=100, read_ahead=2))
    ys = np.concatenate([y for _, y in aware])
    assert sorted(ys.tolist()) == list(range(ROWS))  # every sample once
    for x, y in aware:
        np.testing.assert_array_equal(x, data[y])
        assert len(np.unique(y // 100)) <= 8  # a batch draws from at most two windows of 4 chunks


@pytest.mark.s3
def test_read_ahead_fills_the_shared_disk_cache_for_workers(s3: dict[str, Any], tmp_path: Any) -> None:
    data = np.random.default_rng(1).standard_normal((ROWS, DIM)).astype(np.float32)
    _write(f"s3://{s3['bucket']}/d", "npy", data, storage_options=s3["options"])
    proxy = FaultyProxy(s3["endpoint"])
    try:
        options = s3_options(proxy.endpoint)
        cache = DiskCache(tmp_path / "cache", block_bytes=16 << 10)
        store = us.open_store(f"s3://{s3['bucket']}/d", storage_options=options, cache=cache)
        loader = make_loader(StoreDataset(store), 128, seed=5, num_workers=2, read_ahead=4)
        got = _batches(loader)
        for x, y in got:
            np.testing.assert_array_equal(x, data[y])
        assert sorted(np.concatenate([y for _, y in got]).tolist()) == list(range(ROWS))
        assert loader.read_ahead_stats["where"] == "workers"
        # workers and their read-ahead threads wanting one block at once: one fetches it, the others wait
        assert proxy.bytes_out <= 1.1 * data.nbytes + 64 * 1024, (proxy.bytes_out, data.nbytes)
        proxy.reset_counts()
        again = _batches(make_loader(StoreDataset(store), 128, seed=6, num_workers=2))  # epoch 2: from disk
        for x, y in again:
            np.testing.assert_array_equal(x, data[y])
        assert not [p for (m, p) in proxy.paths if p.endswith("x.npy") and m == "GET"], proxy.paths
    finally:
        proxy.close()


class _LoggingPrefetch(StoreDataset):
    """Notes which process read ahead which rows: pid, first row, rows, first and last 100-row block."""

    log = ""

    def prefetch(self, indices: Any) -> None:
        idx = np.asarray(indices)
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {int(idx[0])} {len(idx)} {int(idx.min()) // 100} {int(idx.max()) // 100}\n")
        super().prefetch(indices)


def _logged_epoch(tmp_path: Any, seed: int, **options: Any) -> tuple[Any, list[Any], list[list[int]]]:
    """One epoch with 2 workers over a zarr array of 100-row chunks: the loader, its batches and the read-ahead
    log (pid, first row, rows, first and last block of each read-ahead)."""
    data = np.random.default_rng(seed).standard_normal((ROWS, DIM)).astype(np.float32)
    url = str(tmp_path / "d.zarr")
    _write(url, "zarr", data, chunks=(100, DIM), compression="zstd")
    ds = _LoggingPrefetch(url)
    ds.log = str(tmp_path / "prefetch.log")
    loader = make_loader(ds, 64, seed=2, num_workers=2, **options)
    got = _batches(loader, pause=0.005)
    for x, y in got:
        np.testing.assert_array_equal(x, data[y])
    with open(ds.log) as f:
        return loader, got, [[int(v) for v in line.split()] for line in f]


def test_workers_read_ahead_in_threads_of_their_own(tmp_path: Any) -> None:
    loader, got, lines = _logged_epoch(tmp_path, 6, chunk_rows=None, read_ahead=3)
    pids = {line[0] for line in lines}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # the workers read ahead, not the loop's process
    order = loader.sampler.order()
    firsts = {int(order[k * 64]) for k in range(1, len(got))}
    assert {line[1] for line in lines} <= firsts  # whole batches of this epoch's order, never the first one
    assert len(lines) >= len(got) // 2


def test_workers_read_ahead_of_the_chunk_aware_order_by_block_each_its_own(tmp_path: Any) -> None:
    _, _, lines = _logged_epoch(tmp_path, 7, chunk_rows=100, read_ahead=8)
    pids = {line[0] for line in lines}
    assert os.getpid() not in pids and len(pids) == 2
    # each read-ahead is one whole block (the order's 100 rows of it), not a batch spread over a window
    assert all(first == last and rows == 100 for _, _, rows, first, last in lines)
    blocks = [line[3] for line in lines]
    assert len(blocks) == len(set(blocks))  # the workers split the blocks: none is read ahead twice
    assert len(blocks) >= ROWS // 100 // 2
    by_worker = [[line[3] for line in lines if line[0] == pid] for pid in pids]
    assert all(len(b) >= len(blocks) // 4 for b in by_worker)  # both take their share


def test_read_ahead_from_the_loop_with_persistent_workers(tmp_path: Any) -> None:
    data = np.random.default_rng(4).standard_normal((ROWS, DIM)).astype(np.float32)
    url = str(tmp_path / "d.zarr")
    _write(url, "zarr", data, chunks=(100, DIM), compression="zstd")
    loader = make_loader(StoreDataset(url), 64, seed=2, num_workers=2, persistent_workers=True, read_ahead=3)
    for epoch in range(2):  # persistent workers keep the first epoch's dataset: the loop's thread reads ahead
        loader.sampler.set_epoch(epoch)
        got = _batches(loader)
        assert sorted(np.concatenate([y for _, y in got]).tolist()) == list(range(ROWS))
        for x, y in got:
            np.testing.assert_array_equal(x, data[y])
        assert loader.read_ahead_stats["where"] == "loop" and loader.read_ahead_stats["batches"] > 0


def test_read_ahead_stops_with_the_loop(tmp_path: Any) -> None:
    data = np.zeros((ROWS, 4), np.float32)
    _write(str(tmp_path / "d"), "npy", data)
    loader = make_loader(StoreDataset(str(tmp_path / "d")), 10, num_workers=0, read_ahead=5)
    it = iter(loader)
    for _ in range(3):
        next(it)
    it.close()  # an interrupted epoch stops its read-ahead thread
    assert loader.read_ahead_stats["batches"] <= 3 + 5
    assert isinstance(torch.zeros(1), torch.Tensor)


@pytest.mark.s3
def test_chunk_aware_order_is_chosen_for_chunked_remote_data(s3: dict[str, Any], tmp_path: Any) -> None:
    data = np.random.default_rng(2).standard_normal((ROWS, DIM)).astype(np.float32)
    local = str(tmp_path / "d.zarr")
    _write(local, "zarr", data, chunks=(150, DIM), compression="zstd")
    s3["fs"].put(local + "/", f"{s3['bucket']}/d.zarr", recursive=True)
    remote = StoreDataset(f"s3://{s3['bucket']}/d.zarr", storage_options=s3["options"])
    loader = make_loader(remote, 64, seed=1)
    assert loader.sampler.chunk_rows == 150
    ys = np.concatenate([b["y"].numpy() for b in loader])
    assert sorted(ys.tolist()) == list(range(ROWS))
    assert make_loader(remote, 64, shuffle=False).sampler.chunk_rows is None
    assert make_loader(remote, 64, chunk_rows=None).sampler.chunk_rows is None
    assert make_loader(StoreDataset(local), 64).sampler.chunk_rows is None  # local: plain shuffle
    _write(str(tmp_path / "flat"), "npy", data)
    assert make_loader(StoreDataset(str(tmp_path / "flat")), 64, chunk_rows=300).sampler.chunk_rows == 300
    with pytest.raises(ValueError, match="chunk_rows"):
        make_loader(remote, 64, chunk_rows="yes")


def test_read_ahead_is_bounded_in_bytes(tmp_path: Any) -> None:
    _write(str(tmp_path / "d"), "npy", np.zeros((ROWS, 256), np.float32))  # rows of 1 KiB (+ 8 B labels)
    ds = StoreDataset(str(tmp_path / "d"))
    assert make_loader(ds, 100, read_ahead=8).read_ahead == 8
    assert make_loader(ds, 100, read_ahead=8, read_ahead_bytes=300_000).read_ahead == 2  # 103,200 B a batch
    assert make_loader(ds, 100, read_ahead=8, read_ahead_bytes=1).read_ahead == 1
    assert make_loader(ds, 100).read_ahead == 0


@pytest.mark.s3
def test_zarr_with_every_decoded_chunk_cached_reads_nothing_ahead(s3: dict[str, Any], tmp_path: Any) -> None:
    """A compressed zarr array on S3: epoch 1 decodes every chunk into the disk cache (read-ahead in the
    workers); epoch 2 finds them all listed there, reads nothing ahead and makes no request; a decoded chunk
    gone from the cache turns the read-ahead back on, and the epoch still gives the right rows."""
    data = np.random.default_rng(5).standard_normal((ROWS, DIM)).astype(np.float32)
    url = f"s3://{s3['bucket']}/zc.zarr"
    _write(url, "zarr", data, chunks=(250, DIM), compression="zstd", storage_options=s3["options"])
    proxy = FaultyProxy(s3["endpoint"])
    try:
        cache = DiskCache(tmp_path / "cache")
        ds = StoreDataset(us.open_store(url, storage_options=s3_options(proxy.endpoint), cache=cache))
        loader = make_loader(ds, 200, seed=1, num_workers=2)
        assert loader.sampler.chunk_rows == 250 and loader.read_ahead > 0
        assert not ds.is_cached()
        first = _batches(loader)
        assert loader.read_ahead_stats["where"] == "workers"
        assert ds.is_cached()  # every chunk of x and y decoded into the cache, by the workers
        loader.sampler.set_epoch(1)
        proxy.reset_counts()
        again = _batches(loader)
        assert loader.read_ahead_stats["where"] == "nowhere" and proxy.requests["GET"] == 0
        for x, y in first + again:
            np.testing.assert_array_equal(x, data[y])
        # one decoded chunk of x gone: read-ahead is back, and the chunk is decoded again
        decoded = [d for d in (tmp_path / "cache").glob("*/*") if (d / "11").is_file() and (d / "0").is_file()
                   and (d / "0").stat().st_size > 250 * DIM * 4]
        assert len(decoded) == 1
        (decoded[0] / "11").unlink()
        assert not ds.is_cached()
        loader.sampler.set_epoch(2)
        third = _batches(loader)
        assert loader.read_ahead_stats["where"] == "workers" and (decoded[0] / "11").is_file()
        assert sorted(np.concatenate([y for _, y in third]).tolist()) == list(range(ROWS))
        for x, y in third:
            np.testing.assert_array_equal(x, data[y])
    finally:
        proxy.close()


@pytest.mark.s3
def test_remote_cached_arrays_get_block_order_and_read_ahead_by_default(s3: dict[str, Any], tmp_path: Any) -> None:
    """An uncompressed array on S3 read through a disk cache: make_loader shuffles 8 MiB blocks of rows and
    reads two windows ahead, so epoch 1 fetches a few large ranges, each once (proxy figures)."""
    from unistore.storage.budget import REMOTE_BLOCK_BYTES

    rows, dim = 24_000, 256  # 1 KiB rows: 8,192 rows a block, 3 blocks
    data = np.random.default_rng(3).standard_normal((rows, dim)).astype(np.float32)
    _write(f"s3://{s3['bucket']}/big", "npy", data, storage_options=s3["options"])
    proxy = FaultyProxy(s3["endpoint"])
    try:
        url, options = f"s3://{s3['bucket']}/big", s3_options(proxy.endpoint)
        ds = StoreDataset(us.open_store(url, storage_options=options, cache=DiskCache(tmp_path / "cache")))
        loader = make_loader(ds, 500, seed=4, num_workers=2)
        assert loader.sampler.chunk_rows == REMOTE_BLOCK_BYTES // (dim * 4)  # the widest rows (x) set it
        window = loader.sampler.chunk_rows * loader.sampler.effective_window
        assert loader.read_ahead == max(4, -(-2 * window // 500))
        proxy.reset_counts()
        got = _batches(loader)
        for x, y in got:
            np.testing.assert_array_equal(x, data[y])
        assert sorted(np.concatenate([y for _, y in got]).tolist()) == list(range(rows))
        x_gets = sum(n for (m, p), n in proxy.paths.items() if m == "GET" and p.endswith("x.npy"))
        assert proxy.bytes_out <= 1.1 * (data.nbytes + rows * 8)
        assert x_gets <= 2 * data.nbytes // (512 << 10) // 4, x_gets  # ranges of several blocks, not one a block
        assert loader.read_ahead_stats["where"] == "workers" and ds.is_cached()  # every block is in the cache
        assert not ds.arrays["x"].layout.source.mapped  # the loop let go of its mapping once workers started
        # epoch 2: every row is in the cache, mapped before the workers start: nothing is read ahead
        loader.sampler.set_epoch(1)
        proxy.reset_counts()
        again = _batches(loader)
        assert ds.is_cached() and loader.read_ahead_stats["where"] == "nowhere"
        assert proxy.requests["GET"] == 0 and len(again) == len(got)
        for x, y in again:
            np.testing.assert_array_equal(x, data[y])
        # a fresh process's open over the filled cache: the listing finds each object's version, its header
        # comes from the cached first block, and the epoch sends no GET for any object
        proxy.reset_counts()
        reopened = StoreDataset(us.open_store(url, storage_options=options, cache=DiskCache(tmp_path / "cache")))
        later = _batches(make_loader(reopened, 500, seed=4, num_workers=2))
        object_gets = {p: n for (m, p), n in proxy.paths.items() if m == "GET" and p.endswith(".npy")}
        assert object_gets == {} and len(later) == len(got)
        for x, y in later:
            np.testing.assert_array_equal(x, data[y])
        # the same epoch without read-ahead, from a cache of its own, gives the same batches
        fresh = StoreDataset(us.open_store(url, storage_options=options, cache=DiskCache(tmp_path / "other")))
        without = _batches(make_loader(fresh, 500, seed=4, num_workers=2, read_ahead=0))
        assert len(without) == len(got)
        for (xa, ya), (xb, yb) in zip(got, without):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(xa, xb)
        # no disk cache: rows are fetched one range each in any order, so no blocks and no read-ahead
        plain = StoreDataset(us.open_store(url, storage_options=options, cache=False))
        assert make_loader(plain, 500).sampler.chunk_rows is None and make_loader(plain, 500).read_ahead == 0
        with pytest.raises(ValueError, match="read_ahead"):
            make_loader(ds, 500, read_ahead="lots")
    finally:
        proxy.close()


class _Finalised:
    """Garbage in a reference cycle that notes which process collects it."""

    def __init__(self, log: str):
        self.log, self.me = log, self

    def __del__(self) -> None:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


def test_workers_do_not_collect_the_loops_garbage(tmp_path: Any) -> None:
    """Objects of the loop's process are frozen while the workers fork: a worker's garbage collector never
    finalises them (an unclosed client session of the loop's process warned once in every worker)."""
    import gc

    data = np.random.default_rng(8).standard_normal((ROWS, DIM)).astype(np.float32)
    _write(str(tmp_path / "d"), "npy", data)
    log = str(tmp_path / "collected")
    gc.disable()
    try:
        for _ in range(50):
            _Finalised(log)  # unreachable, left for the cycle collector
        loader = make_loader(StoreDataset(str(tmp_path / "d")), 64, num_workers=2, worker_init_fn=_collect)
        got = _batches(loader)
    finally:
        gc.enable()
    assert sum(len(y) for _, y in got) == ROWS
    gc.collect()
    with open(log) as f:
        pids = {int(line) for line in f}
    assert pids == {os.getpid()}  # collected here, by the process that made them, and by no worker


def _collect(worker_id: int) -> None:
    import gc

    gc.enable()
    gc.collect()  # a worker's collection, as any allocation may start one


@pytest.mark.s3
def test_create_loader_orders_jasper_pairs_by_their_chunks_on_s3(s3: dict[str, Any], tmp_path: Any) -> None:
    """A JASPER split read from a remote zarr store (use_mmap): create_loader groups the split's samples by the
    chunks of the per-pair arrays their pairs live in."""
    from unistore.datasets import copy_dataset, create_loader

    from .builders import make_jasper, write_jasper_pt

    data = make_jasper(n_pairs=3000, dim=32, seed=4)
    pt = write_jasper_pt(str(tmp_path / "pt"), data)
    local = copy_dataset(pt, str(tmp_path / "zarr"), "zarr", compression="zstd", chunks=(100,))
    s3["fs"].put(local + "/", f"{s3['bucket']}/jasper", recursive=True)
    loader = create_loader(f"s3://{s3['bucket']}/jasper", "train", batch_size=64, use_mmap=True,
                           storage_options=s3["options"], seed=1)
    split = data["train_idx"]
    assert loader.sampler.chunk_rows == 100 and np.array_equal(loader.sampler.rows, split)
    order = loader.sampler.order()
    assert sorted(order.tolist()) == list(range(len(split)))
    got = [b["relevance"].numpy() for b in loader]
    np.testing.assert_array_equal(np.concatenate(got), data["pair_relevance"][split[order]])
    for k in range(len(got)):
        assert len(np.unique(split[order[k * 64:(k + 1) * 64]] // 100)) <= 8  # at most two windows of 4 chunks
    # preloaded (the default for small data): the order does not matter, the plain shuffle stays
    assert create_loader(f"s3://{s3['bucket']}/jasper", "train", batch_size=64,
                         storage_options=s3["options"]).sampler.chunk_rows is None
