"""Real DataLoader worker processes (fork, spawn, forkserver) read the same bytes as the main process."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import unistore as us

from .loader_helpers import MultiFormatDataset
from .native import FORMATS, STORE_NAME

ROWS = 96


def _batches(dataset: MultiFormatDataset, workers: int, context: str | None) -> list[list[np.ndarray]]:
    import torch.utils.data as tud

    loader = tud.DataLoader(dataset, batch_size=16, shuffle=False, num_workers=workers,
                            multiprocessing_context=context if workers else None)
    return [[t.numpy() for t in batch] for batch in loader]


@pytest.fixture(scope="module")
def local_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray]:
    root = tmp_path_factory.mktemp("loader")
    data = np.random.default_rng(5).standard_normal((ROWS, 12)).astype(np.float32)
    for fmt in FORMATS:
        with us.create_store(root / f"{fmt}-{STORE_NAME[fmt]}", format=fmt) as store:
            store.write_array("emb", data, chunks=(10, 12) if fmt in ("zarr", "hdf5") else None,
                              compression="gzip" if fmt in ("zarr", "hdf5") else None)
    return str(root), data


def _dataset(root: str, options: dict[str, Any] | None) -> MultiFormatDataset:
    return MultiFormatDataset([us.open_store(f"{root}/{f}-{STORE_NAME[f]}", storage_options=options)["emb"]
                               for f in FORMATS])


@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_workers_read_local_stores(context: str, local_stores: tuple[str, np.ndarray]) -> None:
    root, data = local_stores
    dataset = _dataset(root, None)
    serial = _batches(dataset, 0, None)
    parallel = _batches(dataset, 2, context)
    assert len(serial) == len(parallel) == ROWS // 16
    for b_serial, b_parallel in zip(serial, parallel):
        for s, p in zip(b_serial, b_parallel):
            np.testing.assert_array_equal(s, p)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in parallel]), data)


@pytest.mark.s3
@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_workers_read_s3_stores(context: str, local_stores: tuple[str, np.ndarray], s3: dict[str, Any]) -> None:
    root, data = local_stores
    s3["fs"].put(root + "/", f"{s3['bucket']}/loader", recursive=True)
    dataset = _dataset(f"s3://{s3['bucket']}/loader", s3["options"])
    parallel = _batches(dataset, 2, context)
    for column in range(len(FORMATS)):
        np.testing.assert_array_equal(np.concatenate([b[column] for b in parallel]), data)
