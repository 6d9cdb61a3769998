"""Experiment benchmark: indexing rate, search latency, and reading the end of a long training history.

1. Index N synthetic experiments (catalog record + Chroma upsert, batches of
   2,000) into the embedded index and into a real ``chroma run`` server: rows/s.
2. Search latency p50/p95 over 200 queries: similar-architecture search without
   and with filters, and a filter-only performance search.
3. A 1M-epoch history (3 metrics) in the time series: bytes read to fetch the
   last 10 epochs / bytes of the history (target < 1%).

    python benchmarks/bench_experiments.py              # N = 100,000
    python benchmarks/bench_experiments.py --n 10000    # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from unistore.experiments import (  # noqa: E402
    ChromaConfig,
    ExperimentSearcher,
    TimeSeriesConfig,
    TimeSeriesStorage,
)

DATASETS = ["mnist", "cifar10", "cifar100", "imagenet"]


def experiments(n: int, seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        depth = int(rng.integers(2, 9))
        arch = [784] + [int(w) for w in rng.choice([32, 64, 128, 256, 512, 1024], size=depth - 2)] + [10]
        out.append((f"exp-{i:07d}", {
            "architecture": arch, "hypothesis_id": f"h{int(rng.integers(0, 50))}",
            "final_performance": {"accuracy": round(float(rng.random()), 4), "loss": round(float(rng.random() * 3), 4)},
            "config": {"dataset": DATASETS[int(rng.integers(0, 4))], "epochs": int(rng.integers(5, 100))}}))
    return out


def start_server(workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "chroma")
    proc = subprocess.Popen([exe, "run", "--path", os.path.join(workdir, "server"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=1).read()
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the chroma server did not start")


def latency(fn: Any, queries: list[Any]) -> tuple[float, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t) * 1000)
    qs = statistics.quantiles(times, n=100)
    return qs[49], qs[94]


def bench_search(name: str, config: ChromaConfig, catalog: str, items: list[tuple[str, dict[str, Any]]]) -> None:
    searcher = ExperimentSearcher(config, catalog_url=catalog)
    start = time.perf_counter()
    searcher.index_experiments(items)
    rate = len(items) / (time.perf_counter() - start)
    rng = np.random.default_rng(1)
    queries = [{"architecture": [784] + [int(w) for w in rng.choice([64, 256, 1024], size=int(rng.integers(1, 6)))]
                + [10]} for _ in range(200)]
    plain = latency(lambda q: searcher.search_similar_experiments(q, n_results=10), queries)
    filtered = latency(lambda q: searcher.search_similar_experiments(
        q, n_results=10, filters={"dataset": "cifar10", "accuracy": {"$gte": 0.5}}), queries)
    by_perf = latency(lambda q: searcher.search_by_performance(min_accuracy=0.99, dataset="mnist", n_results=10),
                      queries[:50])
    print(f"| {name} | {rate:,.0f} | {plain[0]:.1f} / {plain[1]:.1f} | {filtered[0]:.1f} / {filtered[1]:.1f} | "
          f"{by_perf[0]:.1f} / {by_perf[1]:.1f} |", flush=True)
    searcher.close()


def bench_history(workdir: str, epochs: int) -> None:
    for use_hdf5 in (True, False):
        storage = TimeSeriesStorage(TimeSeriesConfig(storage_dir=os.path.join(workdir, f"ts-{use_hdf5}"),
                                                     use_hdf5=use_hdf5, compression="gzip"))
        e = np.arange(epochs)
        storage.store_training_history("long", {"loss": 2.0 / (e + 1), "accuracy": e / epochs,
                                                "lr": np.full(epochs, 1e-3)})
        storage.reset_io_stats()
        t = time.perf_counter()
        rows, _ = storage.retrieve_training_history("long", epochs=slice(-10, None))
        took = (time.perf_counter() - t) * 1000
        assert [r["epoch"] for r in rows] == list(range(epochs - 10, epochs))
        read = storage.io_stats()["bytes"]
        history = epochs * 4 * 8
        t = time.perf_counter()
        storage.get_summary_statistics("long")
        summary_ms = (time.perf_counter() - t) * 1000
        print(f"| {'HDF5' if use_hdf5 else 'zarr'} gzip | {epochs:,} | {read:,} | {history:,} | "
              f"{100 * read / history:.3f}% | {took:.1f} ms | {summary_ms:.1f} ms |")
        storage.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="experiments to index")
    parser.add_argument("--epochs", type=int, default=1_000_000, help="length of the long history")
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="unistore-bench-exp-")
    server = None
    try:
        items = experiments(args.n)
        print(f"indexing {args.n:,} experiments (catalog record + Chroma upsert, SQLite catalog)\n")
        print("| index | index rows/s | similar p50/p95 ms | similar + filters p50/p95 ms | "
              "by performance p50/p95 ms |\n|---|---|---|---|---|")
        bench_search("embedded", ChromaConfig(persist_directory=os.path.join(workdir, "chroma")),
                     os.path.join(workdir, "embedded.db"), items)
        if not args.skip_server:
            server, port = start_server(workdir)
            bench_search("server (chroma run)", ChromaConfig(host="127.0.0.1", port=port),
                         os.path.join(workdir, "server.db"), items)
        print("\n| history | epochs | bytes read (last 10) | history bytes | read / history | last 10 | summary |")
        print("|---|---|---|---|---|---|---|")
        bench_history(workdir, args.epochs)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
