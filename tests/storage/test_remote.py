"""S3 through a real protocol server: ranged reads, retries, typed failures, secrets, atomic publish."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore import errors
from unistore.storage.layout import ContiguousLayout

from ..conftest import S3_SECRET, s3_options
from .faulty_proxy import FaultyProxy

pytestmark = pytest.mark.s3

ROWS, DIM = 16384, 256  # 16 MiB of float32: big enough that 256 rows are ~1.6% of it
BYTE_LAYOUT_STORES = {
    "npy": ("emb_npy", {}),
    "raw": ("emb_raw", {"raw": {"emb": ((-1, DIM), "float32")}}),
    "safetensors": ("emb.safetensors", {}),
    "pt": ("emb_pt", {}),
    "hdf5": ("emb.h5", {}),
}


@pytest.fixture(scope="module")
def embeddings() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((ROWS, DIM)).astype(np.float32)


def _upload(kind: str, s3: dict[str, Any], tmp_path: Any, data: np.ndarray) -> str:
    name, _ = BYTE_LAYOUT_STORES[kind]
    local = tmp_path / name
    if kind == "raw":
        local.mkdir()
        data.tofile(local / "emb.npy")
    else:
        with us.create_store(local, format=kind) as store:
            store.write_array("emb", data)
    remote = f"{s3['bucket']}/{name}"
    if local.is_dir():
        s3["fs"].put(str(local) + "/", remote, recursive=True)
    else:
        s3["fs"].put_file(str(local), remote)
    return f"s3://{remote}"


@pytest.mark.parametrize("kind", sorted(BYTE_LAYOUT_STORES))
def test_random_rows_fetch_under_five_percent(kind: str, s3: dict[str, Any], tmp_path: Any,
                                              embeddings: np.ndarray) -> None:
    url = _upload(kind, s3, tmp_path, embeddings)
    store = us.open_store(url, storage_options=s3["options"], **BYTE_LAYOUT_STORES[kind][1])
    arr = store["emb"]
    assert isinstance(arr.layout, ContiguousLayout)
    idx = np.random.default_rng(3).integers(0, ROWS, 256)
    store.reset_io_stats()
    rows = arr.take(idx)
    np.testing.assert_array_equal(rows, embeddings[idx])
    stats = store.io_stats()
    assert stats["bytes"] < 0.05 * embeddings.nbytes, stats
    assert 0 < stats["requests"] <= 256


@pytest.fixture
def proxy(s3: dict[str, Any]) -> Any:
    p = FaultyProxy(s3["endpoint"])
    yield p
    p.close()


def _proxied(s3: dict[str, Any], proxy: FaultyProxy) -> dict[str, Any]:
    opts = s3_options(proxy.endpoint)
    opts["config_kwargs"]["retries"] = {"max_attempts": 1, "mode": "standard"}
    return opts


@pytest.mark.parametrize("mode", ["503", "500", "reset", "short"])
def test_transient_faults_are_retried(mode: str, s3: dict[str, Any], proxy: FaultyProxy, tmp_path: Any,
                                      embeddings: np.ndarray) -> None:
    url = _upload("npy", s3, tmp_path, embeddings)
    store = us.open_store(url, storage_options=_proxied(s3, proxy))
    idx = np.array([5, 4000, 16000, 5])
    proxy.mode, proxy.fail_next = mode, 2
    np.testing.assert_array_equal(store["emb"].take(idx), embeddings[idx])
    assert proxy.failures == 2


def test_persistent_failure_raises_remote_error_within_deadline(s3: dict[str, Any], proxy: FaultyProxy,
                                                                tmp_path: Any, embeddings: np.ndarray,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISTORE_RETRY_ATTEMPTS", "3")
    monkeypatch.setenv("UNISTORE_RETRY_DEADLINE", "5")
    url = _upload("npy", s3, tmp_path, embeddings)
    store = us.open_store(url, storage_options=_proxied(s3, proxy))
    proxy.mode, proxy.fail_always = "503", True
    start = time.monotonic()
    with pytest.raises(errors.RemoteError) as info:
        store["emb"].take([1, 2, 3])
    assert time.monotonic() - start < 60
    assert "failed" in str(info.value) and "UNISTORE_RETRY_DEADLINE" in str(info.value)
    assert S3_SECRET not in str(info.value)
    assert proxy.failures >= 3


def test_unreachable_endpoint_is_a_typed_error_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISTORE_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("UNISTORE_RETRY_DEADLINE", "3")
    opts = s3_options("http://127.0.0.1:9")  # discard port: nothing listens
    opts["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 1}
    with pytest.raises(errors.UnistoreError) as info:
        us.open_store("s3://no-such-bucket/store", storage_options=opts)
    assert isinstance(info.value, OSError)
    assert S3_SECRET not in str(info.value) and S3_SECRET not in repr(info.value)


def test_secrets_never_appear_in_reprs_logs_or_cli(s3: dict[str, Any], tmp_path: Any, embeddings: np.ndarray,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from unistore.cli import main

    caplog.set_level(logging.DEBUG)
    url = _upload("safetensors", s3, tmp_path, embeddings[:100])
    store = us.open_store(url, storage_options=s3["options"])
    texts = [repr(store), str(store), repr(store.location), repr(store["emb"]), str(store.location.safe_options)]
    with pytest.raises(errors.ArrayNotFoundError) as info:
        store["missing"]
    texts.append(str(info.value))
    args = ["info", url, "-o", "key=testing", "-o", f"secret={S3_SECRET}", "-o", f"endpoint_url={s3['endpoint']}"]
    assert main(args) == 0
    out = capsys.readouterr()
    texts += [out.out, out.err, caplog.text]
    assert "emb" in out.out
    for text in texts:
        assert S3_SECRET not in text


@pytest.mark.parametrize("fmt,name,root_meta", [("npy", "run_npy", "unistore.json"),
                                                ("zarr", "run.zarr", "zarr.json"), ("pt", "run_pt", "unistore.json")])
def test_remote_store_is_invisible_until_root_metadata_lands(fmt: str, name: str, root_meta: str,
                                                             s3: dict[str, Any], proxy: FaultyProxy,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISTORE_RETRY_ATTEMPTS", "1")
    url = f"s3://{s3['bucket']}/{name}"
    options = _proxied(s3, proxy)
    proxy.fail_put_suffix = f"{name}/{root_meta}"  # the connection dies just before the root metadata
    store = us.create_store(url, format=fmt, storage_options=options)
    store.write_array("emb", np.ones((10, 4), np.float32))
    with pytest.raises(OSError):
        store.commit()
    assert proxy.failures >= 1
    assert s3["fs"].exists(f"{s3['bucket']}/{name}/{'emb' if fmt == 'zarr' else 'emb.' + fmt}")
    with pytest.raises(errors.IncompleteStoreError):
        us.open_store(url, storage_options=s3["options"])
    proxy.fail_put_suffix = None
    with us.create_store(url, format=fmt, storage_options=options, overwrite=True) as again:
        again.write_array("emb", np.full((10, 4), 2, np.float32))
    np.testing.assert_array_equal(us.open_store(url, storage_options=s3["options"])["emb"][...], 2)


def test_env_credentials_work_without_storage_options(s3: dict[str, Any], tmp_path: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = f"s3://{s3['bucket']}/env.safetensors"
    with us.create_store(url, format="safetensors") as store:
        store.write_array("x", np.arange(6))
    np.testing.assert_array_equal(us.open_store(url)["x"][...], np.arange(6))
    assert os.environ["AWS_ENDPOINT_URL"] == s3["endpoint"]


def test_unistore_verdicts_and_names_with_500_are_not_retried() -> None:
    from unistore.errors import TruncatedDataError
    from unistore.storage.location import Location, retry_remote

    where = Location("s3://t-a83ec597500e47b2/store.h5")
    calls = []

    def truncated() -> None:
        calls.append(1)
        raise TruncatedDataError("s3://t-a83ec597500e47b2/store.h5 is a truncated HDF5 file")

    with pytest.raises(TruncatedDataError):
        retry_remote(truncated, where)
    assert len(calls) == 1  # a verdict on the data is final, whatever digits the bucket name holds

    def missing_bucket() -> None:
        calls.append(1)
        raise ValueError("bucket t-a83ec597500e47b2 has no such key")

    with pytest.raises(ValueError):
        retry_remote(missing_bucket, where)
    assert len(calls) == 2


def test_opening_a_zarr_store_does_not_list_its_chunks(s3: dict[str, Any], tmp_path: Any) -> None:
    """Many ranks open one store: opening reads metadata only; stored bytes are listed when asked."""
    data = np.random.default_rng(0).standard_normal((4000, 8)).astype(np.float32)
    local = str(tmp_path / "many.zarr")
    with us.create_store(local, format="zarr") as store:
        store.write_array("x", data, chunks=(10, 8), compression="zstd")  # 400 chunk objects
    s3["fs"].put(local + "/", f"{s3['bucket']}/many.zarr", recursive=True)
    proxy = FaultyProxy(s3["endpoint"])
    try:
        store = us.open_store(f"s3://{s3['bucket']}/many.zarr", storage_options=s3_options(proxy.endpoint))
        assert proxy.requests["GET"] <= 16 and proxy.bytes_out < 20_000, (proxy.requests, proxy.bytes_out)
        on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(local, "x"))
                      for f in fs)
        assert store["x"].stored_nbytes == on_disk
    finally:
        proxy.close()
