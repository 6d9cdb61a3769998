"""The legacy importer on databases built with the seed's own SQL and real numpy pickles."""

from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from unistore import errors
from unistore.catalog import connect
from unistore.cli import main
from unistore.migrations.legacy import LegacyImportError, import_legacy, load_numpy_pickle
from unistore.schemas import Dataset, DatasetArray, Label, Sample
from unistore.schemas.labels import dataset_id, read_labels

from ..helpers import Sentinel as _Sentinel
from .legacy_builder import build_legacy_db


def _digest(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_restricted_unpickler_accepts_numpy_pickles_of_every_protocol() -> None:
    rng = np.random.default_rng(0)
    for proto in (2, 3, 4, 5):
        for dtype in ("float32", "float64", "int64", "float16"):
            arr = rng.standard_normal((3, 4)).astype(dtype)
            back = load_numpy_pickle(pickle.dumps(arr, protocol=proto))
            assert back.dtype == arr.dtype and np.array_equal(back, arr)
        fortran = np.asfortranarray(rng.standard_normal((3, 4)))
        assert np.array_equal(load_numpy_pickle(pickle.dumps(fortran, protocol=proto)), fortran)
    # numpy 1.x wrote "numpy.core.multiarray"; numpy 2.x writes "numpy._core.multiarray"
    blob = pickle.dumps(np.arange(3.0), protocol=2)
    for old, new in ((b"numpy._core", b"numpy.core"), (b"numpy.core", b"numpy._core")):
        variant = blob.replace(old, new) if old in blob else blob
        assert np.array_equal(load_numpy_pickle(variant), np.arange(3.0))


def test_restricted_unpickler_rejects_everything_else(tmp_path: Any) -> None:
    sentinel = tmp_path / "pwned"
    with pytest.raises(errors.UnsafePickleError):
        load_numpy_pickle(pickle.dumps(_Sentinel(str(sentinel))))
    assert not sentinel.exists()
    with pytest.raises(errors.UnsafePickleError):
        load_numpy_pickle(pickle.dumps(np.array([1, "a", None], dtype=object), protocol=2))
    with pytest.raises(errors.UnsafePickleError):
        load_numpy_pickle(pickle.dumps(np.array([1, 2], dtype=object), protocol=5))
    with pytest.raises(errors.CorruptDataError):
        load_numpy_pickle(pickle.dumps(np.arange(10.0))[:-7])
    with pytest.raises(errors.CorruptDataError):
        load_numpy_pickle(pickle.dumps({"not": "an array"}))
    with pytest.raises(errors.UnsafePickleError):
        load_numpy_pickle(pickle.dumps(np.float64(1.0)))  # numpy scalars are not label arrays


def test_import_preserves_ids_values_and_is_idempotent(catalog_url: str, tmp_path: Any) -> None:
    db = str(tmp_path / "clusters" / "dataset.db")
    os.makedirs(os.path.dirname(db))
    np.zeros((40, 8), np.float32).tofile(tmp_path / "clusters" / "base_embeddings.npy")
    expected = build_legacy_db(db, 40, n_clusters=5, first_id=100)
    before = _digest(db)
    os.chmod(db, 0o444)  # the importer must not need write access
    report = import_legacy(db, catalog_url)
    assert report.imported == 40 and report.already_present == 0 and report.bad == []
    assert _digest(db) == before
    assert sorted(os.listdir(tmp_path / "clusters")) == ["base_embeddings.npy", "dataset.db"]  # no -wal/-shm

    catalog = connect(catalog_url)
    ds = dataset_id(catalog, "clusters")
    got = read_labels(catalog, ds, [139, 100, 117], kind="steering")
    for row, sid in zip(got, [139, 100, 117]):
        np.testing.assert_array_equal(row, expected[sid][1])
    with catalog.session() as s:
        assert sorted(s.scalars(select(Sample.sample_id))) == list(range(100, 140))
        assert s.scalar(select(func.count()).select_from(Label)) == 120
        assert set(s.scalars(select(Label.provenance))) == {"legacy-import"}
        dataset = s.scalar(select(Dataset))
        assert dataset is not None and dataset.store_url == str(tmp_path / "clusters")
        assert s.scalar(select(DatasetArray.key)) == "base_embeddings"
        label = s.scalar(select(Label).join(Sample).where(Sample.sample_id == 101, Label.kind == "combined"))
        assert label is not None and label.vector.dtype == expected[101][2].dtype
    catalog.close()

    again = import_legacy(db, catalog_url)
    assert again.imported == 0 and again.already_present == 40


def _bad_rows(tmp_path: Any) -> dict[int, dict[str, Any]]:
    return {
        3: {"source_label": pickle.dumps(_Sentinel(str(tmp_path / "pwned")))},
        5: {"steering_label": pickle.dumps(np.array([0.5, None, 1], dtype=object))},
        7: {"combined_label": pickle.dumps(np.ones(4, np.float32))[:-9]},
        9: {"source_label": pickle.dumps(np.ones(7, np.float32))},  # dataset_info says 4 clusters
    }


def test_bad_rows_abort_the_whole_import_by_default(catalog_url: str, tmp_path: Any) -> None:
    db = str(tmp_path / "dataset.db")
    build_legacy_db(db, 12, n_clusters=4, first_id=1, overrides=_bad_rows(tmp_path))
    with pytest.raises(LegacyImportError, match="sample_id 3") as info:
        import_legacy(db, catalog_url, name="bad")
    assert "only numpy array pickles" in str(info.value)
    assert not (tmp_path / "pwned").exists()
    catalog = connect(catalog_url)
    with catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(Sample)) == 0
        assert s.scalar(select(func.count()).select_from(Dataset)) == 0
    catalog.close()


def test_skip_bad_imports_good_rows_and_reports_bad_ones(catalog_url: str, tmp_path: Any,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "dataset.db")
    expected = build_legacy_db(db, 12, n_clusters=4, first_id=1, overrides=_bad_rows(tmp_path))
    assert main(["db", "import-legacy", db, "--url", catalog_url, "--name", "mixed", "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "imported 8 samples" in out and "skipped 4 bad" in out
    report = import_legacy(db, catalog_url, name="mixed", skip_bad=True)
    reasons = dict(report.bad)
    assert sorted(reasons) == [3, 5, 7, 9] and report.imported == 0 and report.already_present == 8
    assert "only numpy array pickles" in reasons[3]
    assert "object" in reasons[5]
    assert "truncated" in reasons[7]
    assert "shape (7,)" in reasons[9]
    assert not (tmp_path / "pwned").exists()
    catalog = connect(catalog_url)
    ds = dataset_id(catalog, "mixed")
    np.testing.assert_array_equal(read_labels(catalog, ds, [12], "source")[0], expected[12][0])
    with pytest.raises(errors.ArrayNotFoundError):
        read_labels(catalog, ds, [3], "source")
    catalog.close()


def test_not_a_legacy_database(tmp_path: Any, catalog_url: str) -> None:
    import sqlite3

    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(LegacyImportError, match="missing"):
        import_legacy(path, catalog_url)
    with pytest.raises(errors.StoreNotFoundError):
        import_legacy(tmp_path / "absent.db", catalog_url)


@pytest.mark.parametrize("skip_bad", [True, False])
def test_parallel_decoding_gives_the_same_outcome(catalog_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                  skip_bad: bool) -> None:
    import unistore.migrations.legacy as legacy

    monkeypatch.setattr(legacy, "PARALLEL_DECODE_ROWS", 10)  # large-import path on a small file
    db = str(tmp_path / "dataset.db")
    expected = build_legacy_db(db, 60, n_clusters=4, first_id=1, overrides=_bad_rows(tmp_path))
    if not skip_bad:
        with pytest.raises(LegacyImportError, match="sample_id 3"):
            import_legacy(db, catalog_url, name="par", batch_size=7)
        return
    report = import_legacy(db, catalog_url, name="par", skip_bad=True, batch_size=7)
    assert report.imported == 56 and sorted(dict(report.bad)) == [3, 5, 7, 9]
    catalog = connect(catalog_url)
    ds = dataset_id(catalog, "par")
    ids = sorted(expected)
    got = read_labels(catalog, ds, ids, "combined")
    np.testing.assert_array_equal(got, np.stack([expected[i][2] for i in ids]))
    catalog.close()


def test_embedding_file_size_is_checked_against_dataset_info(catalog_url: str, tmp_path: Any) -> None:
    db = str(tmp_path / "dataset.db")
    build_legacy_db(db, 10, n_clusters=3, dim=8)
    np.zeros((9, 8), np.float32).tofile(tmp_path / "steering_embeddings.npy")  # one row short
    with pytest.raises(LegacyImportError, match="steering_embeddings.npy"):
        import_legacy(db, catalog_url)
