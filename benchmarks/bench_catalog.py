"""Catalog benchmark: legacy import rows/s and label read/update latency.

Builds a legacy ``dataset.db`` with the seed's schema (100k samples, 50-cluster
labels pickled by numpy), imports it into a fresh catalog, then times reading
the labels of a 256-sample batch and correcting one sample's labels.

    python benchmarks/bench_catalog.py                       # SQLite
    python benchmarks/bench_catalog.py --pg postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.catalog.legacy_builder import build_legacy_db  # noqa: E402
from unistore.catalog import connect  # noqa: E402
from unistore.migrations.legacy import import_legacy  # noqa: E402
from unistore.schemas.labels import dataset_id, read_labels, update_labels  # noqa: E402


def measure(url: str, db: str, n: int, clusters: int) -> dict[str, float]:
    connect(url).close()  # create the catalog first: the import is what is timed
    start = time.perf_counter()
    report = import_legacy(db, url, name="bench")
    elapsed = time.perf_counter() - start
    assert report.imported == n, report
    catalog = connect(url)
    ds = dataset_id(catalog, "bench")
    rng = np.random.default_rng(0)
    reads, updates = [], []
    for _ in range(50):
        ids = rng.integers(1, n + 1, 256).tolist()
        t = time.perf_counter()
        labels = read_labels(catalog, ds, ids, "combined")
        reads.append(time.perf_counter() - t)
        assert labels.shape == (256, clusters)
    for _ in range(100):
        sid = int(rng.integers(1, n + 1))
        t = time.perf_counter()
        update_labels(catalog, ds, sid, {"source": np.full(clusters, 1.0 / clusters, np.float32)})
        updates.append(time.perf_counter() - t)
    catalog.close()
    return {"rows_s": n / elapsed, "seconds": elapsed, "read_ms": statistics.median(reads) * 1e3,
            "update_ms": statistics.median(updates) * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--pg", help="also measure on this PostgreSQL server (a scratch database is created)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="unistore-catalog-bench-") as tmp:
        db = os.path.join(tmp, "dataset.db")
        build_legacy_db(db, args.samples, n_clusters=args.clusters, dim=384)
        targets = [("SQLite", f"sqlite:///{tmp}/catalog.db")]
        scratch = None
        if args.pg:
            from sqlalchemy import create_engine, text

            scratch = f"unistore_bench_{uuid.uuid4().hex[:8]}"
            admin = create_engine(args.pg.replace("postgresql://", "postgresql+psycopg://"),
                                  isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{scratch}"'))
            targets.append(("PostgreSQL", args.pg.rsplit("/", 1)[0] + f"/{scratch}"))
        print(f"legacy import of {args.samples} samples x 3 labels of {args.clusters} clusters\n")
        print("| catalog | import rows/s | import time | read 256 labels (median) | update one sample (median) |")
        print("|---|---|---|---|---|")
        try:
            for name, url in targets:
                r = measure(url, db, args.samples, args.clusters)
                print(f"| {name} | {r['rows_s']:,.0f} | {r['seconds']:.1f} s | {r['read_ms']:.2f} ms | "
                      f"{r['update_ms']:.2f} ms |", flush=True)
        finally:
            if scratch:
                with admin.connect() as c:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))
    return 0


if __name__ == "__main__":
    sys.exit(main())
