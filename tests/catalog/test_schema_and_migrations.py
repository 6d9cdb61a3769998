"""Models, the NDArray column, connections and migrations on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, select, text

from unistore import errors, migrations
from unistore.catalog import connect
from unistore.cli import main
from unistore.schemas import (
    CatalogOutdatedError,
    Dataset,
    DatasetArray,
    DatasetInfo,
    DatasetUsage,
    DeltaEmbeddingCache,
    Experiment,
    ExperimentMetric,
    Label,
    Sample,
    Split,
    TrainingHistoryRef,
    decode_array,
    encode_array,
    make_engine,
)
from unistore.storage.formats.base import bfloat16

ALL_TABLES = {"datasets", "dataset_arrays", "samples", "labels", "dataset_info", "splits", "experiments",
              "experiment_metrics", "dataset_usage", "training_history_refs", "delta_embedding_cache"}
DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
          "float32", "float64", "complex64", "complex128"]


def test_ndarray_blob_roundtrips_every_dtype_exactly() -> None:
    rng = np.random.default_rng(0)
    for name in DTYPES:
        arr = (rng.standard_normal((3, 4)) * 100).astype(name)
        back = decode_array(encode_array(arr))
        assert back.dtype == arr.dtype and back.shape == arr.shape
        assert back.tobytes() == arr.tobytes()
    bf = rng.standard_normal(7).astype(bfloat16)
    assert decode_array(encode_array(bf)).tobytes() == bf.tobytes()
    assert decode_array(encode_array(np.zeros((0, 5), np.float32))).shape == (0, 5)
    assert decode_array(encode_array(np.float64(2.5))).shape == ()
    with pytest.raises(errors.ShapeMismatchError):
        encode_array(np.array([{"a": 1}], dtype=object))
    with pytest.raises(errors.ShapeMismatchError):
        encode_array(np.array(["text"]))
    with pytest.raises(errors.CorruptDataError):
        decode_array(encode_array(np.arange(10))[:-3])
    with pytest.raises(errors.CorruptDataError):
        decode_array(b"\x80\x04pickle")


def _fill_every_table(url: str) -> dict[str, Any]:
    """Rows in every table of revision 0001, written with plain SQL (no models: they are at head)."""
    engine = make_engine(url)
    vec = encode_array(np.array([0.25, 0.75], np.float32))
    with engine.begin() as c:
        c.execute(text("INSERT INTO datasets (id, name, kind, store_url, format, attrs) VALUES "
                       "(1, 'legacy', 'cluster_labeled_legacy', '/data/x', 'npy', '{}'),"
                       "(2, 'fresh', 'jasper', 's3://bucket/run.zarr', 'zarr', '{\"k\": 1}')"))
        c.execute(text("INSERT INTO dataset_arrays (dataset_id, key, shape, dtype, format, nbytes, checksum) "
                       "VALUES (2, 'emb', '[10, 4]', 'float32', 'zarr', 160, 'sha256:00')"))
        c.execute(text("INSERT INTO samples (id, dataset_id, sample_id, embedding_idx, sample_type, text, chroma_id,"
                       " suggestions, steering_mode) VALUES (1, 1, 42, 0, 'question', 'q', 'c1', NULL, 'centroid'),"
                       " (2, 2, 7, 1, 'source', 's', 'c2', '[]', 'none')"))
        c.execute(text("INSERT INTO labels (sample_pk, kind, vector) VALUES (1, 'source', :v), (1, 'combined', :v),"
                       " (2, 'combined', :v)"), {"v": vec})
        c.execute(text("INSERT INTO dataset_info (dataset_id, key, value) VALUES (1, 'n_clusters', '2')"))
        c.execute(text("INSERT INTO splits (dataset_id, name, indices) VALUES (1, 'train', :v)"),
                  {"v": encode_array(np.arange(5))})
        c.execute(text("INSERT INTO experiments (id, name, dataset_id, config, status) VALUES "
                       "(1, 'exp1', 2, '{\"lr\": 0.1}', 'done')"))
        c.execute(text("INSERT INTO experiment_metrics (experiment_id, name, step, value) VALUES (1, 'loss', 3, 0.5)"))
        c.execute(text("INSERT INTO dataset_usage (dataset_id, experiment_id, purpose, details) VALUES "
                       "(2, 1, 'training', '{}')"))
        c.execute(text("INSERT INTO training_history_refs (experiment_id, store_url, key, n_epochs, summary) VALUES "
                       "(1, 's3://bucket/hist.zarr', 'loss', 10, '{}')"))
        c.execute(text("INSERT INTO delta_embedding_cache (cache_key, dataset_id, adapter_path, embedding) VALUES "
                       "('abc', 2, '/lora/a', :v)"), {"v": vec})
    engine.dispose()
    return {"vec": np.array([0.25, 0.75], np.float32)}


def _assert_rows_intact(url: str, at_head: bool) -> None:
    engine = make_engine(url)
    with engine.connect() as c:
        for table in ALL_TABLES:
            assert c.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar() > 0, table
        vectors = [decode_array(v) for v in c.execute(text("SELECT vector FROM labels ORDER BY id")).scalars()]
        assert all(np.array_equal(v, [0.25, 0.75]) for v in vectors)
        assert c.execute(text("SELECT name FROM experiments")).scalar() == "exp1"
        if at_head:
            rows = c.execute(text("SELECT sample_pk, provenance, version FROM labels ORDER BY id")).all()
            assert [tuple(r) for r in rows] == [(1, "legacy-import", 1), (1, "legacy-import", 1), (2, "unknown", 1)]
    engine.dispose()


def test_upgrade_downgrade_cycle_keeps_rows_and_migrates_labels(catalog_url: str) -> None:
    migrations.upgrade(catalog_url, "0001")
    _fill_every_table(catalog_url)
    migrations.upgrade(catalog_url, "head")
    assert migrations.current_revision(catalog_url) == migrations.head_revision() == "0004"
    _assert_rows_intact(catalog_url, at_head=True)
    migrations.downgrade(catalog_url, "0001")
    _assert_rows_intact(catalog_url, at_head=False)
    engine = make_engine(catalog_url)
    assert "provenance" not in {c["name"] for c in inspect(engine).get_columns("labels")}
    engine.dispose()
    migrations.upgrade(catalog_url, "head")
    _assert_rows_intact(catalog_url, at_head=True)
    assert migrations.check(catalog_url) == []
    migrations.downgrade(catalog_url, "base")
    engine = make_engine(catalog_url)
    assert not (set(inspect(engine).get_table_names()) & ALL_TABLES)
    engine.dispose()
    migrations.upgrade(catalog_url)
    assert migrations.check(catalog_url) == []


def test_models_write_and_read_every_table(catalog_url: str) -> None:
    catalog = connect(catalog_url)  # empty database: migrated to head on first connect
    with catalog.session() as s:
        ds = Dataset(name="run1", kind="jasper", store_url="s3://bucket/run1.zarr", format="zarr", attrs={"a": 1})
        s.add(ds)
        s.flush()
        s.add_all([
            DatasetArray(dataset_id=ds.id, key="emb", shape=[4, 2], dtype="float32", format="zarr", nbytes=32),
            DatasetInfo(dataset_id=ds.id, key="n_clusters", value="3"),
            Split(dataset_id=ds.id, name="train", indices=np.array([3, 1, 2])),
        ])
        sample = Sample(dataset_id=ds.id, sample_id=9, embedding_idx=0, sample_type="question", text="t",
                        chroma_id="c", steering_mode="none")
        sample.labels.append(Label(kind="combined", vector=np.array([0.5, 0.5], np.float16)))
        s.add(sample)
        exp = Experiment(name="e", dataset_id=ds.id, config={"lr": 1e-3})
        exp.metrics.append(ExperimentMetric(name="acc", step=1, value=0.9))
        s.add(exp)
        s.flush()
        s.add_all([DatasetUsage(dataset_id=ds.id, experiment_id=exp.id, purpose="eval"),
                   TrainingHistoryRef(experiment_id=exp.id, store_url="/h.zarr", key="loss", n_epochs=2),
                   DeltaEmbeddingCache(cache_key="k", adapter_path="/a", embedding=np.ones(3, np.float32))])
    with catalog.session() as s:
        label = s.scalar(select(Label))
        assert label is not None and label.vector.dtype == np.float16 and label.provenance == "unknown"
        assert label.version == 1
        assert s.scalar(select(Split.indices)).tolist() == [3, 1, 2]
        ds = s.scalar(select(Dataset))
        assert ds is not None and isinstance(ds.created_at, dt.datetime) and ds.attrs == {"a": 1}
    with pytest.raises(errors.ShapeMismatchError):
        with catalog.session() as s:
            s.add(Split(dataset_id=1, name="bad", indices=np.array([object()])))
    catalog.close()


def test_outdated_catalog_names_the_fix(catalog_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    migrations.upgrade(catalog_url, "0001")
    with pytest.raises(CatalogOutdatedError, match="unistore db upgrade"):
        connect(catalog_url)
    assert main(["db", "current", "--url", catalog_url]) == 0
    assert "0001" in capsys.readouterr().out
    assert main(["db", "check", "--url", catalog_url]) == 1
    assert main(["db", "upgrade", "--url", catalog_url]) == 0
    assert main(["db", "check", "--url", catalog_url]) == 0
    assert "agree" in capsys.readouterr().out
    connect(catalog_url).close()
    assert main(["db", "downgrade", "0001", "--url", catalog_url]) == 0
    assert migrations.current_revision(catalog_url) == "0001"


def test_check_detects_drift(catalog_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    migrations.upgrade(catalog_url)
    engine = make_engine(catalog_url)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE stray (id INTEGER PRIMARY KEY)"))
        c.execute(text("ALTER TABLE samples ADD COLUMN extra INTEGER"))
    engine.dispose()
    diffs = migrations.check(catalog_url)
    assert any("stray" in str(d) for d in diffs) and any("extra" in str(d) for d in diffs)
    assert main(["db", "check", "--url", catalog_url]) == 1
    assert "differ" in capsys.readouterr().err


def test_exactly_one_head_and_history() -> None:
    history = migrations.history()
    assert [h[0] for h in history] == ["0004", "0003", "0002", "0001"]
    assert history[-1][1] is None
    assert migrations.head_revision() == "0004"


def test_sqlite_settings(tmp_path: Any) -> None:
    catalog = connect(tmp_path / "c.db")
    with catalog.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    catalog.close()


def test_password_never_printed(capsys: pytest.CaptureFixture[str]) -> None:
    engine = create_engine("postgresql+psycopg://user:hunter2secret@127.0.0.1:1/none")
    from unistore.schemas import safe_url

    assert "hunter2secret" not in safe_url(engine.url)
    assert main(["db", "current", "--url", "postgresql://user:hunter2secret@127.0.0.1:1/none"]) == 2
    out = capsys.readouterr()
    assert "hunter2secret" not in out.out + out.err
