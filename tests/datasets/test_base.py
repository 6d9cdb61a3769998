"""StoreDataset and Batch: one take per array per batch, in any format, through torch's own collate."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, default_collate

import unistore as us
from unistore.datasets import Batch, StoreDataset, collate
from unistore.errors import ShapeMismatchError

from ..storage.native import FORMATS, STORE_NAME


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    root = str(tmp_path_factory.mktemp("base"))
    rng = np.random.default_rng(2)
    data = {"emb": rng.standard_normal((50, 6)).astype(np.float32), "label": rng.integers(0, 9, 50),
            "ids": [list(range(i % 4)) for i in range(50)]}
    for fmt in FORMATS:
        with us.create_store(f"{root}/{fmt}-{STORE_NAME[fmt]}", format=fmt) as store:
            store.write_array("emb", data["emb"], chunks=(8, 6) if fmt in ("zarr", "hdf5") else None,
                              compression="gzip" if fmt in ("zarr", "hdf5") else None)
            store.write_array("label", data["label"])
            store.write_array("ids", data["ids"])
    return root, data


@pytest.mark.parametrize("fmt", FORMATS)
def test_batches_are_one_take_per_array(fmt: str, stores: tuple[str, dict[str, Any]]) -> None:
    root, data = stores
    ds = StoreDataset(f"{root}/{fmt}-{STORE_NAME[fmt]}", keys=["emb", "label", "ids"])
    assert len(ds) == 50
    idx = [7, 3, 7, 49]
    ds.store.reset_io_stats()
    batch = ds.__getitems__(idx)
    assert isinstance(batch, Batch) and len(batch) == 4
    np.testing.assert_array_equal(batch.collated["emb"].numpy(), data["emb"][idx])
    np.testing.assert_array_equal(batch.collated["label"].numpy(), data["label"][idx])
    assert [t.tolist() for t in batch.collated["ids"]] == [data["ids"][i] for i in idx]
    sample = ds[3]
    assert sample["label"].item() == data["label"][3] and sample["ids"].tolist() == data["ids"][3]
    assert len(pickle.dumps(ds)) < 20_000  # metadata, not data, travels to workers


def test_numpy_flag_and_length_check(stores: tuple[str, dict[str, Any]], tmp_path: Any) -> None:
    root, data = stores
    ds = StoreDataset(f"{root}/npy-store", keys=["emb"], as_numpy=True)
    assert isinstance(ds[0]["emb"], np.ndarray)
    with us.create_store(tmp_path / "odd", format="npy") as store:
        store.write_array("a", np.zeros(3))
        store.write_array("b", np.zeros(4))
    with pytest.raises(ShapeMismatchError, match="different numbers of rows"):
        StoreDataset(tmp_path / "odd")


def test_torch_default_collate_takes_the_assembled_batch(stores: tuple[str, dict[str, Any]]) -> None:
    root, data = stores
    ds = StoreDataset(f"{root}/zarr-store.zarr", keys=["emb", "label"])
    plain = list(DataLoader(ds, batch_size=16))
    ours = list(DataLoader(ds, batch_size=16, collate_fn=collate))
    for a, b in zip(plain, ours):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key])
    batch = ds.__getitems__([1, 2])
    assert default_collate(batch) is batch.collated
    # samples gathered one at a time (no __getitems__ on ConcatDataset) still collate like plain dicts
    concat = next(iter(DataLoader(ConcatDataset([ds, ds]), batch_size=60)))
    np.testing.assert_array_equal(concat["emb"].numpy(), np.concatenate([data["emb"], data["emb"][:10]]))
    one_by_one = default_collate([ds[0], ds[1]])
    np.testing.assert_array_equal(one_by_one["label"].numpy(), data["label"][:2])
