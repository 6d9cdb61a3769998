"""Crafted and foreign files: right bytes or one typed error, never garbage.

Sections: .pt zip records (offsets, methods, sizes from the zip's own
headers) - npy headers (versions, negative dimensions, unterminated) -
safetensors headers (dimensions, overlaps, duplicate keys, metadata type).
"""

from __future__ import annotations

import zipfile
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore import errors
from unistore.storage.layout import ContiguousLayout, InMemoryLayout

from .crafted import float_rows, npy_bytes, rezip, safetensors_bytes, write


# ---------------------------------------------------------------- .pt zip records
def _checkpoint(tmp_path: Any) -> tuple[str, dict[str, Any]]:
    import torch

    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.randn(5, 7),
               "c": torch.arange(9, dtype=torch.int64), "nested": {"d": torch.randn(2, 3)}}
    path = tmp_path / "ckpt.pt"
    torch.save(tensors, path)
    return str(path), tensors


def _assert_reads_like_torch(path: Any, tensors: dict[str, Any]) -> us.TensorStore:
    import torch

    loaded = torch.load(path, weights_only=True)  # the ground truth: torch reads the file right
    store = us.open_store(path, format="pt")
    for key, want in (("a", loaded["a"]), ("b", loaded["b"]), ("c", loaded["c"]), ("nested/d", loaded["nested"]["d"])):
        np.testing.assert_array_equal(store[key][...], want.numpy())
    np.testing.assert_array_equal(store["b"][...], tensors["b"].numpy())
    return store


def test_pt_rezipped_stored_reads_every_tensor_right(tmp_path: Any) -> None:
    src, tensors = _checkpoint(tmp_path)
    dest = tmp_path / "rezipped.pt"
    rezip(src, dest, zipfile.ZIP_STORED)
    store = _assert_reads_like_torch(dest, tensors)
    # stored records are still read in place, at the offsets the zip's headers give
    assert isinstance(store["b"].layout, ContiguousLayout)
    np.testing.assert_array_equal(store["b"].take([4, 0]), tensors["b"].numpy()[[4, 0]])


def test_pt_deflated_records_are_decompressed_not_served_raw(tmp_path: Any) -> None:
    src, tensors = _checkpoint(tmp_path)
    dest = tmp_path / "deflated.pt"
    rezip(src, dest, zipfile.ZIP_DEFLATED)
    store = _assert_reads_like_torch(dest, tensors)
    assert isinstance(store["b"].layout, InMemoryLayout)


def test_pt_storage_larger_than_its_record_is_refused(tmp_path: Any) -> None:
    src, _ = _checkpoint(tmp_path)
    dest = tmp_path / "short.pt"
    with zipfile.ZipFile(src) as z:
        b_record = next(i.filename for i in z.infolist() if i.filename.endswith("data/1"))
    rezip(src, dest, replace={b_record[-7:]: b"\x00" * 16})  # tensor b claims 140 bytes, its record holds 16
    with pytest.raises(errors.CorruptDataError, match="claims 140 bytes"):
        us.open_store(dest, format="pt")


def test_pt_torch_written_file_keeps_its_offsets(tmp_path: Any) -> None:
    src, tensors = _checkpoint(tmp_path)
    store = _assert_reads_like_torch(src, tensors)
    assert all(isinstance(store[k].layout, ContiguousLayout) for k in ("a", "b", "c", "nested/d"))


def test_pt_view_and_shared_storage(tmp_path: Any) -> None:
    import torch

    base = torch.randn(10, 4)
    path = tmp_path / "views.pt"
    torch.save({"whole": base, "tail": base[6:], "col": base[:, 1]}, path)
    rezip(path, tmp_path / "views2.pt")
    for p in (path, tmp_path / "views2.pt"):
        store = us.open_store(p, format="pt")
        np.testing.assert_array_equal(store["tail"][...], base[6:].numpy())
        np.testing.assert_array_equal(store["col"][...], base[:, 1].numpy())
        np.testing.assert_array_equal(store["whole"].take([9, 2]), base[[9, 2]].numpy())


# ---------------------------------------------------------------- npy headers
def test_npy_version_3_written_by_numpy_reads(tmp_path: Any) -> None:
    data = float_rows(20, 3)
    path = tmp_path / "v3.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array(f, data, version=(3, 0))
    np.testing.assert_array_equal(us.open_store(path)["v3"].take([19, 0]), data[[19, 0]])


@pytest.mark.parametrize("version", [(4, 0), (1, 1), (0, 0), (255, 255)])
def test_npy_unknown_version_is_corrupt(tmp_path: Any, version: tuple[int, int]) -> None:
    raw = bytearray(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", b"\x00" * 8))
    raw[6:8] = bytes(version)
    path = write(tmp_path / "v.npy", bytes(raw))
    with pytest.raises(errors.CorruptDataError, match="version"):
        us.open_store(path)


@pytest.mark.parametrize("header, match", [
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (-6, 4), }", "non-negative"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (2.5,), }", "non-negative"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (10000000000000000000000000, 4), }",
     "larger than any array"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,", "dict literal"),
    ("{'descr': 'zz9', 'fortran_order': False, 'shape': (2,), }", "not a numpy dtype"),
    ("{'descr': '<f4', 'shape': (2,), }", "must be a dict"),
    ("{'descr': '<f4', 'fortran_order': 'no', 'shape': (2,), }", "fortran_order"),
    ("__import__('os').system('true')", "dict literal"),
])
def test_npy_bad_header_is_corrupt(tmp_path: Any, header: str, match: str) -> None:
    path = write(tmp_path / "bad.npy", npy_bytes(header, b"\x00" * 64))
    with pytest.raises(errors.CorruptDataError, match=match):
        us.open_store(path)


def test_npy_header_longer_than_the_file_is_truncated(tmp_path: Any) -> None:
    raw = npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }")
    path = write(tmp_path / "cut.npy", raw[:40])
    with pytest.raises(errors.TruncatedDataError):
        us.open_store(path)


def test_npy_long_header_is_read_whole(tmp_path: Any) -> None:
    """A header past the first read (a structured dtype with many fields) is fetched to its end."""
    dtype = np.dtype([(f"f{i}", "<f4") for i in range(400)])
    data = np.zeros(3, dtype)
    data["f399"] = [1, 2, 3]
    path = tmp_path / "wide.npy"
    np.save(path, data)
    arr = us.open_store(path)["wide"]
    assert arr.dtype == dtype and arr.shape == (3,)
    np.testing.assert_array_equal(arr[...]["f399"], [1, 2, 3])


# ---------------------------------------------------------------- safetensors headers
def _st(tmp_path: Any, header: dict[str, Any] | str, nbytes: int = 64) -> str:
    return write(tmp_path / "x.safetensors", safetensors_bytes(header, b"\x00" * nbytes))


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "F32", "shape": [-6, 4], "data_offsets": [0, 0]}, "non-negative"),
    ({"dtype": "F32", "shape": [2, True], "data_offsets": [0, 8]}, "non-negative"),
    ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "not a list"),
    ({"dtype": 5, "shape": [2], "data_offsets": [0, 8]}, "dtype 5"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}, "needs 8"),
    ({"dtype": "F32", "shape": [10**20, 10**20], "data_offsets": [0, 0]}, "larger than any array"),
    ([1, 2], "not an object"),
])
def test_safetensors_bad_entry_is_corrupt(tmp_path: Any, entry: Any, match: str) -> None:
    with pytest.raises(errors.CorruptDataError, match=match):
        us.open_store(_st(tmp_path, {"t": entry}), format="safetensors")


def test_safetensors_overlapping_tensors_are_refused(tmp_path: Any) -> None:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    with pytest.raises(errors.CorruptDataError, match="share bytes"):
        us.open_store(_st(tmp_path, header), format="safetensors")


def test_safetensors_duplicate_key_is_refused(tmp_path: Any) -> None:
    text = ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
            '"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}')
    with pytest.raises(errors.CorruptDataError, match="twice"):
        us.open_store(_st(tmp_path, text), format="safetensors")


@pytest.mark.parametrize("meta", [[1, 2], "text", {"k": 5}])
def test_safetensors_metadata_of_wrong_type_is_corrupt(tmp_path: Any, meta: Any) -> None:
    header = {"__metadata__": meta, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    with pytest.raises(errors.CorruptDataError, match="__metadata__"):
        us.open_store(_st(tmp_path, header), format="safetensors")


def test_safetensors_deeply_nested_header_is_corrupt(tmp_path: Any) -> None:
    with pytest.raises(errors.CorruptDataError, match="not valid JSON"):
        us.open_store(_st(tmp_path, "[" * 100_000 + "]" * 100_000), format="safetensors")


def test_safetensors_valid_file_still_reads(tmp_path: Any) -> None:
    from safetensors.numpy import save_file

    a, b = float_rows(6, 3), np.arange(10, dtype=np.int64)
    path = tmp_path / "ok.safetensors"
    save_file({"a": a, "b": b}, str(path), metadata={"note": "x"})
    store = us.open_store(path)
    np.testing.assert_array_equal(store["a"].take([5, 1]), a[[5, 1]])
    np.testing.assert_array_equal(store["b"][...], b)
    assert store.attrs["note"] == "x"
