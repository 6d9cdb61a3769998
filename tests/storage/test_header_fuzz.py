"""Fuzzed headers: every parser gives the format's own library's answer, or one ``unistore.errors`` exception.

One test per header parser (npy, safetensors, the .pt zip directory): bytes
of a valid file's header region are overwritten, inserted or cut, and the
file is opened and read whole. A result must equal what numpy, safetensors or
torch read from the same bytes; where that library refuses the file, unistore
must raise a ``UnistoreError`` - never another exception. A few hundred
examples each in every run, a few thousand with ``-m slow``. zarr metadata
and the HDF5 superblock region are fuzzed in their own modules.
"""

from __future__ import annotations

import io
import uuid
import zipfile
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unistore as us
from unistore.errors import UnistoreError

from ..helpers import fuzz_examples
from .crafted import float_rows

FUZZ = settings(max_examples=fuzz_examples(), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def mutation(draw: Any, size: int, region: int) -> list[tuple[str, int, bytes]]:
    """Up to 4 edits inside the first ``region`` bytes of a ``size``-byte file: overwrite, insert or cut."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "set", "insert", "cut"]))
        at = draw(st.integers(0, min(size, region) - 1))
        if kind == "cut":
            edits.append((kind, at, b"\x00" * draw(st.integers(1, 16))))
        else:
            interesting = st.sampled_from([b"\x00", b"\xff", b"-", b"9", b"{", b"}", b",", b"\"", b"'", b"(", b"[",
                                           b"]", b"1", b"0", b"e", b"\n"])
            edits.append((kind, at, draw(st.one_of(st.binary(min_size=1, max_size=8), interesting))))
    return edits


def apply(raw: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(raw)
    for kind, at, blob in edits:
        at = min(at, len(out))
        if kind == "set":
            out[at:at + len(blob)] = blob
        elif kind == "insert":
            out[at:at] = blob
        else:
            del out[at:at + len(blob)]
    return bytes(out)


def read_all(path: str, fmt: str) -> dict[str, np.ndarray]:
    store = us.open_store(path, format=fmt)
    name = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return {("x" if key == name else key): store[key][...] for key in store.keys()}


def check(path: str, fmt: str, truth: Any) -> None:
    """unistore's reading of ``path`` against ``truth()`` (the format library's, or raises if it refuses)."""
    try:
        got: dict[str, np.ndarray] | None = read_all(path, fmt)
    except UnistoreError:
        got = None
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"unistore raised {type(e).__name__} (not a unistore error): {e}")
    try:
        want = truth()
    except Exception:  # noqa: BLE001 - the library refuses the bytes: unistore must refuse them too
        want = None
    OUTCOMES[fmt]["refused" if got is None else "read"] += 1
    if got is None:
        OUTCOMES[fmt]["refused, the library read it"] += want is not None
        return  # a typed refusal is always allowed: unistore may be stricter than the library
    assert want is not None, f"unistore read {sorted(got)} from bytes the format's library refuses"
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key].view(np.uint8), np.ascontiguousarray(want[key]).view(np.uint8))


OUTCOMES: dict[str, Counter[str]] = defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def report_outcomes() -> Any:
    """Print how many fuzzed files were read right and how many refused with a unistore error (``-s`` shows it)."""
    yield
    for fmt, counts in sorted(OUTCOMES.items()):
        print(f"\n{fmt} header fuzz: {counts['read']} read equal to the library's answer, "
              f"{counts['refused']} refused with a unistore error "
              f"({counts['refused, the library read it']} of them read by the library)")

NPY = io.BytesIO()
np.save(NPY, float_rows(6, 4))


@pytest.mark.slow
@FUZZ
@given(mutation(len(NPY.getvalue()), 128))
def test_npy_header_fuzz(tmp_path: Any, edits: list[tuple[str, int, bytes]]) -> None:
    path = str(tmp_path / f"{uuid.uuid4().hex}.npy")  # a new file each example: no mapping reused
    with open(path, "wb") as f:
        f.write(apply(NPY.getvalue(), edits))

    def truth() -> dict[str, np.ndarray]:
        arr = np.load(path, allow_pickle=False)
        if arr.dtype.kind not in "biufcV":
            raise ValueError("not a tensor dtype")
        return {"x": arr}

    check(path, "npy", truth)


def _safetensors_file() -> bytes:
    from safetensors.numpy import save

    return save({"a": float_rows(3, 4), "b": np.arange(6, dtype=np.int32)}, metadata={"k": "v"})


SAFETENSORS = _safetensors_file()


@pytest.mark.slow
@FUZZ
@given(mutation(len(SAFETENSORS), int.from_bytes(SAFETENSORS[:8], "little") + 8))
def test_safetensors_header_fuzz(tmp_path: Any, edits: list[tuple[str, int, bytes]]) -> None:
    from safetensors.numpy import load_file

    path = str(tmp_path / f"{uuid.uuid4().hex}.safetensors")  # a new file each example: no mapping reused
    with open(path, "wb") as f:
        f.write(apply(SAFETENSORS, edits))
    check(path, "safetensors", lambda: load_file(path))


def _pt_file() -> tuple[bytes, int]:
    import torch

    buf = io.BytesIO()
    torch.save({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.arange(5)}, buf)
    raw = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        data_start = min(i.header_offset for i in z.infolist() if "/data/" in i.filename)
    return raw, data_start


PT, PT_DATA = _pt_file()


@pytest.mark.slow
@FUZZ
@given(st.one_of(mutation(len(PT), PT_DATA),  # the pickle record and the headers before the data
                 st.builds(lambda e: [(k, len(PT) - 1 - at % 300, b) for k, at, b in e],
                           mutation(len(PT), len(PT)))))  # the central directory at the end
def test_pt_zip_directory_fuzz(tmp_path: Any, edits: list[tuple[str, int, bytes]]) -> None:
    import torch

    path = str(tmp_path / f"{uuid.uuid4().hex}.pt")  # a new file each example: no mapping reused
    with open(path, "wb") as f:
        f.write(apply(PT, edits))

    def truth() -> dict[str, np.ndarray]:
        obj = torch.load(path, weights_only=True)
        return {k: v.numpy() for k, v in obj.items()}

    check(path, "pt", truth)


def _zarr_store(root: Any) -> tuple[str, bytes]:
    path = str(root / "base.zarr")
    with us.create_store(path, format="zarr", overwrite=True) as store:
        store.write_array("emb", float_rows(12, 4), chunks=(5, 4), compression="zstd")
    with open(f"{path}/emb/zarr.json", "rb") as f:
        return path, f.read()


@pytest.fixture(scope="module")
def zarr_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    return _zarr_store(tmp_path_factory.mktemp("zarrfuzz"))


@pytest.mark.slow
@FUZZ
@given(edits=mutation(600, 600))
def test_zarr_metadata_fuzz(tmp_path: Any, zarr_base: tuple[str, bytes], edits: list[tuple[str, int, bytes]]) -> None:
    """zarr.json of an array unistore wrote, fuzzed: zarr-python's reading of the same bytes, or a unistore error."""
    import shutil

    import zarr

    base, meta = zarr_base
    path = str(tmp_path / f"{uuid.uuid4().hex}.zarr")
    shutil.copytree(base, path)
    with open(f"{path}/emb/zarr.json", "wb") as f:
        f.write(apply(meta, edits))
    try:
        got = read_all(path, "zarr")
    except UnistoreError:
        OUTCOMES["zarr"]["refused"] += 1
        return
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"unistore raised {type(e).__name__} (not a unistore error): {e}")
    OUTCOMES["zarr"]["read"] += 1
    group = zarr.open_group(path, mode="r")  # only now: unistore found a sane shape, so reading it whole is safe
    want = {key: np.asarray(arr[...]) for key, arr in group.arrays()}
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key], want[key])
