"""ClusterLabeledDataset: the seed layout opened unchanged, and catalog + store in every format, local and S3."""

from __future__ import annotations

import hashlib
import os
import pickle
import sqlite3
import threading
from typing import Any

import numpy as np
import pytest
import torch

from unistore.datasets import ClusterLabeledDataset, collate, validate_first_batch
from unistore.errors import (
    ArrayNotFoundError,
    DatasetNotFoundError,
    IntegrityError,
    ShapeMismatchError,
    UnistoreError,
)

from ..helpers import Sentinel, default_catalog
from .builders import write_cluster_seed

FORMATS = ("npy", "pt", "safetensors", "hdf5", "zarr")


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def expect(src: dict[str, Any], positions: Any, kind: str = "combined") -> tuple[np.ndarray, ...]:
    rows = src["rows"][positions]
    return src["base"][rows], src["steering"][rows], src["labels"][kind][positions]


@pytest.fixture
def seed_dir(tmp_path: Any) -> tuple[str, dict[str, Any]]:
    path = str(tmp_path / "clusters")
    return path, write_cluster_seed(path)


@pytest.mark.parametrize("kind", ["source", "steering", "combined"])
def test_seed_layout_outputs(kind: str, seed_dir: tuple[str, dict[str, Any]]) -> None:
    path, src = seed_dir
    db_hash = sha(os.path.join(path, "dataset.db"))
    ds = ClusterLabeledDataset(path, label_type=kind)
    assert len(ds) == 60 and ds.embedding_dim == 8 and ds.n_clusters == 5
    base, steering, label = ds[7]
    for got, want in zip((base, steering, label), expect(src, 7, kind)):
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), want)
    positions = np.array([5, 0, 5, 59])
    batch = ds.__getitems__(positions).collated
    for got, want in zip(batch, expect(src, positions, kind)):
        np.testing.assert_array_equal(got.numpy(), want)
    assert sha(os.path.join(path, "dataset.db")) == db_hash  # never modified
    assert not os.path.exists(os.path.join(path, "catalog.db"))  # the import lands in the default catalog
    assert ds.catalog_url == default_catalog() and os.path.exists(default_catalog())


def test_metadata_output(seed_dir: tuple[str, dict[str, Any]]) -> None:
    path, src = seed_dir
    ds = ClusterLabeledDataset(path, label_type="steering", return_metadata=True)
    base, steering, label, meta = ds[4]
    assert meta["sample_id"] == 104 and meta["text"] == "text of 104" and meta["chroma_id"] == "chroma-104"
    assert meta["sample_type"] == "source" and meta["steering_mode"] == "centroid"
    assert meta["suggestions"] == '["bio", "chem"]'
    for kind in ("source", "steering", "combined"):
        np.testing.assert_array_equal(meta[f"{kind}_label"].numpy(), src["labels"][kind][4])
    np.testing.assert_array_equal(label.numpy(), src["labels"]["steering"][4])
    from torch.utils.data import DataLoader

    b, s, lab, metas = next(iter(DataLoader(ds, batch_size=6, collate_fn=collate)))
    assert [m["sample_id"] for m in metas] == list(range(100, 106)) and b.shape == (6, 8)


def test_get_sample_by_id(seed_dir: tuple[str, dict[str, Any]]) -> None:
    path, src = seed_dir
    ds = ClusterLabeledDataset(path)
    sample = ds.get_sample_by_id(142)
    assert sample is not None and sample["text"] == "text of 142"
    assert sample["embedding_idx"] == int(src["rows"][42])
    np.testing.assert_array_equal(sample["source_label"], src["labels"]["source"][42])
    assert ds.get_sample_by_id(7) is None


def test_import_reused_and_redone_when_db_changes(seed_dir: tuple[str, dict[str, Any]]) -> None:
    from sqlalchemy import select

    from unistore.catalog import connect
    from unistore.schemas import Dataset

    path, src = seed_dir
    ClusterLabeledDataset(path)
    catalog = default_catalog()
    with connect(catalog) as c, c.session() as s:
        first_id = s.scalar(select(Dataset.id))
    ds = ClusterLabeledDataset(path)
    ds.update_labels(105, combined_label=np.eye(5, dtype=np.float32)[2])
    with connect(catalog) as c, c.session() as s:
        assert s.scalar(select(Dataset.id)) == first_id  # reused, not imported again
    np.testing.assert_array_equal(ClusterLabeledDataset(path)[5][2].numpy(), np.eye(5)[2])
    # the user regenerates dataset.db: one more sample and a new label for sample 101
    conn = sqlite3.connect(os.path.join(path, "dataset.db"))
    conn.execute("UPDATE samples SET combined_label = ? WHERE sample_id = 101",
                 (pickle.dumps(np.full(5, 0.2, np.float32)),))
    conn.commit()
    conn.close()
    again = ClusterLabeledDataset(path)
    np.testing.assert_allclose(again[1][2].numpy(), np.full(5, 0.2))
    # the correction made through the catalog keeps applying to the new import
    np.testing.assert_array_equal(again[5][2].numpy(), np.eye(5)[2])
    np.testing.assert_allclose(again.__getitems__([5, 1]).collated[2].numpy(), [np.eye(5)[2], np.full(5, 0.2)])
    with connect(catalog) as c, c.session() as s:
        assert sorted(s.scalars(select(Dataset.name))) == ["clusters"]


def test_update_labels_seen_here_and_in_fresh_workers(seed_dir: tuple[str, dict[str, Any]]) -> None:
    from torch.utils.data import DataLoader

    path, src = seed_dir
    db_hash = sha(os.path.join(path, "dataset.db"))
    ds = ClusterLabeledDataset(path, label_type="source", return_metadata=True)
    assert ds[3][3]["sample_id"] == 103
    new = np.array([0.0, 1.0, 0.0, 0.0, 0.0], np.float32)
    ds.update_labels(103, source_label=new, combined_label=None)
    np.testing.assert_array_equal(ds[3][2].numpy(), new)  # the cached entry was dropped
    np.testing.assert_array_equal(ds[3][3]["combined_label"].numpy(), src["labels"]["combined"][3])
    for context in ("spawn", "fork"):
        loader = DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context=context, collate_fn=collate)
        _, _, labels, _ = next(iter(loader))
        np.testing.assert_array_equal(labels[3].numpy(), new)
    assert sha(os.path.join(path, "dataset.db")) == db_hash
    with pytest.raises(KeyError):
        ds.update_labels(9999, source_label=new)
    with pytest.raises(ValueError, match="shape"):
        ds.update_labels(103, steering_label=np.ones(3))


def test_cache_stats_prefill_clear_and_threads(seed_dir: tuple[str, dict[str, Any]]) -> None:
    path, src = seed_dir
    ds = ClusterLabeledDataset(path, cache_size=10)
    for i in [1, 2, 1, 1, 3]:
        ds[i]
    assert ds.get_cache_stats() == {"hits": 2, "misses": 3, "hit_rate": 0.4, "size": 3}
    ds.clear_cache()
    assert ds.get_cache_stats()["size"] == 0 and ds.get_cache_stats()["hits"] == 0
    ds.prefill_cache(list(range(20)))
    assert ds.get_cache_stats()["size"] == 10
    ds[15]
    ds[0]
    assert ds.get_cache_stats()["hits"] == 1 and ds.get_cache_stats()["misses"] == 1
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for i in rng.integers(0, 60, 200):
                base, _, label = ds[int(i)]
                np.testing.assert_array_equal(base.numpy(), src["base"][src["rows"][i]])
                np.testing.assert_array_equal(label.numpy(), src["labels"]["combined"][i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = ds.get_cache_stats()
    assert stats["hits"] + stats["misses"] == 802 and stats["size"] <= 10


def test_batch_is_one_gather_per_array_and_one_query(seed_dir: tuple[str, dict[str, Any]]) -> None:
    from sqlalchemy import event

    path, _ = seed_dir
    ds = ClusterLabeledDataset(path)
    engine = ds._conn_catalog().engine
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    ds.store.reset_io_stats()
    ds.__getitems__(list(range(0, 60, 2)))
    assert ds.store.io_stats()["requests"] == 2
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_catalog_and_store_in_every_format(fmt: str, where: str, seed_dir: tuple[str, dict[str, Any]],
                                           catalog_url: str, request: pytest.FixtureRequest,
                                           tmp_path: Any) -> None:
    path, src = seed_dir
    seed = ClusterLabeledDataset(path, return_metadata=True)
    options = None
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        url, options = f"s3://{s3['bucket']}/clusters-{fmt}", s3["options"]
    else:
        url = str(tmp_path / f"clusters-{fmt}")
    compression = {"zarr": "zstd", "hdf5": "gzip"}.get(fmt)
    name = seed.export(url, fmt, catalog_url=catalog_url, storage_options=options, compression=compression,
                       chunks=(16,) if compression else None)
    ds = ClusterLabeledDataset(url, catalog_url=catalog_url, storage_options=options, return_metadata=True)
    assert ds.dataset_name == name and ds.store.format == fmt
    positions = np.array([59, 3, 3, 0, 17])
    got, want = ds.__getitems__(positions).collated, seed.__getitems__(positions).collated
    for a, b, c in zip(got[:3], want[:3], expect(src, positions)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(a.numpy(), c)
    assert [m["text"] for m in got[3]] == [m["text"] for m in want[3]]
    assert "secret" not in repr(ds) and "s3cr3t" not in repr(ds)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_return_the_same_batches(context: str, seed_dir: tuple[str, dict[str, Any]], tmp_path: Any) -> None:
    from torch.utils.data import DataLoader

    path, _ = seed_dir
    seed = ClusterLabeledDataset(path)
    seed.export(str(tmp_path / "z.zarr"), "zarr", compression="zstd", chunks=(8,))
    for ds in (seed, ClusterLabeledDataset(str(tmp_path / "z.zarr"))):
        def batches(workers: int, ds: Any = ds) -> list[Any]:
            g = torch.Generator().manual_seed(3)
            loader = DataLoader(ds, batch_size=8, shuffle=True, generator=g, num_workers=workers,
                                multiprocessing_context=context if workers else None)
            return list(loader)

        serial, parallel = batches(0), batches(2)
        assert len(serial) == len(parallel) == 8
        for a, b in zip(serial, parallel):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y)
        validate_first_batch(DataLoader(ds, batch_size=8))


def test_bad_arguments(seed_dir: tuple[str, dict[str, Any]], tmp_path: Any) -> None:
    path, _ = seed_dir
    with pytest.raises(ValueError, match="label_type"):
        ClusterLabeledDataset(path, label_type="other")
    with pytest.raises(ValueError, match="mmap_mode"):
        ClusterLabeledDataset(path, mmap_mode="w+")
    assert len(ClusterLabeledDataset(path, mmap_mode="c")) == 60
    catalog = default_catalog()
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="dataset.db not found"):
        ClusterLabeledDataset(str(tmp_path / "empty"))
    import unistore as us

    with us.create_store(str(tmp_path / "x.zarr"), format="zarr") as store:  # a store no catalog row names
        for key in ("base_embeddings", "steering_embeddings"):
            store.write_array(key, np.zeros((4, 8), np.float32))
    with pytest.raises(DatasetNotFoundError, match="no dataset 'nope'"):
        ClusterLabeledDataset(str(tmp_path / "x.zarr"), dataset_name="nope", catalog_url=catalog)
    with pytest.raises(DatasetNotFoundError, match="has its store at"):
        ClusterLabeledDataset(str(tmp_path / "x.zarr"), catalog_url=catalog)


def test_a_missing_directory_names_the_path_and_creates_nothing(tmp_path: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope/clusters does not exist"):
        ClusterLabeledDataset(str(tmp_path / "nope" / "clusters"))
    assert os.listdir(tmp_path) == [] and not os.path.exists(default_catalog())


def _assert_untouched(path: str, before: dict[str, str]) -> None:
    assert {f: sha(os.path.join(path, f)) for f in os.listdir(path)} == before


def test_malicious_label_blob_runs_nothing_and_writes_nothing(tmp_path: Any) -> None:
    path = str(tmp_path / "evil")
    marker = str(tmp_path / "pwned")
    write_cluster_seed(path, overrides={117: {"source_label": pickle.dumps(Sentinel(marker))}})
    before = {f: sha(os.path.join(path, f)) for f in os.listdir(path)}
    with pytest.raises(UnistoreError, match=r"sample_id 117 .*source_label: pickle refers to .* not run") as info:
        ClusterLabeledDataset(path)
    assert isinstance(info.value, ValueError)
    assert not os.path.exists(marker)
    _assert_untouched(path, before)


def test_corrupt_and_inconsistent_seed_dirs(tmp_path: Any) -> None:
    corrupt = str(tmp_path / "corrupt")
    write_cluster_seed(corrupt, overrides={103: {"combined_label": b"\x80\x04garbage"}})
    before = {f: sha(os.path.join(corrupt, f)) for f in os.listdir(corrupt)}
    with pytest.raises(ValueError, match="sample_id 103"):
        ClusterLabeledDataset(corrupt)
    _assert_untouched(corrupt, before)

    far = str(tmp_path / "far")
    write_cluster_seed(far, overrides={110: {"embedding_idx": 600}})
    with pytest.raises(ValueError, match="embedding_idx 600"):
        ClusterLabeledDataset(far)

    short = str(tmp_path / "short")
    write_cluster_seed(short)
    with open(os.path.join(short, "steering_embeddings.npy"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="steering_embeddings"):
        ClusterLabeledDataset(short)


def test_store_mode_errors(seed_dir: tuple[str, dict[str, Any]], tmp_path: Any) -> None:
    import unistore as us

    path, src = seed_dir
    catalog = default_catalog()
    seed = ClusterLabeledDataset(path)
    url = str(tmp_path / "one.h5")
    with us.create_store(url, format="hdf5") as store:
        store.write_array("base_embeddings", src["base"])
    from unistore.datasets.cluster_labeled import register_cluster_labeled
    from unistore.schemas.labels import samples_by_pk

    with seed._conn_catalog().engine.connect() as conn:
        fields, labels = samples_by_pk(conn, seed._pks)
    register_cluster_labeled(catalog, "partial", url, "hdf5", fields, labels, 5, 8, 60)
    with pytest.raises(DatasetNotFoundError, match="steering_embeddings"):
        ClusterLabeledDataset(url, catalog_url=catalog)
    mismatched = str(tmp_path / "mismatch.zarr")
    with us.create_store(mismatched, format="zarr") as store:
        store.write_array("base_embeddings", src["base"])
        store.write_array("steering_embeddings", src["steering"][:, :4])
    register_cluster_labeled(catalog, "mismatch", mismatched, "zarr", fields, labels, 5, 8, 60)
    with pytest.raises(ShapeMismatchError, match="must both be"):
        ClusterLabeledDataset(mismatched, catalog_url=catalog)
    few = str(tmp_path / "few.zarr")
    with us.create_store(few, format="zarr") as store:
        store.write_array("base_embeddings", src["base"][:10])
        store.write_array("steering_embeddings", src["steering"][:10])
    register_cluster_labeled(catalog, "few", few, "zarr", fields, labels, 5, 8, 10)
    with pytest.raises(IntegrityError, match="embedding_idx"):
        ClusterLabeledDataset(few, catalog_url=catalog)
    with pytest.raises(ArrayNotFoundError):
        seed.update_labels(1, source_label=np.ones(5))


def test_the_seed_directory_is_never_written(seed_dir: tuple[str, dict[str, Any]]) -> None:
    """A read-only dataset directory works: the import, its lock and corrections all live in the catalog."""
    path, src = seed_dir
    before = {f: sha(os.path.join(path, f)) for f in os.listdir(path)}
    ds = ClusterLabeledDataset(path)
    ds.update_labels(102, source_label=np.eye(5, dtype=np.float32)[0])
    np.testing.assert_array_equal(ds[2][0].numpy(), src["base"][src["rows"][2]])
    _assert_untouched(path, before)


def test_ranks_opening_a_new_seed_dir_at_once_import_it_once(seed_dir: tuple[str, dict[str, Any]]) -> None:
    import multiprocessing as mp

    from sqlalchemy import func, select

    from unistore.catalog import connect
    from unistore.schemas import Dataset, Sample

    from .dist_helpers import open_cluster_dataset

    path, src = seed_dir
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.map(open_cluster_dataset, [path] * 3)
    assert results == [(60, pytest.approx(float(src["labels"]["combined"].sum()), rel=1e-6))] * 3
    with connect(default_catalog()) as c, c.session() as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 1
        assert s.scalar(select(func.count()).select_from(Sample)) == 60
