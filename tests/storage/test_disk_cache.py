"""The persistent local cache of remote reads, measured at the wire (a counting proxy before the S3 server)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import weakref
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore.storage.cache import DiskCache

from ..conftest import s3_options
from .faulty_proxy import FaultyProxy

pytestmark = pytest.mark.s3

ROWS, DIM = 4000, 64  # 1 MiB of float32


@pytest.fixture
def remote(s3: dict[str, Any], tmp_path: Any) -> Any:
    data = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    local = str(tmp_path / "src")
    with us.create_store(local, format="npy") as store:
        store.write_array("emb", data)
    s3["fs"].put(local + "/", f"{s3['bucket']}/emb", recursive=True)
    proxy = FaultyProxy(s3["endpoint"])
    yield {"url": f"s3://{s3['bucket']}/emb", "data": data, "proxy": proxy, "options": s3_options(proxy.endpoint),
           "local": local}
    proxy.close()


def _epoch(url: str, options: Any, cache: Any, seed: int) -> tuple[np.ndarray, dict[str, int]]:
    store = us.open_store(url, storage_options=options, cache=cache)
    arr = store["emb"]
    order = np.random.default_rng(seed).permutation(ROWS)
    rows = np.concatenate([arr.take(order[i:i + 256]) for i in range(0, ROWS, 256)])
    out = np.empty_like(rows)
    out[order] = rows
    return out, store.io_stats()


def test_second_epoch_makes_no_remote_requests(remote: Any, tmp_path: Any) -> None:
    cache = DiskCache(tmp_path / "cache", block_bytes=64 << 10)
    proxy = remote["proxy"]
    got, stats = _epoch(remote["url"], remote["options"], cache, seed=1)
    np.testing.assert_array_equal(got, remote["data"])
    first_gets, first_bytes = proxy.requests["GET"], proxy.bytes_out
    stored = remote["data"].nbytes
    assert first_bytes <= 1.1 * stored + 64 * 1024  # every block fetched once
    assert stats["disk_misses"] > 0 and stats["bytes_local"] > 0  # later batches hit blocks earlier ones fetched
    store = us.open_store(remote["url"], storage_options=remote["options"], cache=cache)
    arr = store["emb"]
    arr.layout.location.identity()  # the object's identity is asked once per open (one HEAD)
    proxy.reset_counts()
    order = np.random.default_rng(2).permutation(ROWS)
    for i in range(0, ROWS, 256):
        np.testing.assert_array_equal(arr.take(order[i:i + 256]), remote["data"][order[i:i + 256]])
    stats = store.io_stats()
    assert stats["requests"] == 0 and stats["disk_misses"] == 0 and stats["bytes_local"] >= stored
    assert proxy.total_requests == 0 and proxy.bytes_out == 0, proxy.requests  # at the wire: nothing
    assert first_gets > 0
    assert cache.info()["bytes"] >= stored


def test_changed_object_is_fetched_again(remote: Any, tmp_path: Any, s3: dict[str, Any]) -> None:
    cache = DiskCache(tmp_path / "cache", block_bytes=64 << 10)
    _epoch(remote["url"], remote["options"], cache, seed=1)
    new = remote["data"] + 1
    with us.create_store(str(tmp_path / "v2"), format="npy") as store:
        store.write_array("emb", new)
    s3["fs"].put(str(tmp_path / "v2") + "/", remote["url"][5:], recursive=True)
    got, stats = _epoch(remote["url"], remote["options"], cache, seed=3)
    np.testing.assert_array_equal(got, new)
    blocks = -(-(new.nbytes + 128) // (64 << 10))  # the .npy file, header included
    assert stats["disk_misses"] == blocks and stats["bytes"] >= new.nbytes  # nothing served from the old object


def test_corrupt_entry_is_refetched_not_served(remote: Any, tmp_path: Any) -> None:
    cache = DiskCache(tmp_path / "cache", block_bytes=64 << 10)
    _epoch(remote["url"], remote["options"], cache, seed=1)
    entries = sorted(e.path for e in cache._entries())
    with open(entries[3], "r+b") as f:  # flip bytes in one entry
        f.seek(100)
        f.write(b"\xff\xfe\xfd\xfc")
    with open(entries[5], "r+b") as f:  # truncate another
        f.truncate(1000)
    got, stats = _epoch(remote["url"], remote["options"], cache, seed=4)
    np.testing.assert_array_equal(got, remote["data"])
    assert stats["disk_misses"] == 2 and 0 < stats["bytes"] <= 2 * (64 << 10)


def test_eviction_keeps_the_cache_within_budget(remote: Any, tmp_path: Any) -> None:
    budget = 256 << 10
    cache = DiskCache(tmp_path / "cache", max_bytes=budget, block_bytes=32 << 10)
    got, _ = _epoch(remote["url"], remote["options"], cache, seed=1)
    np.testing.assert_array_equal(got, remote["data"])
    cache.evict()
    assert cache.info()["bytes"] <= budget
    got, stats = _epoch(remote["url"], remote["options"], cache, seed=2)  # still correct, partly refetched
    np.testing.assert_array_equal(got, remote["data"])
    assert stats["disk_misses"] > 0


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads this process's mappings (Linux)")
def test_entries_evicted_while_mapped_leave_the_disk(remote: Any, tmp_path: Any) -> None:
    """An object larger than the budget is not mapped whole (its blocks are read one by one), and a process keeps
    at most 1/8 of the budget mapped: what eviction deletes leaves the disk while the store is still open,
    where a file deleted while mapped keeps its disk space until it is unmapped."""
    budget, block = 256 << 10, 32 << 10
    root = str(tmp_path / "cache")
    store = us.open_store(remote["url"], storage_options=remote["options"],
                          cache=DiskCache(root, max_bytes=budget, block_bytes=block))
    arr = store["emb"]
    for seed in (1, 2):
        order = np.random.default_rng(seed).permutation(ROWS)
        for i in range(0, ROWS, 256):
            np.testing.assert_array_equal(arr.take(order[i:i + 256]), remote["data"][order[i:i + 256]])
    assert _pinned(root) <= budget // 8, _pinned(root)
    assert DiskCache(root, max_bytes=budget).info()["bytes"] <= budget
    store.close()


def _pinned(root: str) -> int:
    """Bytes of files under ``root`` this process still maps though they were deleted."""
    pinned = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if root in line and line.rstrip().endswith("(deleted)"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                pinned += hi - lo
    return pinned


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads this process's mappings (Linux)")
def test_objects_that_fit_but_not_together_leave_evicted_blocks_unmapped(s3: dict[str, Any], remote: Any,
                                                                          tmp_path: Any) -> None:
    """Two objects, each within the budget and mapped whole, read in turn: each evicts the other's blocks.
    Every so often a process looks for evicted blocks it still maps and lets that object go (mapping afresh
    what the cache holds), so the disk space of evicted blocks is freed while the stores stay open."""
    s3["fs"].put(remote["local"] + "/", f"{s3['bucket']}/emb2", recursive=True)
    budget, block = 1536 << 10, 32 << 10  # each object 1 MiB: both do not fit
    root = str(tmp_path / "cache")
    arrays = [us.open_store(remote["url"] + suffix, storage_options=remote["options"],
                            cache=DiskCache(root, max_bytes=budget, block_bytes=block))["emb"] for suffix in ("", "2")]
    for round_ in range(3):
        for arr in arrays:
            order = np.random.default_rng(round_).permutation(ROWS)
            for i in range(0, ROWS, 500):
                np.testing.assert_array_equal(arr.take(order[i:i + 500]), remote["data"][order[i:i + 500]])
            if round_ == 0 and arr is arrays[0]:
                assert arr.layout.source.mapped.complete  # within the budget: mapped whole
    assert _pinned(root) <= budget // 8, _pinned(root)  # 448 KiB when objects mapped whole were kept
    # a writer evicts each time it has added 1/20 of the budget
    assert DiskCache(root, max_bytes=budget).info()["bytes"] <= budget
    assert not all(arr.is_cached() for arr in arrays)  # both do not fit


def test_readers_in_threads_while_mapped_objects_are_let_go(s3: dict[str, Any], remote: Any, tmp_path: Any) -> None:
    """Four threads read three objects that do not fit together, so that objects with evicted blocks are let
    go (and mapped afresh) while other threads read them: every read returns the right rows, none crashes."""
    for i in (2, 3):
        s3["fs"].put(remote["local"] + "/", f"{s3['bucket']}/emb{i}", recursive=True)
    root = str(tmp_path / "cache")
    arrays = [us.open_store(remote["url"] + suffix, storage_options=remote["options"],
                            cache=DiskCache(root, max_bytes=1536 << 10, block_bytes=32 << 10))["emb"]
              for suffix in ("", "2", "3")]
    errors: list[str] = []
    seen: weakref.WeakSet[Any] = weakref.WeakSet()  # without keeping them alive: a let-go object is unmapped
    made, reads = [0], [0]

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        end = time.monotonic() + 3
        while time.monotonic() < end:
            arr = arrays[int(rng.integers(3))]
            rows = rng.integers(0, ROWS, 300)
            try:
                if not np.array_equal(arr.take(rows), remote["data"][rows]):
                    errors.append("wrong rows")
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
            whole = arr.layout.source.mapped
            if whole and whole not in seen:
                seen.add(whole)
                made[0] += 1
            del whole
            reads[0] += 1

    threads = [threading.Thread(target=read, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert reads[0] > 20
    assert made[0] > len(arrays)  # objects were let go and mapped afresh while others read


def _fill(url: str, options: Any, root: str, seed: int, out: Any) -> None:
    got, stats = _epoch(url, options, DiskCache(root, block_bytes=16 << 10), seed)
    out.put((got.tobytes(), stats["requests"]))


def test_two_processes_fill_one_cache_at_once(remote: Any, tmp_path: Any) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    root = str(tmp_path / "cache")
    procs = [ctx.Process(target=_fill, args=(remote["url"], remote["options"], root, seed, queue)) for seed in (1, 2)]
    remote["proxy"].reset_counts()
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for raw, _ in results:
        np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(ROWS, DIM), remote["data"])
    # a block both wanted at once was fetched by one while the other waited for it
    assert remote["proxy"].bytes_out <= remote["data"].nbytes + 2 * (16 << 10), remote["proxy"].bytes_out
    cache = DiskCache(root, block_bytes=16 << 10)
    assert not [e for e in os.listdir(root) if ".tmp-" in e]
    got, stats = _epoch(remote["url"], remote["options"], cache, seed=3)  # every entry intact: all hits
    np.testing.assert_array_equal(got, remote["data"])
    assert stats["requests"] == 0 and stats["disk_misses"] == 0


def test_cache_from_environment_and_cli(remote: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from unistore.cli import main

    monkeypatch.setenv("UNISTORE_CACHE_DIR", str(tmp_path / "envcache"))
    _epoch(remote["url"], remote["options"], None, seed=1)
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "envcache") in out and "entries" in out
    assert DiskCache(tmp_path / "envcache").info()["bytes"] >= remote["data"].nbytes
    assert main(["cache", "clear"]) == 0
    assert DiskCache(tmp_path / "envcache").info()["entries"] == 0
    assert os.listdir(tmp_path / "envcache") in ([], [".evict.lock"])  # no folders or lock files left either
    _, stats = _epoch(remote["url"], remote["options"], False, seed=1)  # cache=False: none
    assert stats["disk_hits"] == stats["disk_misses"] == 0


@pytest.mark.parametrize("shards", [None, 4])
def test_zarr_chunks_are_cached_on_disk(s3: dict[str, Any], tmp_path: Any, shards: int | None) -> None:
    """Chunk (or shard) objects of a compressed zarr array: fetched once, then read from the local cache."""
    from unistore.storage.cache import chunk_cache

    data = np.random.default_rng(5).standard_normal((ROWS, DIM)).astype(np.float32)
    local = str(tmp_path / "z.zarr")
    with us.create_store(local, format="zarr", **({"shards": shards} if shards else {})) as store:
        store.write_array("emb", data, chunks=(250, DIM), compression="zstd")
    s3["fs"].put(local + "/", f"{s3['bucket']}/z.zarr", recursive=True)
    proxy = FaultyProxy(s3["endpoint"])
    try:
        url, options = f"s3://{s3['bucket']}/z.zarr", s3_options(proxy.endpoint)
        cache = DiskCache(tmp_path / "cache", block_bytes=64 << 10)
        got, stats = _epoch(url, options, cache, seed=1)
        np.testing.assert_array_equal(got, data)
        assert stats["disk_misses"] > 0
        chunk_gets = sum(n for (m, p), n in proxy.paths.items() if m == "GET" and "/c/" in p)
        assert chunk_gets >= (ROWS // 250 if shards is None else ROWS // 1000)
        chunk_cache.clear()
        proxy.reset_counts()
        got, stats = _epoch(url, options, cache, seed=2)  # a fresh open: metadata from storage, chunks from disk
        np.testing.assert_array_equal(got, data)
        assert not [p for (m, p) in proxy.paths if "/c/" in p], proxy.paths
        assert stats["disk_misses"] == 0 and stats["disk_hits"] > 0 and stats["bytes_local"] > 0
    finally:
        proxy.close()


def test_prefetch_fills_the_cache_without_assembling_rows(remote: Any, tmp_path: Any) -> None:
    cache = DiskCache(tmp_path / "cache", block_bytes=64 << 10)
    proxy = remote["proxy"]
    store = us.open_store(remote["url"], storage_options=remote["options"], cache=cache)
    arr = store["emb"]
    rows = np.arange(1000, 1600)  # 600 rows of 256 bytes: a few 64 KiB blocks
    arr.layout.location.identity()
    proxy.reset_counts()
    assert arr.prefetch(rows) is None
    fetched = proxy.bytes_out
    assert 0 < fetched <= (600 * 256 // (64 << 10) + 2) * (64 << 10)
    assert store.io_stats()["disk_misses"] > 0
    proxy.reset_counts()
    np.testing.assert_array_equal(arr.take(rows[::-1]), remote["data"][rows[::-1]])
    assert proxy.total_requests == 0  # the read that follows is local
    arr.prefetch(rows)  # already cached: nothing fetched
    assert proxy.total_requests == 0
    with pytest.raises(us.errors.OutOfBoundsError):
        arr.prefetch([ROWS])


@pytest.mark.parametrize("dim,block", [(7, 4096), (750, 4096), (5000, 4096), (64, 65536), (64, 5000), (750, 5000)])
def test_rows_gathered_out_of_cached_blocks(s3: dict[str, Any], tmp_path: Any, dim: int, block: int) -> None:
    """Rows inside one block, rows split between blocks, rows longer than a block: all equal to the source,
    gathered from the blocks mapped side by side (blocks of whole pages) or block by block (others)."""
    data = np.random.default_rng(dim).standard_normal((300, dim))  # float64 rows of 56 B to 40 KB
    local = str(tmp_path / "src")
    with us.create_store(local, format="npy") as store:
        store.write_array("emb", data)
    s3["fs"].put(local + "/", f"{s3['bucket']}/g", recursive=True)
    cache = DiskCache(tmp_path / "cache", block_bytes=block)
    arr = us.open_store(f"s3://{s3['bucket']}/g", storage_options=s3["options"], cache=cache)["emb"]
    rng = np.random.default_rng(1)
    for idx in (rng.integers(0, 300, 64), np.arange(300)[::-1], [299, 0, 0, 150], rng.permutation(300)):
        np.testing.assert_array_equal(arr.take(idx), data[idx])
    again = us.open_store(f"s3://{s3['bucket']}/g", storage_options=s3["options"], cache=cache)
    idx = rng.permutation(300)[:100]
    np.testing.assert_array_equal(again["emb"].take(idx), data[idx])  # all from the cache now
    assert again.io_stats()["disk_misses"] == 0 and again.io_stats()["requests"] == 0
    mapped = again["emb"].layout.source.mapped
    if block % 4096:
        assert mapped is False  # blocks that are not whole pages cannot be mapped side by side
    else:
        assert mapped.mapped.any() and mapped.size == again["emb"].layout.location.identity()[1]


def _take_in_child(arr: Any, rows: np.ndarray, out: Any) -> None:
    out.put(arr.take(rows).tobytes())


def test_cached_blocks_are_mapped_once_and_inherited_by_forked_workers(remote: Any, tmp_path: Any) -> None:
    """prepare_for_workers maps every cached block side by side; a forked child reads through that mapping
    with no request, and mapped rows stay readable after their files are evicted."""
    import multiprocessing

    cache = DiskCache(tmp_path / "cache", block_bytes=64 << 10)
    _epoch(remote["url"], remote["options"], cache, seed=1)
    store = us.open_store(remote["url"], storage_options=remote["options"], cache=cache)
    arr = store["emb"]
    proxy = remote["proxy"]
    arr.prepare_for_workers()
    whole = arr.layout.source.mapped
    assert whole.mapped.all()  # every block the cache holds, mapped before any read
    proxy.reset_counts()
    rows = np.random.default_rng(7).permutation(ROWS)[:1000]
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_take_in_child, args=(arr, rows, queue))
    child.start()
    got = np.frombuffer(queue.get(timeout=60), np.float32).reshape(len(rows), DIM)
    child.join(30)
    np.testing.assert_array_equal(got, remote["data"][rows])
    assert proxy.total_requests == 0
    cache.clear()  # evicted while mapped: this open still serves the bytes it checked
    np.testing.assert_array_equal(arr.take(rows), remote["data"][rows])
    assert proxy.total_requests == 0 and store.io_stats()["disk_misses"] == 0
    got, stats = _epoch(remote["url"], remote["options"], cache, seed=2)  # a new open fetches them again
    np.testing.assert_array_equal(got, remote["data"])
    assert stats["disk_misses"] > 0 and proxy.bytes_out >= remote["data"].nbytes


def test_readers_wanting_one_block_at_once_fetch_it_once(remote: Any, tmp_path: Any) -> None:
    """Eight threads, each with its own open store, ask for the same rows while every request takes 50 ms:
    one fetches each block, the others wait for it (figures from the proxy)."""
    from concurrent.futures import ThreadPoolExecutor

    cache_root = tmp_path / "cache"
    proxy = remote["proxy"]
    stores = [us.open_store(remote["url"], storage_options=remote["options"], cache=DiskCache(cache_root))
              for _ in range(8)]
    for s in stores:
        s["emb"].layout.location.identity()
    rows = np.arange(0, ROWS, 7)
    proxy.reset_counts()
    proxy.latency = 0.05
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda s: s["emb"].take(rows), stores))
    finally:
        proxy.latency = 0.0
    for g in got:
        np.testing.assert_array_equal(g, remote["data"][rows])
    assert proxy.bytes_out <= remote["data"].nbytes + 1024, proxy.bytes_out  # 8 readers, the array once
    assert sum(s.io_stats()["requests"] for s in stores) == proxy.requests["GET"]


def test_objects_beyond_the_mapping_budget_are_read_block_by_block(remote: Any, tmp_path: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from unistore.storage import budget
    from unistore.storage.cache import mapping

    monkeypatch.setattr(budget, "MAX_MAPPED_BLOCKS", mapping._MAPPED[0] + 3)  # the object has 17
    cache = DiskCache(tmp_path / "cache", block_bytes=64 << 10)
    for _ in range(2):  # fetched, then from the cache
        store = us.open_store(remote["url"], storage_options=remote["options"], cache=cache)
        order = np.random.default_rng(3).permutation(ROWS)
        for i in range(0, ROWS, 500):
            np.testing.assert_array_equal(store["emb"].take(order[i:i + 500]), remote["data"][order[i:i + 500]])
        assert store["emb"].layout.source.mapped is False
    assert store.io_stats()["requests"] == 0 and store.io_stats()["disk_hits"] > 0


def test_read_ahead_leaves_blocks_someone_is_fetching_to_them(tmp_path: Any) -> None:
    """``ensure`` (what a read-ahead calls) fetches the blocks nobody has claimed and does not wait for the
    others; a reader that needs a claimed block waits for it and then finds it."""
    import threading

    cache = DiskCache(tmp_path / "cache", block_bytes=4096)
    payload = np.random.default_rng(0).integers(0, 256, 4 * 4096, dtype=np.uint8).tobytes()
    fetched: list[tuple[int, int]] = []

    def fetch(starts: np.ndarray, ends: np.ndarray) -> list[bytes]:
        fetched.extend(zip(starts.tolist(), ends.tolist()))
        return [payload[s:e] for s, e in zip(starts.tolist(), ends.tolist())]

    def stream(start: int, end: int, writer: Any) -> int:  # what a read-ahead hands ``ensure``
        fetched.append((start, end))
        writer.begin()
        for at in range(start, end, 1000):  # in pieces that do not line up with the blocks
            writer.write(payload[at:min(at + 1000, end)])
        writer.finish()
        return end - start

    held = threading.Event()
    done = threading.Event()
    waited_out: list[bool] = []

    def producer() -> None:  # another thread is fetching block 1 until ensure has returned
        _, _, token = cache.claim("obj", ["1"])
        held.set()
        waited_out.append(not done.wait(5))
        cache._put(os.path.join(cache._dir("obj"), "1"), payload[4096:8192])
        cache.release(token)

    t = threading.Thread(target=producer)
    t.start()
    held.wait(30)
    try:
        counts = cache.ensure("obj", len(payload), np.array([0]), np.array([len(payload)]), stream)
        assert sorted(fetched) == [(0, 4096), (8192, 16384)]  # blocks 0, 2, 3; block 1 left to its fetcher
        assert counts["misses"] == 4
    finally:
        done.set()
        t.join()
    assert waited_out == [False]  # ensure returned while block 1 was still being fetched
    fetched.clear()
    got, _ = cache.read_ranges("obj", len(payload), np.array([0]), np.array([len(payload)]), fetch)
    assert b"".join(got) == payload and fetched == []


def test_an_entry_written_again_replaces_the_one_there(tmp_path: Any) -> None:
    cache = DiskCache(tmp_path / "cache")
    path = os.path.join(cache._dir("obj"), "0")
    assert cache._put(path, b"a" * 100) and cache._put(path, b"b" * 100)
    assert bytes(cache._get(path, 100)) == b"b" * 100
    assert sorted(os.listdir(os.path.dirname(path))) == ["0"]  # no temporary file left behind


def test_an_entry_with_a_crc32_trailer_is_fetched_again_not_served(tmp_path: Any) -> None:
    """An entry sealed with a 12-byte trailer (length, CRC-32 of payload and place: the layout before XXH3-64)
    is not this entry: it is deleted and the block fetched and written again."""
    import struct
    import zlib

    cache = DiskCache(tmp_path / "cache")
    payload = bytes(range(256)) * 4
    path = os.path.join(cache._dir("obj"), "0")
    os.makedirs(os.path.dirname(path))
    crc = zlib.crc32(os.path.relpath(path, cache.root).encode(), zlib.crc32(payload))
    with open(path, "wb") as f:
        f.write(payload + struct.pack("<QI", len(payload), crc))
    assert cache._get(path, len(payload)) is None and not os.path.exists(path)
    fetched: list[tuple[int, int]] = []

    def fetch(starts: Any, ends: Any) -> list[bytes]:
        fetched.extend(zip(starts.tolist(), ends.tolist()))
        return [payload[s:e] for s, e in zip(starts, ends)]

    got, _ = cache.read_ranges("obj", len(payload), np.array([0]), np.array([len(payload)]), fetch)
    assert b"".join(got) == payload and fetched == [(0, len(payload))]
    assert os.path.getsize(path) == len(payload) + 16


def test_the_usage_count_is_rewritten_in_place(tmp_path: Any) -> None:
    cache = DiskCache(tmp_path / "cache")
    os.makedirs(cache.root)
    usage = os.path.join(cache.root, ".usage")
    with open(usage, "w") as f:
        f.write("123")  # a count written unpadded reads as it is
    assert cache._usage() == 123
    for value in (10**12, 7, 0):  # a shorter number replaces a longer one whole
        cache._usage(value)
        assert cache._usage() == value
    inode = os.stat(usage).st_ino
    assert cache._put(os.path.join(cache._dir("obj"), "0"), b"x" * 100)
    assert cache._usage() == 100 + 16  # the payload and its trailer (length and checksum)
    assert os.stat(usage).st_ino == inode

def _entry_paths(cache: DiskCache) -> list[str]:
    return sorted((e.path for e in cache._entries()), key=lambda p: (os.path.dirname(p), int(os.path.basename(p))))


def test_a_block_moved_copied_or_linked_into_another_place_is_not_served(remote: Any, tmp_path: Any) -> None:
    import shutil

    cache = DiskCache(tmp_path / "cache", block_bytes=64 << 10)
    _epoch(remote["url"], remote["options"], cache, seed=1)
    entries = _entry_paths(cache)
    swap = entries[2] + ".swap"
    os.rename(entries[2], swap)  # blocks 2 and 3 swapped (inodes, marks and mtimes travel with them)
    os.rename(entries[3], entries[2])
    os.rename(swap, entries[3])
    os.remove(entries[5])
    os.link(entries[6], entries[5])  # block 6 linked in as block 5
    os.remove(entries[7])
    shutil.copy2(entries[8], entries[7])  # block 8 copied in as block 7
    got, stats = _epoch(remote["url"], remote["options"], DiskCache(tmp_path / "cache", block_bytes=64 << 10), seed=4)
    np.testing.assert_array_equal(got, remote["data"])
    assert stats["disk_misses"] == 4


def test_bit_rot_that_keeps_the_mtime_is_found_once_the_mark_is_old(remote: Any, tmp_path: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from unistore.storage import budget

    cache = DiskCache(tmp_path / "cache", block_bytes=64 << 10)
    _epoch(remote["url"], remote["options"], cache, seed=1)
    victim = _entry_paths(cache)[4]
    st = os.stat(victim)
    with open(victim, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x11\x22\x33")
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # the rot keeps size, inode and mtime
    monkeypatch.setattr(budget, "REVERIFY_SECONDS", 0.0)  # as if the mark were a day old
    got, stats = _epoch(remote["url"], remote["options"], DiskCache(tmp_path / "cache", block_bytes=64 << 10), seed=4)
    np.testing.assert_array_equal(got, remote["data"])
    assert stats["disk_misses"] == 1


@pytest.mark.parametrize("transport", ["obstore", "fsspec"])
def test_reads_are_pinned_to_the_version_opened(transport: str, remote: Any, tmp_path: Any,
                                                s3: dict[str, Any]) -> None:
    """An object rewritten under an open cached store: rows already cached stay the version opened, rows still to
    fetch are StoreChangedError (never the new bytes filed under the old identity), and once the object is
    restored a fresh open reads the original everywhere."""
    from unistore import errors

    cache = DiskCache(tmp_path / "cache", block_bytes=64 << 10)
    data = remote["data"]
    store = us.open_store(remote["url"], storage_options=remote["options"], cache=cache, transport=transport)
    np.testing.assert_array_equal(store["emb"].take(np.arange(0, 200)), data[:200])  # blocks 0-1 cached
    key = f"{s3['bucket']}/emb/emb.npy"
    original = s3["fs"].cat_file(key)
    s3["fs"].pipe_file(key, original[:128] + bytes(len(original) - 128))  # same header and size, other rows
    np.testing.assert_array_equal(store["emb"].take([5, 150]), data[[5, 150]])  # cached: the version opened
    with pytest.raises(errors.StoreChangedError, match="rewritten"):
        store["emb"].take([3900])
    s3["fs"].pipe_file(key, original)  # restored: its ETag is the original's again
    again = us.open_store(remote["url"], storage_options=remote["options"], cache=cache)
    got = again["emb"].take(np.arange(ROWS))
    np.testing.assert_array_equal(got, data)


def test_a_run_written_as_it_arrives_keeps_the_blocks_completed_before_a_failure(tmp_path: Any) -> None:
    """A read-ahead writes each block straight from the pieces received; when the stream breaks, the blocks
    already whole stay in place, the half-written one leaves nothing behind, and the next attempt starts at it."""
    from unistore.storage.cache import BlockWriter

    bs = 4096
    cache = DiskCache(tmp_path / "cache", block_bytes=bs)
    payload = np.random.default_rng(5).integers(0, 256, 4 * bs + 100, dtype=np.uint8).tobytes()  # 5 blocks
    size = len(payload)
    writer = BlockWriter(cache, "obj", size, 0, size)
    assert writer.begin() == 0
    for at in range(0, 2 * bs + 1500, 1000):  # 2.x blocks arrive, then the connection breaks
        writer.write(payload[at:min(at + 1000, 2 * bs + 1500)])
    folder = cache._dir("obj")
    assert sorted(os.listdir(folder))[:2] == ["0", "1"] and any(".tmp-" in n for n in os.listdir(folder))
    assert writer.begin() == 2 * bs  # the retry asks from the first block not in place
    assert sorted(os.listdir(folder)) == ["0", "1"]  # the half-written block is gone
    with pytest.raises(OSError, match="got more"):
        writer.write(payload[2 * bs:] + b"extra")
    writer.begin()
    writer.write(payload[2 * bs:3 * bs + 10])
    with pytest.raises(OSError, match="stream ended"):  # a short stream is retried, never kept
        writer.finish()
    assert writer.begin() == 3 * bs
    writer.write(payload[3 * bs:])
    writer.finish()
    assert sorted(os.listdir(folder)) == ["0", "1", "2", "3", "4"]
    got, counts = cache.read_ranges("obj", size, np.array([0]), np.array([size]), lambda s, e: [])
    assert b"".join(got) == payload and counts["misses"] == 0  # every entry passes its CRC
    assert cache._usage() == sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))


@pytest.mark.parametrize("transport", ["obstore", "fsspec"])
def test_a_body_cut_short_is_fetched_again_from_the_first_block_not_in_place(transport: str, remote: Any,
                                                                             tmp_path: Any) -> None:
    """obstore hands the body over as it arrives: the blocks it completed stay, and the retry asks for the rest.
    fsspec's clients hand it over whole: nothing is written from a body cut short, and the retry asks again."""
    cache = DiskCache(tmp_path / "cache", block_bytes=64 << 10)
    proxy = remote["proxy"]
    arr = us.open_store(remote["url"], storage_options=remote["options"], cache=cache, transport=transport)["emb"]
    arr.layout.location.identity()
    proxy.reset_counts()
    proxy.mode, proxy.fail_next = "short", 1  # the first answer stops halfway through its body
    arr.prefetch(np.arange(ROWS))
    assert proxy.failures == 1 and proxy.requests["GET"] == 2
    # the second request asked only for the blocks the first did not complete (the proxy counts what it
    # relayed in full: the retry, not the half answer), from a block's first byte
    size = arr.layout.location.known_identity[1]
    if transport == "obstore":
        assert 0 < proxy.bytes_out <= size - (64 << 10), proxy.bytes_out
        assert (size - proxy.bytes_out) % (64 << 10) == 0
    else:
        assert proxy.bytes_out == size
    assert len(os.listdir(cache._dir(arr.layout.location.known_identity[0]))) == -(-size // (64 << 10))
    proxy.reset_counts()
    np.testing.assert_array_equal(arr.take(np.arange(ROWS)), remote["data"])
    assert proxy.total_requests == 0


def test_a_read_ahead_makes_a_block_whose_lock_was_shared_once_the_lock_is_free(tmp_path: Any,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims share a pool of lock files.  A read-ahead that finds a block's lock held by another thread making
    another entry skips it at first, makes its other blocks, then tries it once more and makes it, the lock
    being free by then; it never waits on the lock."""
    from unistore.storage import budget

    monkeypatch.setattr(budget, "N_LOCKS", 2)
    bs = 4096
    cache = DiskCache(tmp_path / "cache", block_bytes=bs)
    payload = np.random.default_rng(6).integers(0, 256, 4 * bs, dtype=np.uint8).tobytes()
    # an object whose 4 blocks fall on both lock files, and an entry of another object sharing block 0's lock
    identity = next(f"obj{i}" for i in range(100)
                    if len({cache._lock_path(f"obj{i}", str(b)) for b in range(4)}) == 2)
    shared = cache._lock_path(identity, "0")
    blocked = [str(b) for b in range(4) if cache._lock_path(identity, str(b)) == shared]
    other = next(f"x{i}" for i in range(100) if cache._lock_path("other", f"x{i}") == shared)
    holding, let_go, gone = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:  # another thread making entry "other/x": it holds the shared lock meanwhile
        mine, _, token = cache.claim("other", [other])
        assert mine == [other]
        holding.set()
        let_go.wait(10)
        cache.release(token)
        gone.set()

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    asked: list[tuple[int, int]] = []

    def stream(start: int, end: int, writer: Any) -> int:
        asked.append((start, end))
        let_go.set()  # the other entry is made while this run is fetched
        assert gone.wait(10)
        assert writer.begin() == start
        writer.write(payload[start:end])
        writer.finish()
        return end - start

    counts = cache.ensure(identity, len(payload), np.array([0]), np.array([len(payload)]), stream)
    holder.join()
    assert counts["misses"] == 4 and counts["bytes_remote"] == len(payload)
    fetched = sorted({str(b) for s, e in asked for b in range(s // bs, e // bs)})
    assert fetched == ["0", "1", "2", "3"]
    assert any(s == int(blocked[0]) * bs for s, _ in asked[1:]), asked  # the shared-lock blocks came second
    got, again = cache.read_ranges(identity, len(payload), np.array([0]), np.array([len(payload)]), lambda s, e: [])
    assert b"".join(got) == payload and again["misses"] == 0
