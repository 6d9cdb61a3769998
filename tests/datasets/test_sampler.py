"""StoreSampler: deterministic from (seed, epoch), rank-aware, resumable; distributed over gloo."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from unistore.datasets import StoreSampler, create_loader
from unistore.errors import ShapeMismatchError


def test_deterministic_per_epoch() -> None:
    a, b = StoreSampler(100, seed=7), StoreSampler(100, seed=7)
    assert list(a) == list(b) and sorted(a) == list(range(100))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(100))
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(StoreSampler(100, seed=8)) != first
    assert list(StoreSampler(10, shuffle=False)) == list(range(10))


@pytest.mark.parametrize("n, world", [(100, 4), (103, 4), (7, 3), (2, 4)])
def test_rank_shards(n: int, world: int) -> None:
    shards = [list(StoreSampler(n, seed=1, rank=r, world_size=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)
    union = [i for s in shards for i in s]
    assert set(union) == set(range(n))
    assert len(union) - n == (-n) % world  # only the padding repeats
    if n % world == 0:
        assert len(set(union)) == len(union)  # disjoint
    dropped = [list(StoreSampler(n, seed=1, rank=r, world_size=world, drop_last=True)) for r in range(world)]
    flat = [i for s in dropped for i in s]
    assert len(flat) == len(set(flat)) == (n // world) * world
    with pytest.raises(ValueError, match="rank"):
        StoreSampler(n, rank=world, world_size=world)


def test_resume_mid_epoch_yields_exactly_the_rest() -> None:
    sampler = StoreSampler(50, seed=2, rank=1, world_size=2)
    sampler.set_epoch(3)
    full = list(sampler)
    it = iter(sampler)
    seen = [next(it) for _ in range(9)]
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["consumed"] == 9
    fresh = StoreSampler(50, seed=2, rank=1, world_size=2)
    fresh.load_state_dict(state)
    rest = list(fresh)
    assert seen + rest == full
    assert list(fresh) == full  # the epoch after a resumed one starts from the beginning
    with pytest.raises(ShapeMismatchError, match="seed"):
        StoreSampler(50, seed=9, rank=1, world_size=2).load_state_dict(state)


def assert_resumes_exactly(make: Callable[[], Any], key: str, taken: int) -> dict[str, Any]:
    """Stop a loader after ``taken`` batches, resume a new one from its state: together they give one epoch."""
    reference = [b[key] for b in make()]
    first = make()
    it = iter(first)
    seen = [next(it)[key] for _ in range(taken)]
    state = first.state_dict()
    del it
    second = make()
    second.load_state_dict(state)
    rest = [b[key] for b in second]
    assert len(seen) + len(rest) == len(reference)
    for a, b in zip(seen + rest, reference):
        torch.testing.assert_close(a, b)
    return state


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_counts_delivered_batches(workers: int, jasper_root: str) -> None:
    url = os.path.join(jasper_root, "pt")

    def loader() -> Any:
        return create_loader(url, "train", batch_size=5, num_workers=workers, seed=11, epoch=2)

    state = assert_resumes_exactly(loader, "question_emb", taken=4)  # workers have prefetched more than 4
    assert state["consumed"] == 20


def test_stateful_dataloader_contract(jasper_root: str) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    from unistore.datasets import JASPERSteeringDataset, collate

    dataset = JASPERSteeringDataset(os.path.join(jasper_root, "hdf5"), "train", use_mmap=True)

    def loader() -> Any:
        return StatefulDataLoader(dataset, batch_size=4, sampler=StoreSampler(dataset, seed=5), num_workers=2,
                                  collate_fn=collate)

    assert_resumes_exactly(loader, "target_source_emb", taken=5)


def test_two_process_gloo(jasper_root: str, tmp_path: Any) -> None:
    import torch.multiprocessing as mp

    from unistore.datasets import JASPERSteeringDataset

    from .dist_helpers import run_rank

    url = os.path.join(jasper_root, "npy")
    mp.spawn(run_rank, args=(2, url, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    n = len(JASPERSteeringDataset(url, "train"))
    for epoch in (0, 1):
        shards = [r[f"order_{epoch}"] for r in results]
        assert len(shards[0]) == len(shards[1]) == n // 2
        assert not set(shards[0]) & set(shards[1])
        assert set(shards[0]) | set(shards[1]) == set(range(n))
        for rank, shard in enumerate(shards):
            assert shard == StoreSampler(n, seed=3, rank=rank, world_size=2).order(epoch).tolist()
        assert all(r[f"batches_match_{epoch}"] for r in results)
    assert results[0]["order_0"] != results[0]["order_1"]
    assert [r["rank"] for r in results] == [0, 1] and results[0]["world_size"] == 2
    assert results[0]["batch_counts"] == results[1]["batch_counts"] == [n // 2 // 4 + (n // 2 % 4 > 0)] * 2


# ------------------------------------------------------------------ chunk-aware order
def _chunks_of(indices: np.ndarray, chunk_rows: int) -> set[int]:
    return set((np.asarray(indices) // chunk_rows).tolist())


@pytest.mark.parametrize("n, world", [(1000, 1), (1000, 4), (1003, 16), (64_000, 64)])
def test_chunk_aware_order_covers_each_sample_once_and_ranks_read_their_own_chunks(n: int, world: int) -> None:
    chunk = 25
    samplers = [StoreSampler(n, seed=3, rank=r, world_size=world, chunk_rows=chunk, window_chunks=4)
                for r in range(world)]
    shards = [np.array(list(s)) for s in samplers]
    everything = np.concatenate(shards)
    assert len(everything) == samplers[0].num_samples * world
    assert set(everything.tolist()) == set(range(n))  # every sample, padding repeats only at the end
    if n % world == 0:
        assert sorted(everything.tolist()) == list(range(n))
    n_chunks = -(-n // chunk)
    window = samplers[0].effective_window
    assert window == min(4, n_chunks // world)
    per_rank = [_chunks_of(s, chunk) for s in shards]
    # each rank's stretch spans its share of chunks plus the windows it shares at its two boundaries
    assert all(len(c) <= -(-n_chunks // world) + 2 * window for c in per_rank)
    shared = sum(len(a & b) for i, a in enumerate(per_rank) for b in per_rank[i + 1:])
    assert shared <= 2 * window * world  # padding may reuse the first chunks once more
    if world > 1:
        total_reads = sum(len(c) for c in per_rank)
        assert total_reads <= n_chunks + 2 * window * world
    if n_chunks >= 20 * world:  # 64 ranks on 2,560 chunks: all ranks together read each chunk about once
        assert sum(len(c) for c in per_rank) <= 1.1 * n_chunks


def test_chunk_aware_order_is_deterministic_shuffled_within_windows_and_resumable() -> None:
    n, chunk, window = 2000, 50, 4
    a = StoreSampler(n, seed=7, chunk_rows=chunk, window_chunks=window, rank=0, world_size=1)
    b = StoreSampler(n, seed=7, chunk_rows=chunk, window_chunks=window, rank=0, world_size=1)
    first = np.array(list(a))
    assert np.array_equal(first, np.array(list(b)))
    a.set_epoch(1)
    assert not np.array_equal(first, np.array(list(a)))
    # consecutive windows of window * chunk rows each draw from exactly `window` chunks, in shuffled order
    span = window * chunk
    for w in range(0, n, span):
        part = first[w:w + span]
        assert len(_chunks_of(part, chunk)) == window
        assert not np.array_equal(part, np.sort(part))
    # resume mid-epoch from a state dict
    it = iter(b)
    head = [next(it) for _ in range(123)]
    state = b.state_dict()
    c = StoreSampler(n, seed=7, chunk_rows=chunk, window_chunks=window, rank=0, world_size=1)
    c.load_state_dict(state)
    assert head + list(c) == first.tolist()
    with pytest.raises(ShapeMismatchError, match="chunk_rows"):
        StoreSampler(n, seed=7, chunk_rows=10, rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError):
        StoreSampler(n, chunk_rows=0, rank=0, world_size=1)


def test_chunk_aware_order_over_samples_that_read_other_rows() -> None:
    """``rows=``: samples reading rows of storage (a split of pairs, a subset) are grouped by their rows' chunks."""
    n_rows, chunk, window = 5000, 50, 4
    rows = np.sort(np.random.default_rng(1).choice(n_rows, 3000, replace=False))  # a split: 3,000 of the rows
    rows = np.random.default_rng(2).permutation(rows)  # in any order
    a = StoreSampler(len(rows), seed=5, chunk_rows=chunk, window_chunks=window, rank=0, world_size=1, rows=rows)
    first = np.array(list(a))
    assert sorted(first.tolist()) == list(range(len(rows)))  # every sample once
    chunks = rows[first] // chunk
    n_chunks = len(np.unique(rows // chunk))
    # each chunk of storage is read in one stretch of the order, done with before the chunk `window` stretches
    # later starts (windows of 4 chunks, shuffled within)
    spans: dict[int, list[int]] = {}
    for k, c in enumerate(chunks.tolist()):
        spans.setdefault(c, [k, k])[1] = k
    assert len(spans) == n_chunks
    stretches = sorted(spans.values())
    for (_, hi), (lo, _) in zip(stretches, stretches[window:]):
        assert lo > hi
    b = StoreSampler(len(rows), seed=5, chunk_rows=chunk, window_chunks=window, rank=0, world_size=1, rows=rows)
    assert np.array_equal(first, np.array(list(b)))  # deterministic
    # rows 0..n-1 give exactly the order over the samples themselves
    plain = StoreSampler(1000, seed=3, chunk_rows=chunk, rank=0, world_size=1)
    same = StoreSampler(1000, seed=3, chunk_rows=chunk, rank=0, world_size=1, rows=np.arange(1000))
    assert np.array_equal(np.array(list(plain)), np.array(list(same)))
    # ranks: disjoint shards covering the samples, each reading its own chunks but at boundaries
    shards = [np.array(list(StoreSampler(len(rows), seed=5, chunk_rows=chunk, rank=r, world_size=4, rows=rows)))
              for r in range(4)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(rows)))
    per_rank = [set((rows[s] // chunk).tolist()) for s in shards]
    assert sum(len(c) for c in per_rank) <= n_chunks + 2 * 4
    with pytest.raises(ShapeMismatchError, match="one per sample"):
        StoreSampler(10, chunk_rows=5, rows=np.arange(9))


# ------------------------------------------------------------------ elastic resume
def _run(n: int, world: int, epoch: int, **kw: Any) -> list[StoreSampler]:
    samplers = [StoreSampler(n, seed=4, rank=r, world_size=world, **kw) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers


def _draw(sampler: StoreSampler, count: int) -> list[int]:
    it = iter(sampler)
    return [next(it) for _ in range(count)]


ELASTIC = [(8, 6), (8, 12), (4, 1), (1, 4)]
ORDERS = {"plain": {}, "chunk-aware": {"chunk_rows": 16, "window_chunks": 4}}


@pytest.mark.parametrize("before, after", ELASTIC)
@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("stop", [0.0, 0.3, 0.77, 1.0])
def test_a_run_resumed_at_another_world_size_draws_each_sample_of_the_epoch_once(
        before: int, after: int, order: str, stop: float) -> None:
    n, epoch = 1003, 2
    first = _run(n, before, epoch, **ORDERS[order])
    share = len(first[0])
    taken = int(stop * share)
    drawn = [i for s in first for i in _draw(s, taken)]
    state = first[0].state_dict()  # rank 0's state describes the run: every rank drew as many
    assert state["world_size"] == before and state["partitions"] == before and state["consumed"] == taken
    second = _run(n, after, 0, **ORDERS[order])
    for s in second:
        s.load_state_dict(state)
    assert {s.epoch for s in second} == {epoch}
    rest = [list(s) for s in second]
    assert len({len(r) for r in rest}) == 1  # equal shares: a collective over batches does not hang
    everything = drawn + [i for r in rest for i in r]
    assert set(everything) == set(range(n))
    padded_before = max(0, taken * before - n)  # the first run's padding, drawn only if it got to the end
    assert len(everything) - n <= padded_before + after - 1  # padding only at the very end
    real = [i for r in rest for i in r][:n - len(set(drawn))]  # what the resumed ranks draw before any padding
    assert not set(real) & set(drawn) and len(set(real)) == len(real)
    # the next epochs follow the order of a run that never stopped (at its own world size)
    for s in second:
        s.set_epoch(epoch + 1)
    for reference in _run(n, before, epoch + 1, **ORDERS[order]):
        np.testing.assert_array_equal(reference.global_order(), second[0].global_order())
    dealt = np.concatenate([s.order() for s in second])[:n]
    np.testing.assert_array_equal(dealt, second[0].global_order())


@pytest.mark.parametrize("before, after", ELASTIC)
def test_chunk_aware_order_keeps_its_chunks_with_one_rank_across_a_resize(before: int, after: int) -> None:
    n, chunk = 4000, 10
    first = _run(n, before, 0, chunk_rows=chunk)
    for s in first:
        _draw(s, len(s) // 2)
    state = first[0].state_dict()
    second = _run(n, after, 0, chunk_rows=chunk)
    for s in second:
        s.load_state_dict(state)
    readers: dict[int, int] = {}
    for s in second:
        for c in _chunks_of(s.order(), chunk):
            readers[c] = readers.get(c, 0) + 1
    # ranks after the resize share only the chunks of the windows where their stretches meet
    assert sum(v - 1 for v in readers.values()) <= (after - 1) * 4
    # ... and the windows each rank of the first run stopped in (and those of the few samples padding the end)
    firsts = [_chunks_of(s.order()[:len(s) // 2], chunk) for s in first]
    again = set().union(*firsts) & set(readers)
    assert len(again) <= before * 4 + after - 1


def test_a_resumed_epoch_ends_and_the_next_pass_is_whole() -> None:
    first = _run(100, 4, 1)
    for s in first:
        _draw(s, 5)
    resumed = StoreSampler(100, seed=4, rank=0, world_size=2)
    resumed.load_state_dict(first[0].state_dict())
    assert len(resumed) == 40  # (100 - 4 * 5) / 2
    rest = list(resumed)
    assert len(rest) == 40 and len(resumed) == 50  # the length of the next pass: a whole epoch
    state = resumed.state_dict()  # at the end of the resumed pass: it still says what was dealt out
    assert state["consumed"] == 40 and state["segments"] is not None
    again = StoreSampler(100, seed=4, rank=1, world_size=2)
    again.load_state_dict(state)
    assert list(again) == []  # nothing of that epoch is left
    assert len(list(resumed)) == 50  # the next pass over the same epoch is the whole epoch


def test_the_partition_count_is_kept_and_a_changed_run_is_refused() -> None:
    state = _run(1000, 8, 0)[0].state_dict()
    explicit = StoreSampler(1000, seed=4, rank=0, world_size=2, partitions=16)
    with pytest.raises(ShapeMismatchError, match="partitions=8.*partitions=16"):
        explicit.load_state_dict(state)
    for change, sampler in (("n", StoreSampler(999, seed=4, rank=0, world_size=2)),
                            ("seed", StoreSampler(1000, seed=5, rank=0, world_size=2)),
                            ("chunk_rows", StoreSampler(1000, seed=4, rank=0, world_size=2, chunk_rows=10))):
        with pytest.raises(ShapeMismatchError, match=change):
            sampler.load_state_dict(state)
    adopting = StoreSampler(1000, seed=4, rank=0, world_size=2)
    adopting.load_state_dict(state)
    assert adopting.partitions == 8 and adopting.state_dict()["partitions"] == 8
    with pytest.raises(ValueError, match="partitions"):
        StoreSampler(10, partitions=0)
    # a run that starts at 2 ranks with 8 partitions reads what an 8-rank run reads, two parts per rank
    np.testing.assert_array_equal(np.concatenate([s.order() for s in _run(1000, 2, 3, partitions=8)]),
                                  np.concatenate([s.order() for s in _run(1000, 8, 3)]))


def _store_dataset(tmp_path: Any, n: int = 3000) -> Any:
    import unistore as us
    from unistore.datasets import StoreDataset

    url = str(tmp_path / "d.zarr")
    with us.create_store(url, format="zarr") as store:
        store.write_array("x", np.arange(n * 4, dtype=np.float32).reshape(n, 4), chunks=(100, 4))
        store.write_array("y", np.arange(n))
    return StoreDataset(url)


def _take_batches(loader: Any, count: int | None) -> list[int]:
    seen: list[int] = []
    for k, batch in enumerate(loader):
        np.testing.assert_array_equal(batch["x"].numpy()[:, 0], batch["y"].numpy() * 4)
        seen += batch["y"].tolist()
        if count is not None and k + 1 == count:
            break
    return seen


@pytest.mark.parametrize("before, after", [(4, 3), (2, 5)])
def test_make_loader_with_workers_and_read_ahead_resumes_at_another_world_size(tmp_path: Any, before: int,
                                                                               after: int) -> None:
    from unistore.datasets import make_loader, set_epoch

    ds = _store_dataset(tmp_path)

    def loader(rank: int, world: int) -> Any:
        return make_loader(ds, 50, seed=3, num_workers=2, chunk_rows=100, read_ahead=2, rank=rank, world_size=world)

    first = [loader(r, before) for r in range(before)]
    for ld in first:
        set_epoch(ld, 1)
    drawn = [i for ld in first for i in _take_batches(ld, 5)]
    state = first[0].state_dict()
    assert state["consumed"] == 250 and state["world_size"] == before
    second = [loader(r, after) for r in range(after)]
    for ld in second:
        ld.load_state_dict(state)
    rest = [_take_batches(ld, None) for ld in second]
    assert len({len(r) for r in rest}) == 1
    everything = drawn + [i for r in rest for i in r]
    assert set(everything) == set(range(len(ds))) and len(everything) - len(ds) <= after - 1
    for ld in second:
        set_epoch(ld, 2)
    following = np.concatenate([ld.sampler.order() for ld in second])[:len(ds)]
    np.testing.assert_array_equal(following, first[0].sampler.global_order(2))
    np.testing.assert_array_equal(np.array(_take_batches(second[0], None)), second[0].sampler.order())


def test_stateful_dataloader_resumes_at_another_world_size(tmp_path: Any) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    from unistore.datasets import collate

    ds = _store_dataset(tmp_path, n=1000)

    def loader(rank: int, world: int) -> Any:
        return StatefulDataLoader(ds, batch_size=20, num_workers=2, collate_fn=collate,
                                  sampler=StoreSampler(ds, seed=5, rank=rank, world_size=world, chunk_rows=100))

    first = [loader(r, 4) for r in range(4)]
    drawn = [i for ld in first for i in _take_batches(ld, 3)]
    state = first[0].state_dict()
    second = [loader(r, 3) for r in range(3)]
    for ld in second:
        ld.load_state_dict(state)
    everything = drawn + [i for ld in second for i in _take_batches(ld, None)]
    assert set(everything) == set(range(1000)) and len(everything) - 1000 <= 2


@pytest.mark.slow
def test_a_gloo_run_on_s3_killed_at_4_ranks_resumes_at_3(tmp_path: Any, s3: dict[str, Any]) -> None:
    import multiprocessing

    import unistore as us

    from ..conftest import s3_options
    from ..storage.faulty_proxy import FaultyProxy
    from .dist_helpers import run_elastic_rank

    # chunks of 100 KB: what each process lists of the store when it opens it stays a few per cent of the data
    n, dim = 100_000, 256
    url = f"s3://{s3['bucket']}/elastic.zarr"
    with us.create_store(url, format="zarr", storage_options=s3["options"]) as store:
        store.write_array("x", np.repeat(np.arange(n, dtype=np.float32)[:, None], dim, axis=1), chunks=(100, dim))
    stored = s3["fs"].du(url)
    proxy = FaultyProxy(s3["endpoint"])
    options = s3_options(proxy.endpoint)
    ctx = multiprocessing.get_context("spawn")

    def launch(world: int, phase: str, stop_after: int | None) -> list[int | None]:
        procs = [ctx.Process(target=run_elastic_rank, args=(r, world, url, options, str(tmp_path / f"rdv-{phase}"),
                                                            str(tmp_path), phase, stop_after)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
        return [p.exitcode for p in procs]

    def seen(phase: str, world: int) -> list[list[int]]:
        out = []
        for r in range(world):
            with open(tmp_path / f"{phase}-rank{r}.txt") as f:
                out.append([int(v) for line in f for v in line.split()])
        return out

    try:
        assert launch(4, "first", stop_after=60) == [-9] * 4  # killed
        assert launch(3, "resumed", stop_after=None) == [0] * 3
    finally:
        proxy.close()
    before, after = seen("first", 4), seen("resumed", 3)
    assert [len(s) for s in before] == [60 * 128] * 4
    assert len({len(s) for s in after}) == 1
    everything = [i for s in before + after for i in s]
    assert set(everything) == set(range(n)) and len(everything) - n <= 2  # each sample once; padding at the end
    # all ranks together, killed run and resumed one, fetched about the stored bytes once
    print(f"elastic 4 -> 3 ranks: bytes at the proxy / stored = {proxy.bytes_out / stored:.3f}")
    assert proxy.bytes_out <= 1.15 * stored, (proxy.bytes_out, stored)
