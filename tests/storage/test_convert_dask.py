"""convert on Dask: worker processes stage row blocks, the result equals the single-process conversion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore.storage import convert as convert_module

from .native import FORMATS, STORE_NAME

pytestmark = pytest.mark.leaves_threads

DATA = np.random.default_rng(7).standard_normal((3000, 16)).astype(np.float32)
IDS = np.arange(3000, dtype=np.int64)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dask-src")
    out = {}
    for fmt in FORMATS:
        url = str(root / f"src-{fmt}-{STORE_NAME[fmt]}")
        chunked = fmt in ("zarr", "hdf5")
        with us.create_store(url, format=fmt) as store:
            store.write_array("emb", DATA, chunks=(250, 16) if chunked else None,
                              compression="gzip" if chunked else None, attrs={"unit": "x"})
            store.write_array("ids", IDS)
            store.write_array("kw", [[1, 2], [], [3]])
            store.attrs["model"] = "minilm"
        out[fmt] = url
    return out


def same_store(a: Any, b: Any) -> None:
    assert a.keys() == b.keys() and a.attrs == b.attrs and a.checksums == b.checksums and a.checksums
    for key in a.keys():
        assert a[key].chunks == b[key].chunks and a[key].dtype == b[key].dtype
    np.testing.assert_array_equal(a["emb"][...], DATA)


@pytest.mark.parametrize("dst_fmt", FORMATS)
@pytest.mark.parametrize("src_fmt", FORMATS)
def test_every_format_to_every_format(src_fmt: str, dst_fmt: str, sources: dict[str, str], client: Any,
                                      tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert_module, "BLOCK_BYTES", 64 * 1024)  # several blocks per array
    options = {"compression": "zstd" if dst_fmt == "zarr" else None, "chunks": (500,) if dst_fmt == "zarr" else None}
    single = str(tmp_path / f"single-{STORE_NAME[dst_fmt]}")
    parallel = str(tmp_path / f"dask-{STORE_NAME[dst_fmt]}")
    us.convert(sources[src_fmt], single, dst_fmt, **options)
    report = us.convert(sources[src_fmt], parallel, dst_fmt, scheduler=client, **options)
    assert report.blocks_copied >= 3 and report.blocks_skipped == 0
    assert report.source_bytes_read is not None and 0 < report.source_bytes_read <= 1.05 * report.src_bytes
    same_store(us.open_store(parallel), us.open_store(single))
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (single, parallel))  # no job dir
    if dst_fmt in ("zarr", "npy"):  # the workers wrote the destination, byte for byte what one process writes
        assert report.blocks_encoded >= 2
        chunk_files = sorted(os.path.relpath(os.path.join(d, f), single) for d, _, fs in os.walk(single) for f in fs
                             if "/c/" in os.path.join(d, f) or f.endswith(".npy"))
        assert len(chunk_files) >= (4 if dst_fmt == "zarr" else 1)
        for rel in chunk_files:
            with open(os.path.join(single, rel), "rb") as a, open(os.path.join(parallel, rel), "rb") as b:
                assert a.read() == b.read(), rel
    else:
        assert report.blocks_encoded == 0


@pytest.mark.s3
def test_to_zarr_on_s3(sources: dict[str, str], client: Any, s3: dict[str, Any], tmp_path: Any) -> None:
    url = f"s3://{s3['bucket']}/out.zarr"
    us.convert(sources["pt"], url, "zarr", compression="zstd", dst_storage_options=s3["options"], scheduler=client)
    us.convert(sources["pt"], str(tmp_path / "one.zarr"), "zarr", compression="zstd")
    same_store(us.open_store(url, storage_options=s3["options"]), us.open_store(str(tmp_path / "one.zarr")))
    assert s3["fs"].ls(s3["bucket"]) == [f"{s3['bucket']}/out.zarr"]  # the job prefix is gone


def test_a_killed_worker_is_recovered(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from dask.distributed import Client, LocalCluster

    big = np.random.default_rng(1).standard_normal((400_000, 16)).astype(np.float32)
    src = str(tmp_path / "src")
    with us.create_store(src, format="npy") as store:
        store.write_array("emb", big)
    monkeypatch.setattr(convert_module, "BLOCK_BYTES", 64 * 1024)  # 391 blocks of 1024 rows
    dst = str(tmp_path / "out.zarr")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        pids = list(c.run(os.getpid).values())
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["report"] = us.convert(src, dst, "zarr", compression="zstd", chunks=(1024,), scheduler=c)
            except Exception as e:  # noqa: BLE001 - the assertions below say which way it went
                result["error"] = e

        thread = threading.Thread(target=run)
        thread.start()
        staged = 0
        deadline = time.monotonic() + 60
        while staged < 20 and time.monotonic() < deadline and thread.is_alive():
            staged = sum(f.endswith(".sha256") for d in os.listdir(tmp_path) if "unistore-job" in d
                         for _, _, fs in os.walk(tmp_path / d) for f in fs)
            time.sleep(0.02)
        os.kill(pids[0], signal.SIGKILL)  # mid-job: blocks are still being staged
        thread.join(timeout=240)
    assert not thread.is_alive() and staged >= 20
    if "error" in result:  # the job failed: nothing was published, and a rerun completes it
        assert not os.path.exists(dst)
        report = us.convert(src, dst, "zarr", compression="zstd", chunks=(1024,), scheduler="local")
        assert report.blocks_skipped >= 20
    else:  # Dask ran the dead worker's blocks elsewhere
        report = result["report"]
    assert report.blocks_copied + report.blocks_skipped == report.blocks_encoded == -(-400_000 // 1024)
    np.testing.assert_array_equal(us.open_store(dst)["emb"][...], big)


KILLED_CLIENT = textwrap.dedent("""
    import sys
    import unistore as us
    from unistore.storage import convert as convert_module
    convert_module.BLOCK_BYTES = 4 * 1024
    from dask.distributed import Client, LocalCluster
    import time, unistore.storage.dask_jobs as d
    slow = d.stage_block
    def stage_block(*a, **k):
        time.sleep(0.05)
        return slow(*a, **k)
    d.stage_block = stage_block
    if __name__ == "__main__":
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \\
                Client(cluster) as c:
            us.convert(sys.argv[1], sys.argv[2], "zarr", compression="zstd", chunks=(64,), scheduler=c)
""")


def test_rerun_after_a_client_crash_skips_verified_blocks(sources: dict[str, str], tmp_path: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    dst = str(tmp_path / "out.zarr")
    script = tmp_path / "client.py"
    script.write_text(KILLED_CLIENT)
    proc = subprocess.Popen([sys.executable, str(script), sources["npy"], dst], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    markers: list[str] = []
    while time.monotonic() < deadline and len(markers) < 8:
        jobs = [d for d in os.listdir(tmp_path) if d.startswith(".out.zarr.unistore-job-")]
        markers = [f for job in jobs for _, _, fs in os.walk(tmp_path / job) for f in fs if f.endswith(".sha256")]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the client and its cluster die mid-job
    proc.wait()
    assert len(markers) >= 8 and not os.path.exists(dst)
    monkeypatch.setattr(convert_module, "BLOCK_BYTES", 4 * 1024)
    report = us.convert(sources["npy"], dst, "zarr", compression="zstd", chunks=(64,), scheduler="local")
    assert report.blocks_skipped >= 8 and report.blocks_copied > 0
    np.testing.assert_array_equal(us.open_store(dst)["emb"][...], DATA)
    assert not [d for d in os.listdir(tmp_path) if "unistore-job" in d]


def test_a_rerun_finds_the_same_job_for_chunked_sources(sources: dict[str, str], client: Any, tmp_path: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from unistore.storage.convert import _DaskJob

    monkeypatch.setattr(convert_module, "BLOCK_BYTES", 64 * 1024)
    for fmt in ("zarr", "hdf5"):
        dst = us.create_store(str(tmp_path / f"{fmt}.zarr"), format="zarr")
        src = us.open_store(sources[fmt])
        arrays = {k: src[k] for k in src.keys()}
        first = _DaskJob(src, arrays, dst.location, "zarr", None, None, {})
        first.run(client)
        again = _DaskJob(us.open_store(sources[fmt]), arrays, dst.location, "zarr", None, None, {})
        assert again.location == first.location  # a fresh open of the same source: the same job
        again.run(client)
        assert again.skipped == first.copied > 0 and again.copied == 0
        again.remove()
        dst.abort()
