"""Array.to_dask / TensorStore.to_dask: lazy dask arrays read through the layer, locally and from S3."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore.errors import UnsupportedError

from .native import FORMATS, STORE_NAME, native_write

pytestmark = pytest.mark.leaves_threads

DATA = np.random.default_rng(3).standard_normal((1000, 24)).astype(np.float32)
IDS = np.arange(1000, dtype=np.int64) * 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_equals_the_numpy_source(fmt: str, tmp_path: Any) -> None:
    native = str(tmp_path / f"native-{STORE_NAME[fmt]}")
    native_write(fmt, native, {"emb": DATA, "ids": IDS}, {})
    written = str(tmp_path / f"ours-{STORE_NAME[fmt]}")
    chunked = fmt in ("zarr", "hdf5")
    with us.create_store(written, format=fmt) as store:
        store.write_array("emb", DATA, chunks=(64, 24) if chunked else None, compression="gzip" if chunked else None)
        store.write_array("ids", IDS)
        store.write_array("ragged", [[1, 2], [], [3]])
    for url in (native, written):
        store = us.open_store(url)
        emb = store["emb"].to_dask(block_rows=300)
        assert emb.shape == DATA.shape and emb.dtype == DATA.dtype and emb.chunks[0] == (300, 300, 300, 100)
        np.testing.assert_array_equal(emb.compute(), DATA)
        np.testing.assert_allclose(emb.mean(axis=0).compute(), DATA.mean(axis=0), rtol=1e-5)
        arrays = store.to_dask()
        assert "ragged" not in arrays
        np.testing.assert_array_equal(arrays["ids"].compute(), IDS)
    default = us.open_store(written)["emb"].to_dask()
    if chunked:  # blocks are whole stored chunks
        assert all(c % 64 == 0 for c in default.chunks[0][:-1])
    with pytest.raises(UnsupportedError, match="ragged"):
        us.open_store(written).to_dask(keys=["ragged"])


@pytest.mark.s3
def test_mean_over_a_chunked_s3_store_on_worker_processes(s3: dict[str, Any]) -> None:
    from dask.distributed import Client, LocalCluster

    url = f"s3://{s3['bucket']}/emb.zarr"
    with us.create_store(url, format="zarr", storage_options=s3["options"]) as store:
        store.write_array("emb", DATA, chunks=(100, 24), compression="zstd")
    arr = us.open_store(url, storage_options=s3["options"])["emb"]
    lazy = arr.to_dask(block_rows=200)
    assert lazy.chunks[0] == (200,) * 5
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        mean = client.compute(lazy.mean(axis=0)).result()
        total = client.compute(lazy.sum()).result()
    np.testing.assert_allclose(mean, DATA.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(total, DATA.sum(dtype=np.float64), rtol=1e-4)


def test_verify_on_a_local_cluster(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from dask.distributed import Client, LocalCluster

    from unistore.cli import main
    from unistore.errors import ChecksumMismatchError

    url = str(tmp_path / "store")
    with us.create_store(url, format="npy") as store:
        for i in range(4):
            store.write_array(f"a{i}", DATA * i)
        store.write_array("ragged", [[1, 2], [3]])
    single = us.open_store(url).verify()
    assert single == {"a0": "ok", "a1": "ok", "a2": "ok", "a3": "ok", "ragged": "ok"}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert us.open_store(url).verify(scheduler=client) == single
        with open(tmp_path / "store" / "a2.npy", "r+b") as f:  # flip bytes inside the data of one array
            f.seek(-100, 2)
            f.write(b"\x00" * 8)
        with pytest.raises(ChecksumMismatchError, match="'a2'"):
            us.open_store(url).verify(scheduler=client)
    assert main(["verify", url, "--dask"]) == 2
    assert "'a2'" in capsys.readouterr().err
