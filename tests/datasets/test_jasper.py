"""JASPERSteeringDataset over every format, locally and on the S3 server, against the numpy source."""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

import numpy as np
import pytest
import torch

from unistore.datasets import JASPERSteeringDataset, compute_steering_probs, create_loader, validate_first_batch
from unistore.datasets import jasper as jasper_module
from unistore.errors import DatasetNotFoundError, IntegrityError, ShapeMismatchError, UnistoreError, UnsupportedError

from .builders import expected_batch, make_jasper, write_jasper_h5, write_jasper_pt
from .conftest import JASPER_FORMATS, jasper_url

DTYPES = {"question_emb": torch.float32, "target_source_emb": torch.float32, "steering": torch.float32,
          "negative_embs": torch.float32, "cluster_id": torch.int64, "relevance": torch.float32,
          "centroid_distance": torch.float32, "steering_variant": torch.int64, "negative_tiers": torch.int64}


def assert_batch(batch: dict[str, Any], data: dict[str, Any], split: str, positions: np.ndarray) -> None:
    expected = expected_batch(data, split, positions, batch["steering_variant"].numpy())
    assert set(batch) == set(expected)
    for key, value in expected.items():
        assert batch[key].dtype == DTYPES[key], key
        assert tuple(batch[key].shape) == value.shape, key
        np.testing.assert_array_equal(batch[key].numpy(), value, err_msg=key)


def tree_digest(path: str) -> str:
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            h.update(name.encode())
            with open(os.path.join(d, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.mark.parametrize("use_mmap", [False, True], ids=["preload", "mmap"])
@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
@pytest.mark.parametrize("fmt", JASPER_FORMATS)
def test_batches_equal_numpy_source(fmt: str, where: str, use_mmap: bool, jasper_root: str,
                                    jasper_data: dict[str, Any], request: pytest.FixtureRequest) -> None:
    url, options = jasper_url(jasper_root, fmt, where, request.getfixturevalue("s3") if where == "s3" else None)
    for split in ("train", "val"):
        ds = JASPERSteeringDataset(url, split, epoch=25, storage_format="auto", use_mmap=use_mmap,
                                   storage_options=options)
        assert ds.storage_format == fmt and ds.use_mmap is use_mmap
        assert len(ds) == len(jasper_data[f"{split}_idx"])
        positions = np.array([3, 0, 3, len(ds) - 1, 5])
        assert_batch(ds.__getitems__(positions).collated, jasper_data, split, positions)
        single = ds[2]
        np.testing.assert_array_equal(single["question_emb"].numpy(),
                                      jasper_data["question_embs"][jasper_data["pair_index"][
                                          jasper_data[f"{split}_idx"][2], 0]])
    assert ds.embedding_dim == 16 and ds.n_neg == 4 and ds.n_clusters == 5


@pytest.mark.parametrize("fmt", ["pt", "hdf5", "zarr"])
def test_explicit_format_and_auto_prefers_hdf5(fmt: str, jasper_root: str, jasper_data: dict[str, Any],
                                               tmp_path: Any) -> None:
    both = str(tmp_path / "both")
    shutil.copytree(os.path.join(jasper_root, "pt"), both)
    shutil.copy(os.path.join(jasper_root, "hdf5", "dataset.h5"), both)
    assert JASPERSteeringDataset(both, "train").storage_format == "hdf5"
    assert JASPERSteeringDataset(both, "train", storage_format="pt").storage_format == "pt"
    ds = JASPERSteeringDataset(os.path.join(jasper_root, fmt), "test", storage_format=fmt)
    positions = np.arange(len(ds))
    assert_batch(ds.__getitems__(positions).collated, jasper_data, "test", positions)
    with pytest.raises(DatasetNotFoundError):
        JASPERSteeringDataset(os.path.join(jasper_root, "pt"), "train", storage_format="zarr")
    with pytest.raises(ValueError, match="storage_format"):
        JASPERSteeringDataset(both, "train", storage_format="parquet")


def test_curriculum_table_exactly() -> None:
    table = {0: [0.7, 0.2, 0.1, 0.0], 9: [0.7, 0.2, 0.1, 0.0], 10: [0.5, 0.3, 0.15, 0.05],
             19: [0.5, 0.3, 0.15, 0.05], 20: [0.3, 0.3, 0.25, 0.15], 29: [0.3, 0.3, 0.25, 0.15],
             30: [0.1, 0.3, 0.35, 0.25], 39: [0.1, 0.3, 0.35, 0.25], 40: [0.0, 0.2, 0.4, 0.4],
             400: [0.0, 0.2, 0.4, 0.4]}
    for epoch, probs in table.items():
        assert compute_steering_probs(epoch).tolist() == probs


def test_set_epoch_is_deterministic_and_follows_the_curriculum(tmp_path: Any) -> None:
    data = make_jasper(n_pairs=4000, seed=3)
    root = write_jasper_pt(str(tmp_path / "ds"), data)
    a, b = JASPERSteeringDataset(root, "train"), JASPERSteeringDataset(root, "train", epoch=45)
    assert a.get_steering_stats()["epoch"] == 0
    everything = np.arange(len(a))
    v0 = a.__getitems__(everything).collated["steering_variant"].numpy()
    assert (v0 != 3).all()  # residual has probability 0 before epoch 10
    assert abs((v0 == 0).mean() - 0.7) < 0.05
    v45 = b.__getitems__(everything).collated["steering_variant"].numpy()
    assert (v45 != 0).all()
    a.set_epoch(45)
    np.testing.assert_array_equal(a.__getitems__(everything).collated["steering_variant"].numpy(), v45)
    a.set_epoch(46)
    assert (a.__getitems__(everything).collated["steering_variant"].numpy() != v45).any()
    stats = a.get_steering_stats()
    assert stats["epoch"] == 46 and stats["probs"] == [0.0, 0.2, 0.4, 0.4]
    assert stats["variant_names"] == ["none", "centroid", "keyword_weighted", "residual"]
    assert sum(stats["counts"]) == len(a)


def test_force_steering(jasper_root: str, jasper_data: dict[str, Any]) -> None:
    ds = JASPERSteeringDataset(os.path.join(jasper_root, "pt"), "train")
    positions = np.arange(len(ds))
    ds.force_steering("residual")
    batch = ds.__getitems__(positions).collated
    assert (batch["steering_variant"] == 3).all()
    pairs = jasper_data["train_idx"]
    np.testing.assert_array_equal(batch["steering"].numpy(), jasper_data["steering_residual"][pairs])
    assert ds.get_steering_stats()["forced"] == "residual"
    ds.force_steering("none")
    assert not ds.__getitems__(positions).collated["steering"].any()
    ds.force_steering(None)
    assert ds.get_steering_stats()["forced"] is None
    assert (ds.__getitems__(positions).collated["steering_variant"] == 0).any()
    with pytest.raises(ValueError, match="steering variant"):
        ds.force_steering("sideways")


def test_subset_by_cluster(jasper_root: str, jasper_data: dict[str, Any]) -> None:
    from torch.utils.data import DataLoader, Subset

    for use_mmap in (False, True):
        ds = JASPERSteeringDataset(os.path.join(jasper_root, "hdf5"), "train", use_mmap=use_mmap)
        subset = ds.subset_by_cluster([0, 3])
        assert isinstance(subset, Subset)
        clusters = jasper_data["pair_cluster_id"][jasper_data["train_idx"]]
        assert len(subset) == int(np.isin(clusters, [0, 3]).sum()) > 0
        batch = next(iter(DataLoader(subset, batch_size=len(subset))))
        assert set(batch["cluster_id"].tolist()) <= {0, 3}


def test_convert_pt_to_hdf5(tmp_path: Any, jasper_data: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    root = write_jasper_pt(str(tmp_path / "ds"), jasper_data)
    pt_files = sorted(f for f in os.listdir(root) if f.endswith(".pt"))
    report = JASPERSteeringDataset.convert_pt_to_hdf5(root, compression="gzip")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Converting PT format to HDF5 in {root}"
    assert out[1:6] == ["Converting embeddings...", "Converting pair data...", "Converting negatives...",
                        "Converting steering tensors...", "Converting split indices..."]
    assert out[6] == f"Conversion complete. HDF5 file saved to {root}/dataset.h5"
    assert out[7].startswith("File sizes: PT format=") and "HDF5=" in out[7] and "(compression: " in out[7]
    assert sorted(f for f in os.listdir(root) if f.endswith(".pt")) == pt_files  # PT files preserved
    assert report["hdf5_bytes"] == os.path.getsize(os.path.join(root, "dataset.h5"))

    import h5py

    with h5py.File(os.path.join(root, "dataset.h5")) as f:
        assert f["embeddings/questions"].compression == "gzip"
        assert f["pair_data/keyword_ids"].shape == (80,)
        np.testing.assert_array_equal(f["splits/train"][...], jasper_data["train_idx"])
    ds = JASPERSteeringDataset(root, "val")
    assert ds.storage_format == "hdf5"
    positions = np.arange(len(ds))
    assert_batch(ds.__getitems__(positions).collated, jasper_data, "val", positions)
    with pytest.raises(UnistoreError):
        JASPERSteeringDataset.convert_pt_to_hdf5(root, compression="zstd")
    assert ds.__getitems__([0]).collated["question_emb"].shape == (1, 16)  # the previous dataset.h5 is intact


def test_use_mmap_auto_and_memory_report(jasper_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = os.path.join(jasper_root, "npy")
    small = JASPERSteeringDataset(url, "train")
    assert small.use_mmap is False
    monkeypatch.setattr(jasper_module, "MMAP_AUTO_BYTES", 1000)
    large = JASPERSteeringDataset(url, "train")
    assert large.use_mmap is True
    assert large._compute_memory_usage() < small._compute_memory_usage()
    report = small.memory_report()
    assert report["mode"] == "preloaded"
    assert report["bytes"]["steering"] == 3 * 80 * 16 * 4 + 80 * 4  # three variants + distances
    assert large.memory_report()["bytes"]["steering"] == 0
    with pytest.raises(UnsupportedError, match="use_mmap"):
        JASPERSteeringDataset(url, "train", use_mmap=True, device="cuda")


def _broken(tmp_path: Any, name: str, value: Any) -> str:
    data = make_jasper()
    data[name] = value(data[name]) if callable(value) else value
    return write_jasper_pt(str(tmp_path / "broken"), data)


@pytest.mark.parametrize("name, change, message", [
    ("hard_negatives", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 13, 60, a),
     r"hard_negatives\[3, 1\] = 60 .*source_embs has 60 rows"),
    ("pair_index", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 10, 99, a),
     r"pair_index\[5, 0\] = 99 .*question_embs has 40 rows"),
    ("pair_cluster_id", lambda a: np.where(np.arange(a.size) == 7, -1, a), r"pair_cluster_id\[7\] = -1"),
    ("train_idx", lambda a: np.concatenate([a, [80]]), r"train_idx\[56\] = 80 .*pair_index has 80 rows"),
    ("pair_keyword_ids", lambda rows: rows[:9] + [[0, 25]] + rows[10:], r"pair_keyword_ids\[9\] holds 25"),
])
def test_referential_integrity(tmp_path: Any, name: str, change: Any, message: str) -> None:
    root = _broken(tmp_path, name, change)
    before = tree_digest(root)
    for use_mmap in (False, True):
        with pytest.raises(IntegrityError, match=message) as info:
            JASPERSteeringDataset(root, "train", use_mmap=use_mmap)
        assert isinstance(info.value, ValueError)
    assert tree_digest(root) == before


def test_missing_and_mismatched_inputs(tmp_path: Any, jasper_root: str) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        JASPERSteeringDataset(str(tmp_path / "nowhere"), "train")
    root = str(tmp_path / "ds")
    shutil.copytree(os.path.join(jasper_root, "pt"), root)
    os.remove(os.path.join(root, "val_idx.pt"))
    JASPERSteeringDataset(root, "train")
    with pytest.raises(ValueError, match="split 'val' not found"):
        JASPERSteeringDataset(root, "val")
    os.remove(os.path.join(root, "steering_residual.pt"))
    with pytest.raises(DatasetNotFoundError, match="steering_residual"):
        JASPERSteeringDataset(root, "train")
    with pytest.raises(ValueError, match="split must be"):
        JASPERSteeringDataset(root, "holdout")
    bad = make_jasper()
    bad["steering_centroid"] = bad["steering_centroid"][:, :8]
    with pytest.raises(ShapeMismatchError, match="steering_centroid"):
        JASPERSteeringDataset(write_jasper_pt(str(tmp_path / "shape"), bad), "train")
    short = make_jasper()
    short["negative_tiers"] = short["negative_tiers"][:40]
    with pytest.raises(ShapeMismatchError, match="negative_tiers"):
        JASPERSteeringDataset(write_jasper_h5(str(tmp_path / "short"), short), "train")


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("fmt", ["pt", "zarr"])
def test_workers_return_the_same_batches(fmt: str, context: str, jasper_root: str) -> None:
    url = os.path.join(jasper_root, fmt)

    def batches(workers: int) -> list[dict[str, Any]]:
        loader = create_loader(url, "train", batch_size=8, num_workers=workers, seed=4, epoch=12, use_mmap=True,
                               multiprocessing_context=context if workers else None)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 7
    for a, b in zip(serial, parallel):
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_validate_first_batch(tmp_path: Any, jasper_root: str) -> None:
    loader = create_loader(os.path.join(jasper_root, "pt"), "train", batch_size=8)
    assert validate_first_batch(loader)["question_emb"].shape == (8, 16)
    assert loader.dataset_obj.split == "train"
    for name, value, message in (("pair_relevance", 1.5, "relevance values span"),
                                 ("steering_centroid", np.nan, "steering has .* NaN"),
                                 ("negative_tiers", 7, "negative_tiers values span")):
        data = make_jasper()
        data[name] = np.full_like(data[name], value)
        root = write_jasper_pt(str(tmp_path / name), data)
        loader = create_loader(root, "train", batch_size=8)
        loader.dataset_obj.force_steering("centroid")
        with pytest.raises(AssertionError, match=message):
            validate_first_batch(loader)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_device_preloading_on_gpu(jasper_root: str, jasper_data: dict[str, Any]) -> None:
    ds = JASPERSteeringDataset(os.path.join(jasper_root, "hdf5"), "train", device=torch.device("cuda:0"))
    positions = np.array([4, 1, 4])
    batch = ds.__getitems__(positions).collated
    assert all(t.device.type == "cuda" for t in batch.values())
    assert_batch({k: v.cpu() for k, v in batch.items()}, jasper_data, "train", positions)
    assert ds.memory_report()["device"] == "cuda:0"
