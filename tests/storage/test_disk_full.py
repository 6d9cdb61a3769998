"""A full local disk is a DiskFullError, never a process killed by SIGBUS, and nothing already stored is lost.

Files unistore fills through a memory map (a conversion's spill file, a
preallocated ``.npy`` for parallel writers) are sparse until written; a page
written on a full disk kills the writer with SIGBUS.  The disk cache writes
its entries with ``write`` and only stops caching.  Each test runs its script
in a mount namespace of its own (``unshare``) on a real 8 MiB tmpfs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import unistore as us

SMALL_DISK = "8m"


def _on_small_disk(tmp_path: Any, body: str) -> dict[str, Any]:
    """Run ``body`` (Python, with ``disk`` the small tmpfs's path) in a mount namespace where ``disk`` is an
    8 MiB tmpfs; its last line of output, as JSON."""
    unshare = shutil.which("unshare")
    assert unshare, "these tests need util-linux's unshare (for a small real tmpfs); install util-linux"
    disk = tmp_path / "small-disk"
    disk.mkdir()
    script = tmp_path / "script.py"
    script.write_text(f"import json, os, sys\ndisk = {str(disk)!r}\n" + textwrap.dedent(body))
    done = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c",
         f'mount -t tmpfs -o size={SMALL_DISK} tmpfs "$1" && exec "$2" "$3"', "sh", str(disk), sys.executable,
         str(script)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode} (-7 is SIGBUS):\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_conversion_spilling_onto_a_full_disk_raises_disk_full(tmp_path: Any) -> None:
    src = str(tmp_path / "src")
    data = np.arange(16 << 20 >> 2, dtype=np.float32).reshape(-1, 1024)  # 16 MiB: twice the small disk
    with us.create_store(src, format="npy") as store:
        store.write_array("x", data)
        store.commit()
    dst = str(tmp_path / "dst.zarr")
    result = _on_small_disk(tmp_path, f"""
        import tempfile
        tempfile.tempdir = disk  # the conversion spills here
        import unistore.storage.convert as convert
        from unistore.errors import DiskFullError
        convert.IN_MEMORY_BYTES = 1 << 20  # spill arrays over 1 MiB (the default is 256 MiB)
        try:
            convert.convert({src!r}, {dst!r}, "zarr")
        except DiskFullError as e:
            print(json.dumps({{"error": str(e), "os_error": isinstance(e, OSError), "left": os.listdir(disk)}}))
        else:
            print(json.dumps({{"error": None}}))
    """)
    assert result["error"] is not None, "converting 16 MiB through an 8 MiB spill disk did not fail"
    assert "needs 16,777,216 bytes" in result["error"] and "free space under" in result["error"]
    assert result["os_error"] is True
    assert result["left"] == []  # the spill folder is cleaned up
    assert not os.path.exists(dst)  # no half-written destination
    with us.open_store(src) as store:  # the source is untouched
        np.testing.assert_array_equal(store["x"].read(), data)


def test_preallocated_npy_on_a_full_disk_raises_disk_full_and_keeps_the_store_writable(tmp_path: Any) -> None:
    result = _on_small_disk(tmp_path, """
        import numpy as np
        import unistore as us
        from unistore.errors import DiskFullError
        store = us.create_store(os.path.join(disk, "out"), format="npy")
        small = np.arange(1000, dtype=np.int64)
        store.write_array("small", small)
        try:
            store.create_array("big", (4096, 1024), np.float32)  # 16 MiB
        except DiskFullError as e:
            error = str(e)
        else:
            error = None
        store.commit()
        with us.open_store(os.path.join(disk, "out")) as again:
            kept = again["small"].read().tolist() == small.tolist()
        print(json.dumps({"error": error, "kept": kept}))
    """)
    assert result["error"] is not None, "a 16 MiB array was preallocated on an 8 MiB disk"
    assert "array 'big'" in result["error"] and "needs" in result["error"]
    assert result["kept"] is True


def _epochs_script(url: str, options: dict[str, Any] | None, rows: int) -> str:
    """Two shuffled epochs through a 1 GiB-budget disk cache on the small disk: rows right, cache within it."""
    return f"""
        import numpy as np
        import unistore as us
        from unistore.storage.cache import DiskCache
        cache = DiskCache(os.path.join(disk, "cache"), max_bytes=1 << 30)  # the disk fills long before the budget
        ok = []
        for epoch in range(2):
            with us.open_store({url!r}, storage_options={options!r}, cache=cache) as store:
                arr = store["x"]
                order = np.random.default_rng(epoch).permutation({rows})
                arr.prefetch(np.arange({rows}))  # a read-ahead: as much as fits, no error
                got = np.concatenate([arr.take(order[i:i + 512]) for i in range(0, {rows}, 512)])
                ok.append(bool((got[:, 0] == order).all() and (got[:, 1:] == 0.5).all()))
        print(json.dumps({{"ok": ok, "cached": cache.info()["bytes"]}}))
    """


def _rows(n: int) -> np.ndarray:
    data = np.full((n, 1024), 0.5, dtype=np.float32)
    data[:, 0] = np.arange(n)
    return data


def test_decoded_chunks_on_a_full_disk_still_read_right(tmp_path: Any) -> None:
    src = str(tmp_path / "src.zarr")
    with us.create_store(src, format="zarr") as store:  # 16 MiB decoded, a few KiB stored
        store.write_array("x", _rows(4096), chunks=(256, 1024), compression="zstd")
        store.commit()
    result = _on_small_disk(tmp_path, _epochs_script(src, None, 4096))
    assert result["ok"] == [True, True]
    assert 0 < result["cached"] <= 8 << 20


@pytest.mark.s3
def test_remote_blocks_on_a_full_disk_still_read_right(tmp_path: Any, s3: dict[str, Any]) -> None:
    local = str(tmp_path / "src")
    with us.create_store(local, format="npy") as store:  # 16 MiB, twice the small disk
        store.write_array("x", _rows(4096))
        store.commit()
    s3["fs"].put(local + "/", f"{s3['bucket']}/src", recursive=True)
    result = _on_small_disk(tmp_path, _epochs_script(f"s3://{s3['bucket']}/src", s3["options"], 4096))
    assert result["ok"] == [True, True]
    assert 0 < result["cached"] <= 8 << 20
