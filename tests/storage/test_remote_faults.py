"""Every remote read ends within its deadline: each format, each fault kind, with and without the disk cache.

A persistent fault (503, 500, connection reset, short body, a server that
accepts and stays silent, a body that trickles in) injected by the proxy on
every ranged read after the store is opened must end in one ``RemoteError``
naming the URL and the setting that bounds it, within the deadline
(``UNISTORE_RETRY_DEADLINE=2`` here; ``open_store(..., deadline=)`` sets it
per store) without progress, for the whole batch.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore import errors

from ..conftest import S3_SECRET, s3_options
from .faulty_proxy import FaultyProxy
from .native import STORE_NAME

pytestmark = [pytest.mark.s3, pytest.mark.slow]

FAULTS = ["503", "500", "reset", "short", "silence", "trickle"]
DEADLINE = 2.0
DATA = np.random.default_rng(1).standard_normal((4096, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def uploaded(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import boto3
    import s3fs

    bucket = "faults"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key=S3_SECRET,
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(s3_server))
    root = tmp_path_factory.mktemp("faults")
    urls = {}
    for fmt, base in STORE_NAME.items():
        name = f"{fmt}-{base}"
        local = root / name
        with us.create_store(local, format=fmt) as store:
            store.write_array("emb", DATA, chunks=(256, 32) if fmt == "zarr" else None,
                              compression="zstd" if fmt == "zarr" else None)
        if local.is_dir():
            fs.put(str(local) + "/", f"{bucket}/{name}", recursive=True)
        else:
            fs.put_file(str(local), f"{bucket}/{name}")
        urls[fmt] = f"s3://{bucket}/{name}"
    return urls


@pytest.fixture
def proxy(s3_server: str) -> Any:
    p = FaultyProxy(s3_server)
    yield p
    p.close()


@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "disk-cache"])
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("fmt", sorted(STORE_NAME))
def test_persistent_fault_ends_in_remote_error_within_the_deadline(fmt: str, fault: str, cached: bool,
                                                                   uploaded: dict[str, str], proxy: FaultyProxy,
                                                                   tmp_path: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    options = s3_options(proxy.endpoint)
    options["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 20}
    from unistore.storage.cache import DiskCache

    # 16 KiB cache blocks: opening caches the metadata's blocks, not the whole 512 KiB object
    cache = DiskCache(tmp_path / "cache", block_bytes=16 * 1024) if cached else False
    store = us.open_store(uploaded[fmt], storage_options=options, cache=cache)  # opened with the default deadline
    monkeypatch.setenv("UNISTORE_RETRY_DEADLINE", str(DEADLINE))  # reads from now on: the deadline from the env
    proxy.mode, proxy.fail_always = fault, True
    start = time.monotonic()
    with pytest.raises(errors.RemoteError) as info:
        store["emb"].take([1, 2000, 4000])
    took = time.monotonic() - start
    # one deadline without progress for the whole batch, though its three rows are three reads for zarr (one
    # per chunk), which zarr's client may run one after another
    assert took < DEADLINE + 8, f"{fault} on {fmt} took {took:.1f}s"
    text = str(info.value)
    assert uploaded[fmt].split("://")[1] in text and "UNISTORE_RETRY_DEADLINE" in text, text
    assert S3_SECRET not in text
    proxy.fail_always = False
    monkeypatch.delenv("UNISTORE_RETRY_DEADLINE")
    again = us.open_store(uploaded[fmt], storage_options=options, cache=cache)
    np.testing.assert_array_equal(again["emb"].take([1, 4000]), DATA[[1, 4000]])  # nothing wrong was cached


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_persistent_fault_while_opening_a_directory_is_a_remote_error(fmt: str, uploaded: dict[str, str],
                                                                      proxy: FaultyProxy,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISTORE_RETRY_DEADLINE", str(DEADLINE))  # the deadline from the environment
    options = s3_options(proxy.endpoint)
    options["config_kwargs"] = {"retries": {"max_attempts": 1}}
    url = uploaded[fmt]
    if fmt == "safetensors":  # a directory of safetensors files
        url = url.rsplit("/", 1)[0] + "/st_dir"
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(proxy.endpoint))
        fs.copy(uploaded[fmt].split("://")[1], url.split("://")[1] + "/a.safetensors")
    proxy.mode, proxy.fail_always = "503", True
    start = time.monotonic()
    with pytest.raises(errors.RemoteError):
        us.open_store(url, storage_options=options)
    assert time.monotonic() - start < DEADLINE + 8


def test_the_deadline_is_settable_per_store(uploaded: dict[str, str], proxy: FaultyProxy) -> None:
    options = s3_options(proxy.endpoint)
    options["config_kwargs"] = {"retries": {"max_attempts": 1}, "read_timeout": 60}
    slow = us.open_store(uploaded["npy"], storage_options=options, deadline=4)
    patient = us.open_store(uploaded["npy"], storage_options=options)
    proxy.mode, proxy.fail_always = "silence", True
    start = time.monotonic()
    with pytest.raises(errors.RemoteError, match="4s deadline"):
        slow["emb"].take([7])
    assert time.monotonic() - start < 4 + 8
    proxy.fail_always = False
    np.testing.assert_array_equal(patient["emb"].take([7]), DATA[[7]])
    import pickle

    assert pickle.loads(pickle.dumps(slow))["emb"].layout.location.deadline == 4  # workers keep it
