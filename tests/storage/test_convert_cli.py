"""convert between every pair of formats and filesystems, atomicity under kill -9, and the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore import errors
from unistore.cli import main

from .native import FORMATS, STORE_NAME


def _source(tmp_path: Any, fmt: str = "pt") -> tuple[str, dict[str, Any]]:
    data = {
        "emb": np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32),
        "labels": np.arange(300, dtype=np.int64),
        "kw": [[1, 2], [], [3, 4, 5]],
    }
    url = str(tmp_path / f"src-{STORE_NAME[fmt]}")
    with us.create_store(url, format=fmt) as store:
        for k, v in data.items():
            store.write_array(k, v)
        store.attrs["origin"] = "test"
    return url, data


def _check(url: str, data: dict[str, Any], options: dict[str, Any] | None = None) -> None:
    store = us.open_store(url, storage_options=options)
    np.testing.assert_array_equal(store["emb"][...], data["emb"])
    np.testing.assert_array_equal(store["labels"].take([299, 0]), [299, 0])
    assert store["kw"].to_list() == data["kw"]
    assert store.attrs["origin"] == "test"
    assert set(store.verify().values()) == {"ok"}


@pytest.mark.parametrize("src_fmt", FORMATS)
@pytest.mark.parametrize("dst_fmt", FORMATS)
def test_convert_every_pair_of_formats(src_fmt: str, dst_fmt: str, tmp_path: Any) -> None:
    src, data = _source(tmp_path, src_fmt)
    dst = str(tmp_path / f"dst-{STORE_NAME[dst_fmt]}")
    report = us.convert(src, dst, format=dst_fmt)
    assert report.arrays == 3 and report.dst_bytes > 0
    _check(dst, data)


@pytest.mark.s3
def test_convert_local_to_s3_and_back_with_compression(tmp_path: Any, s3: dict[str, Any]) -> None:
    src, data = _source(tmp_path)
    remote = f"s3://{s3['bucket']}/run1.zarr"
    us.convert(src, remote, format="zarr", compression="zstd", chunks=(64, 16), storage_options=s3["options"])
    store = us.open_store(remote, storage_options=s3["options"])
    assert store["emb"].compression == "zstd" and store["emb"].chunks == (64, 16)
    _check(remote, data, s3["options"])
    back = str(tmp_path / "back.h5")
    us.convert(remote, back, format="hdf5", compression="gzip", src_storage_options=s3["options"])
    _check(back, data)


def test_convert_memory_roundtrip(tmp_path: Any, memory_root: str) -> None:
    src, data = _source(tmp_path, "npy")
    us.convert(src, f"memory://{memory_root}/x.safetensors", format="safetensors")
    _check(f"memory://{memory_root}/x.safetensors", data)


def test_failed_convert_leaves_source_and_no_destination(tmp_path: Any) -> None:
    src, data = _source(tmp_path, "npy")
    before = {p: open(os.path.join(src, p), "rb").read() for p in sorted(os.listdir(src)) if p.endswith(".npy")}
    dst = tmp_path / "out.safetensors"
    with pytest.raises(errors.UnsupportedError):
        us.convert(src, dst, format="safetensors", compression="zstd")
    assert not dst.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # staging removed
    after = {p: open(os.path.join(src, p), "rb").read() for p in sorted(os.listdir(src)) if p.endswith(".npy")}
    assert before == after


def test_kill_9_during_conversion_leaves_destination_absent(tmp_path: Any) -> None:
    src = tmp_path / "big_npy"
    data = np.random.default_rng(0).standard_normal((4000, 256)).astype(np.float32)
    with us.create_store(src, format="npy") as store:
        for i in range(6):
            store.write_array(f"part{i}", data)
    dst = tmp_path / "big.zarr"
    script = textwrap.dedent(f"""
        import sys, time
        import unistore.storage.convert as c
        real = c._read_blocks
        def slow(*args):
            print("COPYING", flush=True)
            time.sleep(0.5)
            return real(*args)
        c._read_blocks = slow
        c.convert({str(src)!r}, {str(dst)!r}, format="zarr", compression="zstd")
        print("DONE", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("COPYING")
        if seen == 3:  # several arrays already staged
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    with pytest.raises(errors.StoreNotFoundError):
        us.open_store(dst)
    np.testing.assert_array_equal(us.open_store(src)["part5"].take([3999]), data[[3999]])
    staged = [p for p in os.listdir(tmp_path) if p.startswith(".big.zarr.unistore-tmp-")]
    assert staged  # the debris is hidden beside the destination, never at its name


def test_cli_info_convert_verify(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    src, data = _source(tmp_path, "pt")
    assert main(["info", src]) == 0
    out = capsys.readouterr().out
    assert "format: pt" in out and "emb" in out and "(300, 16)" in out and "float32" in out
    dst = str(tmp_path / "c.zarr")
    assert main(["convert", src, dst, "--to", "zarr", "--compression", "zstd", "--chunks", "100,16"]) == 0
    captured = capsys.readouterr()
    assert "converted 3 arrays" in captured.out and "->" in captured.out
    assert "%" in captured.err  # the progress bar
    assert main(["info", dst]) == 0
    out = capsys.readouterr().out
    assert "zstd" in out and "(100, 16)" in out
    assert main(["verify", dst]) == 0
    assert "3 of 3 arrays verified" in capsys.readouterr().out
    assert main(["ls", dst]) == 0
    assert capsys.readouterr().out.split() == ["emb", "kw", "labels"]


def test_cli_verify_fails_on_corruption_and_reports_errors(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _source(tmp_path, "npy")
    path = os.path.join(src, "labels.npy")
    raw = bytearray(open(path, "rb").read())
    raw[-1] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    assert main(["verify", src]) == 2
    assert "labels" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_entry_point_runs(tmp_path: Any) -> None:
    src, _ = _source(tmp_path, "safetensors")
    exe = os.path.join(os.path.dirname(sys.executable), "unistore")
    result = subprocess.run([exe, "info", src], capture_output=True, text=True, check=True)
    assert "safetensors" in result.stdout


@pytest.mark.parametrize("dst_fmt", FORMATS)
def test_large_arrays_are_staged_on_disk_not_in_ram(dst_fmt: str, tmp_path: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import unistore.storage.convert as conv

    monkeypatch.setattr(conv, "IN_MEMORY_BYTES", 1000)  # every array here counts as large
    monkeypatch.setattr(conv, "BLOCK_BYTES", 4096)  # and is copied in many blocks
    src, data = _source(tmp_path, "npy")
    dst = str(tmp_path / f"dst-{STORE_NAME[dst_fmt]}")
    us.convert(src, dst, format=dst_fmt)
    _check(dst, data)
