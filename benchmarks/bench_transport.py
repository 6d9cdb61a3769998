"""Client CPU per GiB of object bytes: the obstore transport against fsspec (s3fs), same server, same ranges.

Two access patterns over one object on moto's S3 server (its own process;
the same calls once more through the counting proxy check that both
transports ask for the same requests and bytes):

- ``sequential``: the object read in 2 MiB ranges, as a disk cache fills;
- ``random rows``: batches of rows at random (a ``.npy`` read with no disk
  cache), each batch one call (rows merged where they touch);
- ``disk-cache fill``: the whole object into a fresh disk cache in 16 MiB
  runs, four threads, through obstore: each run fetched whole and then
  written as blocks, or written into its blocks as the bytes arrive (what a
  read-ahead, and a read of an object mapped side by side, do).

The first two are measured at three levels: s3fs's ``cat_ranges`` called directly
(the reference), unistore's transports (``Location.transport.get_ranges``),
and ``Array.take`` end to end (random rows only).  CPU is this process's
(every thread: what the reader pays), ratios are taken in the same run.
One client's CPU for the same bytes varies by a third between runs a
minute apart on this machine, so every client is measured ``--rounds``
times, the clients of a pattern taken in turn, and each keeps its best
round.

    python benchmarks/bench_transport.py [--mib 300] [--batches 20] [--batch 256] [--rounds 3]
                                         [--patterns sequential,random,fill]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from wire import s3_behind_proxy  # noqa: E402


@dataclass(frozen=True)
class Cost:
    """What one call of a client cost this process: CPU seconds in user space and in the kernel (receiving, and
    the first touch of each new page of memory: ``faults``), wall seconds, and the bytes it returned."""

    user: float
    kernel: float
    faults: int
    wall: float
    nbytes: int

    @property
    def cpu(self) -> float:
        return self.user + self.kernel


#: the --patterns names and the table's names for them
PATTERNS = {"sequential": "sequential 2 MiB", "random": "random rows", "fill": "disk-cache fill"}


def measure(fn: Callable[[], int]) -> Cost:
    """What ``fn`` cost this process (every thread)."""
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    nbytes = fn()
    wall, r1 = time.perf_counter() - w0, resource.getrusage(resource.RUSAGE_SELF)
    return Cost(r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt, wall, nbytes)


def best_in_turn(cases: list[tuple[str, Callable[[], int]]], rounds: int) -> dict[str, Cost]:
    """Each case's least-CPU round of ``rounds``, the cases taken in turn within every round (after one warm-up
    call each: connections, first-call imports)."""
    for _, fn in cases:
        fn()
    best: dict[str, Cost] = {}
    for _ in range(rounds):
        for name, fn in cases:
            got = measure(fn)
            if name not in best or got.cpu < best[name].cpu:
                best[name] = got
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=300, help="object size")
    parser.add_argument("--dim", type=int, default=384, help="float32 values per row")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256, help="rows per random batch")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client, taken in turn; best kept")
    parser.add_argument("--patterns", default="sequential,random,fill",
                        help="comma-separated: sequential, random (the slowest: about 5 of the 7 minutes), fill")
    args = parser.parse_args()
    unknown = set(args.patterns.split(",")) - set(PATTERNS)
    if unknown:
        parser.error(f"--patterns takes {', '.join(PATTERNS)}; got {', '.join(sorted(unknown))}")

    import s3fs

    import unistore as us
    from unistore.storage.cache import DiskCache
    from unistore.storage.layout import IOStats
    from unistore.storage.sources import RemoteObject

    rows = (args.mib << 20) // (args.dim * 4)
    data = np.random.default_rng(0).standard_normal((rows, args.dim)).astype(np.float32)
    rng = np.random.default_rng(1)
    batches = [np.sort(rng.choice(rows, args.batch, replace=False)) for _ in range(args.batches)]
    with tempfile.TemporaryDirectory() as tmp, s3_behind_proxy() as wire:
        local = os.path.join(tmp, "emb_npy")
        with us.create_store(local, format="npy") as store:
            store.write_array("emb", data)
        url = wire.upload(local, "emb_npy")
        # CPU is measured straight to the server (a proxy in between re-chunks the bytes it relays); the same
        # calls are then made once through the proxy, which counts them
        stores = {(t, via_proxy): us.open_store(url, storage_options=wire.options if via_proxy else wire.direct,
                                                transport=t, cache=False)
                  for t in ("fsspec", "obstore") for via_proxy in (False, True)}
        layout = stores[("fsspec", False)]["emb"].layout
        path, offset, row = layout.location.path, layout.offset, layout.row_nbytes
        size = offset + rows * row
        seq = (list(range(0, size, 2 << 20)), [min(s + (2 << 20), size) for s in range(0, size, 2 << 20)])
        rand = [([offset + int(i) * row for i in b], [offset + int(i) * row + row for i in b]) for b in batches]
        filesystems = {p: s3fs.S3FileSystem(skip_instance_cache=True, **(wire.options if p else wire.direct))
                       for p in (False, True)}

        def raw(jobs: list[tuple[list[int], list[int]]]) -> Callable[[bool], int]:
            return lambda p: sum(sum(map(len, filesystems[p].cat_ranges([path] * len(s), s, e))) for s, e in jobs)

        def via(transport: str, jobs: list[tuple[list[int], list[int]]]) -> Callable[[bool], int]:
            def run(p: bool) -> int:
                tr = stores[(transport, p)]["emb"].layout.location.transport
                assert tr.name == transport, tr
                return sum(sum(map(len, tr.get_ranges(path, s, e))) for s, e in jobs)
            return run

        def take(transport: str) -> Callable[[bool], int]:
            return lambda p: sum(stores[(transport, p)]["emb"].take(b).nbytes for b in batches)

        def fill(as_it_arrives: bool) -> Callable[[bool], int]:
            def run(p: bool) -> int:
                loc = stores[("obstore", p)]["emb"].layout.location
                identity, size = loc.identity()
                remote, stats, root = RemoteObject(loc), IOStats(), tempfile.mkdtemp(dir=tmp)
                cache = DiskCache(root)
                starts = np.arange(0, size, 16 << 20)
                ends = np.minimum(starts + (16 << 20), size)

                def share(i: int) -> None:
                    s, e = starts[i::4], ends[i::4]
                    if as_it_arrives:
                        cache.ensure(identity, size, s, e, partial(remote.stream_into, stats=stats))
                    else:
                        cache.blocks(identity, size, s, e, partial(remote.read_ranges, stats=stats))

                with ThreadPoolExecutor(4) as pool:
                    list(pool.map(share, range(4)))
                shutil.rmtree(root)
                # the bytes fetched: a read-ahead skips a block whose claim shares a lock file with a claim another
                # thread holds (the reader of that block fetches it), a block or two of the 147 here
                return stats.bytes
            return run

        cases = [
            ("sequential 2 MiB", "s3fs cat_ranges", raw([seq])),
            ("sequential 2 MiB", "transport fsspec", via("fsspec", [seq])),
            ("sequential 2 MiB", "transport obstore", via("obstore", [seq])),
            ("random rows", "s3fs cat_ranges", raw(rand)),
            ("random rows", "transport fsspec", via("fsspec", rand)),
            ("random rows", "transport obstore", via("obstore", rand)),
            ("random rows", "Array.take fsspec", take("fsspec")),
            ("random rows", "Array.take obstore", take("obstore")),
            ("disk-cache fill", "fetched whole, then written", fill(False)),
            ("disk-cache fill", "written as it arrives", fill(True)),
        ]
        wanted = {PATTERNS[p] for p in args.patterns.split(",")}
        cases = [case for case in cases if case[0] in wanted]
        results: dict[tuple[str, str], Cost] = {}
        for pattern in dict.fromkeys(p for p, _, _ in cases):
            best = best_in_turn([(name, lambda fn=fn: fn(False)) for p, name, fn in cases if p == pattern],
                                args.rounds)
            results.update({(pattern, name): got for name, got in best.items()})
        wire_figures: dict[tuple[str, str], tuple[int, int]] = {}
        for pattern, name, fn in cases:
            wire.proxy.reset_counts()
            fn(True)
            wire_figures[(pattern, name)] = (wire.proxy.total_requests, wire.proxy.bytes_out)

    print(f"object: {args.mib} MiB .npy on moto S3; random rows: {args.batches} "
          f"batches of {args.batch} rows of {row} B; each client's best of {args.rounds} rounds, taken in turn\n")
    print("| pattern | client | CPU s (user + kernel) | page faults | wall s | CPU s/GiB | CPU / the pattern's first "
          "| user / the pattern's first | requests* | bytes at proxy* |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    firsts = {pattern: got for (pattern, _), got in reversed(results.items())}
    for (pattern, name), got in results.items():
        ref = firsts[pattern]
        requests, sent = wire_figures[(pattern, name)]
        print(f"| {pattern} | {name} | {got.cpu:.2f} ({got.user:.2f} + {got.kernel:.2f}) | {got.faults:,} | "
              f"{got.wall:.2f} | {got.cpu / (got.nbytes / 2**30):.2f} | {got.cpu / ref.cpu:.2f}x | "
              f"{got.user / ref.user:.2f}x | {requests} | {sent:,} |")
    print("\n* the same calls once more through the counting proxy. Kernel time is mostly receiving and the first "
          "touch of each new page (faults): a client that returns new buffers pays a fault per 4 KiB of them, at a "
          "cost that varies between runs on a virtual machine")


if __name__ == "__main__":
    main()
