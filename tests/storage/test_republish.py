"""A store republished (``overwrite=True``) under a reader: the reader sees the version it opened, or
``StoreChangedError`` - never new bytes under the old shape and dtype, and never no store at all."""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore import errors

from .native import STORE_NAME

FORMATS = sorted(STORE_NAME)


def _version(v: int) -> np.ndarray:
    # versions differ in shape as well as values: bytes of one read under the other's shape would show
    return np.full((64 + 8 * (v % 2), 16 + 4 * (v % 3)), v, np.float32)


def _publish(url: str, fmt: str, v: int) -> None:
    with us.create_store(url, format=fmt, overwrite=True) as store:
        data = _version(v)
        store.write_array("emb", data, chunks=(8,) + data.shape[1:] if fmt in ("zarr", "hdf5") else None)
        store.attrs["version"] = v


def _writer(url: str, fmt: str, n: int) -> None:
    for v in range(1, n + 1):
        _publish(url, fmt, v)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_sees_the_version_it_opened_or_a_typed_error(tmp_path: Any, fmt: str) -> None:
    url = str(tmp_path / STORE_NAME[fmt])
    _publish(url, fmt, 0)
    writer = mp.get_context("fork").Process(target=_writer, args=(url, fmt, 40))
    writer.start()
    outcomes = {"right": 0, "changed": 0}
    rng = np.random.default_rng(0)
    try:
        while writer.is_alive() or sum(outcomes.values()) < 20:
            try:
                store = us.open_store(url)  # never StoreNotFoundError: the store is always there
            except errors.StoreChangedError:  # rewritten again and again while it was being opened
                outcomes["changed"] += 1
                continue
            v = store.attrs["version"]
            arr = store["emb"]
            assert arr.shape == _version(v).shape
            try:
                rows = arr.take(rng.integers(0, arr.shape[0], 16))
            except errors.StoreChangedError:
                outcomes["changed"] += 1
                continue
            assert (rows == v).all(), f"version {v} served bytes of another version"
            outcomes["right"] += 1
    finally:
        writer.join(120)
    assert writer.exitcode == 0
    assert outcomes["right"] > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_store_opened_before_a_rewrite_never_serves_the_new_bytes(tmp_path: Any, fmt: str) -> None:
    url = str(tmp_path / STORE_NAME[fmt])
    _publish(url, fmt, 0)
    store = us.open_store(url)  # described, nothing read yet
    _publish(url, fmt, 1)
    with pytest.raises(errors.StoreChangedError, match="open the store again"):
        store["emb"].take([1, 2])
    np.testing.assert_array_equal(us.open_store(url)["emb"].take([1]), _version(1)[[1]])


@pytest.mark.parametrize("fmt", ["npy", "pt", "safetensors", "hdf5"])
def test_rows_mapped_before_a_rewrite_stay_the_old_version(tmp_path: Any, fmt: str) -> None:
    url = str(tmp_path / STORE_NAME[fmt])
    _publish(url, fmt, 0)
    arr = us.open_store(url)["emb"]
    np.testing.assert_array_equal(arr.take([0]), _version(0)[[0]])  # mapped (or held open) now
    _publish(url, fmt, 1)
    np.testing.assert_array_equal(arr.take([3, 5]), _version(0)[[3, 5]])


def test_directory_republish_swaps_in_one_step(tmp_path: Any) -> None:
    url = str(tmp_path / "store")
    _publish(url, "npy", 0)
    before = os.stat(url).st_ino
    _publish(url, "npy", 1)
    assert os.stat(url).st_ino != before
    assert sorted(p for p in os.listdir(tmp_path)) == ["store"]  # nothing left beside it


@pytest.mark.s3
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_remote_store_rewritten_under_a_reader_is_store_changed(fmt: str, s3: dict[str, Any]) -> None:
    """No disk cache: every ranged read asks for the version that was listed or looked up at open (If-Match;
    zarr: If-Unmodified-Since the moment of opening, which counts whole seconds, hence the pause)."""
    import time

    url = f"s3://{s3['bucket']}/{STORE_NAME[fmt]}"
    data = np.full((64, 16), 1, np.float32)
    for v in (1, 2):
        with us.create_store(url, format=fmt, overwrite=True, storage_options=s3["options"]) as store:
            store.write_array("emb", data * v, chunks=(8, 16) if fmt in ("zarr", "hdf5") else None)
        if v == 1:
            reader = us.open_store(url, storage_options=s3["options"], cache=False)
            time.sleep(1.1)
    with pytest.raises(errors.StoreChangedError, match="rewritten"):
        reader["emb"].take([3])
    np.testing.assert_array_equal(us.open_store(url, storage_options=s3["options"])["emb"].take([3]), data[[3]] * 2)


@pytest.mark.s3
def test_a_zarr_store_deleted_under_a_reader_is_store_changed_not_damage(s3: dict[str, Any]) -> None:
    """A remote republish deletes the old objects first: a chunk gone together with the root metadata is a
    store being replaced (StoreChangedError); a chunk gone under unchanged metadata is damage."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3["options"])
    url = f"s3://{s3['bucket']}/gone.zarr"
    with us.create_store(url, format="zarr", overwrite=True, storage_options=s3["options"]) as store:
        store.write_array("emb", np.ones((64, 16), np.float32), chunks=(8, 16))
    reader = us.open_store(url, storage_options=s3["options"], cache=False)
    fs.rm(f"{s3['bucket']}/gone.zarr/emb/c/2/0")
    with pytest.raises(errors.CorruptDataError, match="missing"):
        reader["emb"].take([17])
    np.testing.assert_array_equal(reader["emb"].take([3]), np.ones((1, 16), np.float32))
    fs.rm(f"{s3['bucket']}/gone.zarr", recursive=True)
    with pytest.raises(errors.StoreChangedError, match="rewritten"):
        reader["emb"].take([40])


@pytest.mark.s3
def test_a_foreign_zarr_store_on_s3_reads_under_the_pin(s3: dict[str, Any]) -> None:
    """A store zarr-python wrote (metadata before chunks) reads as before: the pin is the moment of opening."""
    import zarr

    path = f"s3://{s3['bucket']}/foreign-pin.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=3, storage_options=s3["options"])
    group.create_array("emb", shape=(32, 4), dtype="float32", chunks=(8, 4))[...] = np.arange(128.0).reshape(32, 4)
    store = us.open_store(path, storage_options=s3["options"], cache=False)
    expected = np.arange(128.0, dtype=np.float32).reshape(32, 4)
    np.testing.assert_array_equal(store["emb"].take([0, 31]), expected[[0, 31]])


_REWRITE_THEN_READ = """
import sys, numpy as np, unistore as us
url, endpoint, secret = sys.argv[1:4]
opts = {"key": "testing", "secret": secret, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
def write(v):
    with us.create_store(url, format="hdf5", overwrite=True, storage_options=opts) as store:
        store.write_array("emb", np.full((64, 16), v, np.float32), chunks=(8, 16))
write(1)
reader = us.open_store(url, storage_options=opts, cache=False)
import time; time.sleep(1.1)
write(2)
try:
    reader["emb"].take([3])
except us.errors.StoreChangedError:
    print("StoreChangedError")
"""


@pytest.mark.s3
def test_a_remote_hdf5_rewritten_before_its_first_read_exits_cleanly(s3: dict[str, Any]) -> None:
    """The version check fails inside libhdf5's open of the file object; the process that saw it must still
    exit cleanly (an error kept with libhdf5's callback frames crashed the interpreter at exit)."""
    import subprocess
    import sys

    from ..conftest import S3_SECRET

    url = f"s3://{s3['bucket']}/first-read.h5"
    done = subprocess.run([sys.executable, "-c", _REWRITE_THEN_READ, url, s3["endpoint"], S3_SECRET],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "StoreChangedError" and done.returncode == 0, (done.returncode, done.stderr[-2000:])
