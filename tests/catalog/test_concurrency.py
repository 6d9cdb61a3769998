"""Several processes correcting labels at once: every update lands, no "database is locked" escapes."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import numpy as np
from sqlalchemy import select

from unistore.catalog import connect
from unistore.migrations.legacy import import_legacy
from unistore.schemas import Label, Sample
from unistore.schemas.labels import dataset_id, read_labels, update_labels

from .legacy_builder import build_legacy_db

WORKERS, UPDATES = 4, 15


def _worker(catalog: Any, ds: int, worker: int, errors: Any) -> None:
    try:
        for i in range(UPDATES):
            own = 1 + worker * UPDATES + i  # a sample only this worker touches
            update_labels(catalog, ds, own, {"source": np.full(3, worker, np.float32)}, provenance=f"w{worker}")
            update_labels(catalog, ds, 1000, {"combined": np.full(3, i, np.float32)})  # one row everybody touches
    except Exception as e:  # reported to the parent, which fails the test
        errors.put(f"worker {worker}: {type(e).__name__}: {e}")


def test_concurrent_label_updates(catalog_url: str, tmp_path: Any) -> None:
    db = str(tmp_path / "dataset.db")
    build_legacy_db(db, WORKERS * UPDATES, n_clusters=3, first_id=1)
    import_legacy(db, catalog_url, name="shared")
    build_legacy_db(str(tmp_path / "one.db"), 1, n_clusters=3, first_id=1000)
    import_legacy(str(tmp_path / "one.db"), catalog_url, name="shared")
    catalog = connect(catalog_url)
    ds = dataset_id(catalog, "shared")
    read_labels(catalog, ds, [1], "source")  # the parent's pool holds a connection before the fork

    errors: Any = mp.get_context("fork").Queue()
    procs = [mp.get_context("fork").Process(target=_worker, args=(catalog, ds, w, errors)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    problems = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert problems == []
    assert all(p.exitcode == 0 for p in procs)

    for worker in range(WORKERS):
        ids = [1 + worker * UPDATES + i for i in range(UPDATES)]
        np.testing.assert_array_equal(read_labels(catalog, ds, ids, "source"), np.full((UPDATES, 3), worker))
    with catalog.session() as s:
        version = s.scalar(select(Label.version).join(Sample).where(Sample.sample_id == 1000,
                                                                    Label.kind == "combined"))
        provenances = set(s.scalars(select(Label.provenance).where(Label.kind == "source")))
    assert version == 1 + WORKERS * UPDATES  # every increment landed
    assert {f"w{w}" for w in range(WORKERS)} <= provenances
    catalog.close()
