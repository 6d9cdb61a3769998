"""Crafted HDF5 files never hang the reader and always end in a typed error.

A crafted file can make libhdf5 spin forever while holding the GIL; unistore
first opens a local file in a helper process with a deadline. The fuzz test
changes bytes in the superblock and root-group region (the first KiB) of a
file unistore wrote and compares with h5py's own reading, made in a helper
process of the test's with the same kind of deadline.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given

import unistore as us
from unistore import errors
from unistore.errors import UnistoreError

from .test_header_fuzz import FUZZ, apply, mutation


def _base(path: Any) -> dict[str, Any]:
    arrays = {"emb": np.arange(64 * 8, dtype=np.float32).reshape(64, 8),
              "grp/chunked": np.arange(100, dtype=np.int64)}
    with us.create_store(path, format="hdf5", overwrite=True) as store:
        store.write_array("emb", arrays["emb"])
        store.write_array("grp/chunked", arrays["grp/chunked"], chunks=(10,), compression="gzip")
        store.write_array("kw", [[1, 2], [3], [4, 5, 6]])
    return arrays


def _last_heap_object_size_field(raw: bytes) -> int:
    """Offset of the size of the last object in the file's global heap (before its free space)."""
    at = raw.index(b"GCOL") + 16
    last = -1
    while True:
        index, = struct.unpack_from("<H", raw, at)
        size, = struct.unpack_from("<Q", raw, at + 8)
        if index == 0:
            return last
        last = at + 8
        at += 16 + -(-size // 8) * 8


@pytest.mark.timeout(120)
def test_a_file_that_hangs_libhdf5_is_a_corrupt_data_error(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISTORE_HDF5_PROBE_TIMEOUT", "5")
    path = tmp_path / "spin.h5"
    _base(path)
    raw = bytearray(path.read_bytes())
    at = _last_heap_object_size_field(bytes(raw))
    raw[at] -= 2  # an object 2 bytes shorter than it is: libhdf5 then walks the heap forever
    path.write_bytes(bytes(raw))
    code = f"import h5py\nf = h5py.File({str(path)!r}, 'r')\nf['kw'][...]\n"
    with pytest.raises(subprocess.TimeoutExpired):  # h5py itself never returns
        subprocess.run([sys.executable, "-c", code], timeout=10, capture_output=True)
    start = time.monotonic()
    with pytest.raises(errors.CorruptDataError, match="did not finish opening it within 5s"):
        us.open_store(path)
    assert time.monotonic() - start < 30
    arrays = _base(tmp_path / "ok.h5")  # and the next file opens as usual (a new helper process)
    np.testing.assert_array_equal(us.open_store(tmp_path / "ok.h5")["emb"].take([63]), arrays["emb"][[63]])


def test_a_file_is_probed_once(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from unistore.storage.formats import _hdf5_probe

    asked: list[str] = []
    real = _hdf5_probe._ask
    monkeypatch.setattr(_hdf5_probe, "_ask", lambda p: asked.append(p) or real(p))
    path = tmp_path / "once.h5"
    _base(path)
    for _ in range(3):
        assert us.open_store(path)["emb"].shape == (64, 8)
    assert asked == [{"path": str(path)}]


@pytest.mark.parametrize("damage", ["superblock", "signature", "truncated", "zeros"])
def test_damaged_files_are_typed_errors(tmp_path: Any, damage: str) -> None:
    path = tmp_path / "d.h5"
    _base(path)
    raw = bytearray(path.read_bytes())
    if damage == "superblock":
        raw[8:40] = b"\xff" * 32
    elif damage == "signature":
        raw[:8] = b"\x89HDF\r\n\x1a\x0b"
    elif damage == "truncated":
        raw = raw[:2000]
    else:
        raw[48:1024] = bytes(1024 - 48)
    path.write_bytes(bytes(raw))
    with pytest.raises(errors.UnistoreError):
        store = us.open_store(path, format="hdf5")
        for key in store.keys():
            store[key][...]


class _Truth:
    """h5py's own reading of a file, in a helper process with a deadline: {key: (dtype, shape, hex bytes)} or None
    (h5py refused, hung or crashed)."""

    CODE = r"""
import json, sys
import numpy as np, h5py
for line in sys.stdin:
    try:
        out = {}
        with h5py.File(json.loads(line), "r") as f:
            items = []
            f.visititems(lambda n, o: items.append((n, o)) if isinstance(o, h5py.Dataset) else None)
            for name, ds in items:
                base = h5py.check_vlen_dtype(ds.dtype)
                if base is not None:
                    rows = [np.asarray(r) for r in ds[...]]
                    values = np.concatenate(rows) if rows else np.empty(0, base)
                    out[name] = ["ragged", str(values.dtype), list(values.shape), values.tobytes().hex(),
                                 [len(r) for r in rows]]
                    continue
                data = np.asarray(ds[...])
                out[name] = [str(data.dtype), list(data.shape), np.ascontiguousarray(data).tobytes().hex()]
        answer = out
    except Exception as e:
        answer = None
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def __call__(self, path: str) -> dict[str, Any] | None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-c", self.CODE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(path).encode() + b"\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return None
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


OUTCOMES: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_outcomes() -> Any:
    yield
    if OUTCOMES:
        print(f"\nhdf5 superblock fuzz: {dict(OUTCOMES)}")


@pytest.fixture(scope="module")
def truth() -> Any:
    t = _Truth()
    yield t
    t.close()


class _Bytes:
    """A file's bytes, held without a repr of them (a falsifying example prints its fixtures)."""

    def __init__(self, raw: bytes):
        self.raw = raw

    def __repr__(self) -> str:
        return f"<{len(self.raw)} bytes>"


@pytest.fixture(scope="module")
def base_h5(tmp_path_factory: pytest.TempPathFactory) -> _Bytes:
    path = tmp_path_factory.mktemp("h5base") / "base.h5"
    _base(path)
    return _Bytes(path.read_bytes())


@pytest.mark.slow
@pytest.mark.timeout(1800)
@FUZZ
@given(edits=mutation(15000, 1024))
def test_hdf5_superblock_region_fuzz(tmp_path: Any, base_h5: Any, truth: Any,
                                     edits: list[tuple[str, int, bytes]]) -> None:
    base_file = base_h5.raw
    os.environ["UNISTORE_HDF5_PROBE_TIMEOUT"] = "10"
    path = str(tmp_path / f"{uuid.uuid4().hex}.h5")
    with open(path, "wb") as f:
        f.write(apply(base_file, edits))
    want = truth(path)
    OUTCOMES["h5py refused, hung or crashed" if want is None else "h5py read it"] += 1
    try:
        store = us.open_store(path, format="hdf5")
        got: dict[str, Any] | None = {}
        for key in store.keys():
            arr = store[key]
            got[key] = arr.to_list() if hasattr(arr, "to_list") else arr[...]
    except UnistoreError:
        got = None
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"unistore raised {type(e).__name__} (not a unistore error): {e}")
    OUTCOMES["unistore refused" if got is None else "unistore read it"] += 1
    if got is None:
        return
    assert want is not None, f"unistore read {sorted(got)} from bytes h5py refuses"
    assert sorted(got) == sorted(k for k in want)
    for key, value in got.items():
        if want[key][0] == "ragged":
            _, dtype, _, hexed, lengths = want[key]
            flat = np.frombuffer(bytes.fromhex(hexed), dtype)
            assert [len(r) for r in value] == lengths
            assert [int(x) for r in value for x in r] == flat.tolist()
            continue
        dtype, shape, hexed = want[key]
        assert value.dtype == np.dtype(dtype) and list(value.shape) == shape, key
        assert np.ascontiguousarray(value).tobytes() == bytes.fromhex(hexed), key


def test_a_type_libhdf5_converts_is_read_through_h5py(tmp_path: Any) -> None:
    """A float type with another exponent bias: h5py reads it as float64 values libhdf5 converts; the raw
    4-byte values must not be served as those float64s."""
    import h5py

    from unistore.storage.layout import ContiguousLayout

    raw = np.arange(24, dtype=np.float32).reshape(6, 4)
    path = tmp_path / "odd.h5"
    odd = h5py.h5t.IEEE_F32LE.copy()
    odd.set_ebias(126)
    with h5py.File(path, "w") as f:
        ds = h5py.h5d.create(f.id, b"odd", odd, h5py.h5s.create_simple(raw.shape))
        ds.write(h5py.h5s.ALL, h5py.h5s.ALL, raw, mtype=odd)
        f.create_dataset("plain", data=raw)
    with h5py.File(path, "r") as f:
        want = f["odd"][...]
    store = us.open_store(path)
    assert store["odd"].dtype == want.dtype == np.float64
    np.testing.assert_array_equal(store["odd"].take([5, 0]), want[[5, 0]])
    np.testing.assert_array_equal(store["odd"].take([1]), 2 * raw[[1]])
    assert isinstance(store["plain"].layout, ContiguousLayout)
    np.testing.assert_array_equal(store["plain"].take([5, 0]), raw[[5, 0]])


@pytest.mark.s3
@pytest.mark.timeout(180)
def test_a_remote_file_that_hangs_libhdf5_is_a_corrupt_data_error(tmp_path: Any, s3: dict[str, Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper reads a remote file through the same ranged reads (its credentials handed off, never pickled)."""
    monkeypatch.setenv("UNISTORE_RETRY_DEADLINE", "5")  # the helper's remote reads end within 5 s: it waits 20
    monkeypatch.setenv("UNISTORE_HDF5_PROBE_TIMEOUT", "5")
    path = tmp_path / "spin.h5"
    arrays = _base(path)
    raw = bytearray(path.read_bytes())
    raw[_last_heap_object_size_field(bytes(raw))] -= 2
    s3["fs"].pipe_file(f"{s3['bucket']}/spin.h5", bytes(raw))
    _base(tmp_path / "ok.h5")
    s3["fs"].put_file(str(tmp_path / "ok.h5"), f"{s3['bucket']}/ok.h5")
    start = time.monotonic()
    with pytest.raises(errors.CorruptDataError, match="did not finish opening it"):
        us.open_store(f"s3://{s3['bucket']}/spin.h5", storage_options=s3["options"])
    assert time.monotonic() - start < 60
    good = us.open_store(f"s3://{s3['bucket']}/ok.h5", storage_options=s3["options"])
    np.testing.assert_array_equal(good["emb"].take([3]), arrays["emb"][[3]])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_probe_helper_does_not_outlive_its_parent(tmp_path: Any) -> None:
    """A helper stuck in libhdf5 never reads the end of its input: it is killed when its parent ends instead."""
    path = tmp_path / "spin.h5"
    _base(path)
    raw = bytearray(path.read_bytes())
    raw[_last_heap_object_size_field(bytes(raw))] -= 2  # libhdf5 walks the heap forever
    path.write_bytes(bytes(raw))
    script = ("import json, os, sys, time\nfrom unistore.storage.formats import _hdf5_probe\n"
              "h = _hdf5_probe._helper()\nprint(h.pid, flush=True)\n"
              f"h.stdin.write(json.dumps({{'path': {str(path)!r}}}).encode() + b'\\n'); h.stdin.flush()\n"
              "time.sleep(3)\nos._exit(0)\n")  # the parent ends while its helper spins in libhdf5
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pid = int(parent.stdout.split()[0])

    def alive() -> bool:
        try:
            return "Z" not in open(f"/proc/{pid}/stat").read().split()[2]
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive():
        os.kill(pid, 9)
        pytest.fail("the probe helper outlived its parent")
