"""Crafted and foreign files: right bytes or one typed error, never garbage.

Sections: .pt zip records (offsets, methods, sizes from the zip's own
headers) - npy headers (versions, negative dimensions, unterminated) -
safetensors headers (dimensions, overlaps, duplicate keys, metadata type) -
links and special files (links out of a store, FIFOs, missing, replaced and
bit-flipped zarr chunks, zarr metadata) - HDF5 data outside the file
(external storage, virtual datasets).
"""

from __future__ import annotations

import os
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


# ---------------------------------------------------------------- links and special files
def _npy_dir(tmp_path: Any) -> tuple[Any, np.ndarray]:
    d = tmp_path / "store"
    with us.create_store(d, format="npy") as store:
        store.write_array("emb", float_rows(8, 4))
    return d, float_rows(8, 4)


def test_npy_member_linking_out_of_the_store_is_refused(tmp_path: Any) -> None:
    d, _ = _npy_dir(tmp_path)
    outside = tmp_path / "secret.npy"
    np.save(outside, np.arange(4))
    (d / "leak.npy").symlink_to(outside)
    with pytest.raises(errors.InvalidKeyError, match="outside the store"):
        us.open_store(d)


def test_npy_member_linking_inside_the_store_reads(tmp_path: Any) -> None:
    d, data = _npy_dir(tmp_path)
    (d / "alias.npy").symlink_to(d / "emb.npy")
    np.testing.assert_array_equal(us.open_store(d)["alias"].take([7, 1]), data[[7, 1]])


@pytest.mark.timeout(60)
def test_fifo_member_is_refused_not_opened(tmp_path: Any) -> None:
    d, _ = _npy_dir(tmp_path)
    os.mkfifo(d / "pipe.npy")
    with pytest.raises(errors.FormatError, match="not a regular file"):
        us.open_store(d)


def _zarr_store(tmp_path: Any, compression: str | None = "zstd", shards: int | None = None) -> tuple[Any, np.ndarray]:
    d = tmp_path / "run.zarr"
    data = float_rows(40, 4)
    with us.create_store(d, format="zarr", **({"shards": shards} if shards else {})) as store:
        store.write_array("emb", data, chunks=(10, 4), compression=compression)
    return d, data


def test_zarr_chunk_linking_out_of_the_store_is_refused(tmp_path: Any) -> None:
    d, _ = _zarr_store(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.write_bytes((d / "emb" / "c" / "1" / "0").read_bytes())
    (d / "emb" / "c" / "1" / "0").unlink()
    (d / "emb" / "c" / "1" / "0").symlink_to(outside)
    with pytest.raises(errors.InvalidKeyError, match="outside the store"):
        us.open_store(d)["emb"].take([15])


@pytest.mark.timeout(60)
def test_zarr_fifo_chunk_is_refused_not_opened(tmp_path: Any) -> None:
    d, _ = _zarr_store(tmp_path)
    (d / "emb" / "c" / "2" / "0").unlink()
    os.mkfifo(d / "emb" / "c" / "2" / "0")
    with pytest.raises(errors.CorruptDataError, match="not a regular file"):
        us.open_store(d)["emb"].take([25])


@pytest.mark.parametrize("shards", [None, 2])
def test_zarr_missing_chunk_of_a_unistore_store_is_an_error(tmp_path: Any, shards: int | None) -> None:
    d, data = _zarr_store(tmp_path, shards=shards)
    chunk = d / "emb" / "c" / "1" / "0"
    chunk.unlink()
    store = us.open_store(d)
    np.testing.assert_array_equal(store["emb"].take([0, 39]) if shards is None else store["emb"].take([0]),
                                  data[[0, 39]] if shards is None else data[[0]])
    with pytest.raises(errors.CorruptDataError, match="missing"):
        store["emb"].take([25 if shards else 15])


def test_zarr_chunk_replaced_by_a_directory_is_an_error(tmp_path: Any) -> None:
    d, _ = _zarr_store(tmp_path)
    (d / "emb" / "c" / "1" / "0").unlink()
    (d / "emb" / "c" / "1" / "0").mkdir()
    with pytest.raises(errors.CorruptDataError, match="a directory"):
        us.open_store(d)["emb"].take([15])


def test_zarr_all_zero_chunks_are_stored_and_read(tmp_path: Any) -> None:
    d = tmp_path / "zeros.zarr"
    with us.create_store(d, format="zarr") as store:
        store.write_array("z", np.zeros((20, 2), np.float32), chunks=(10, 2))
    assert sorted(os.listdir(d / "z" / "c")) == ["0", "1"]
    np.testing.assert_array_equal(us.open_store(d)["z"][...], np.zeros((20, 2), np.float32))


def test_foreign_zarr_missing_chunk_reads_fill_value(tmp_path: Any) -> None:
    """zarr's own rule for stores unistore did not write: an absent chunk is the fill value."""
    import zarr

    d = tmp_path / "foreign.zarr"
    arr = zarr.create_array(str(d), shape=(20, 2), chunks=(10, 2), dtype="f4", fill_value=0)
    arr[...] = 1
    (d / "c" / "1" / "0").unlink()
    got = us.open_store(d)["foreign"][...]
    np.testing.assert_array_equal(got[:10], 1)
    np.testing.assert_array_equal(got[10:], 0)


@pytest.mark.parametrize("compression", ["zstd", None])
def test_zarr_flipped_bit_in_a_chunk_is_an_error_at_read_time(tmp_path: Any, compression: str | None) -> None:
    d, data = _zarr_store(tmp_path, compression=compression)
    chunk = d / "emb" / "c" / "2" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    store = us.open_store(d)
    np.testing.assert_array_equal(store["emb"].take([3]), data[[3]])
    with pytest.raises(errors.CorruptDataError, match="corrupt"):
        store["emb"].take([25])


def _edit_zarr_json(path: Any, edit: Any) -> None:
    import json

    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_zarr_zero_chunk_dimension_is_corrupt_metadata(tmp_path: Any) -> None:
    d, _ = _zarr_store(tmp_path)
    _edit_zarr_json(d / "emb" / "zarr.json",
                    lambda m: m["chunk_grid"]["configuration"].__setitem__("chunk_shape", [0, 4]))
    with pytest.raises(errors.CorruptDataError):
        us.open_store(d)["emb"][...]


def test_zarr_absurd_shape_is_corrupt_metadata(tmp_path: Any) -> None:
    d, _ = _zarr_store(tmp_path)
    _edit_zarr_json(d / "emb" / "zarr.json", lambda m: m.__setitem__("shape", [10**15, 10**15]))
    with pytest.raises(errors.CorruptDataError, match="larger than any array"):
        us.open_store(d)


def test_zarr_wrong_codec_for_the_bytes_is_an_error(tmp_path: Any) -> None:
    d, _ = _zarr_store(tmp_path)

    def to_gzip(meta: dict[str, Any]) -> None:
        for codec in meta["codecs"]:
            if codec["name"] == "zstd":
                codec["name"], codec["configuration"] = "gzip", {"level": 5}

    _edit_zarr_json(d / "emb" / "zarr.json", to_gzip)
    with pytest.raises(errors.CorruptDataError):
        us.open_store(d)["emb"].take([0])


# ---------------------------------------------------------------- HDF5 data outside the file
def test_hdf5_external_storage_is_refused(tmp_path: Any) -> None:
    import h5py

    outside = tmp_path / "passwd"
    outside.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    path = tmp_path / "ext.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("ok", data=np.arange(4))
        f.create_dataset("leak", shape=(128,), dtype="u1", external=[(str(outside), 0, 128)])
    with pytest.raises(errors.UnsupportedError, match="external file"):
        us.open_store(path)


def test_hdf5_virtual_dataset_is_refused(tmp_path: Any) -> None:
    import h5py

    src = tmp_path / "src.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("x", data=np.arange(10))
    layout = h5py.VirtualLayout(shape=(10,), dtype="i8")
    layout[:] = h5py.VirtualSource(str(src), "x", shape=(10,))
    path = tmp_path / "virtual.h5"
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("v", layout, fillvalue=0)
    with pytest.raises(errors.UnsupportedError, match="virtual dataset"):
        us.open_store(path)


def test_zarr_shard_index_pointing_past_the_end_is_an_error(tmp_path: Any) -> None:
    """A shard index (with a valid checksum) that points a chunk past the end of its shard: an error for every
    row of that chunk, never fill values."""
    import google_crc32c

    d, data = _zarr_store(tmp_path, shards=2)
    shard = d / "emb" / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    index = bytearray(raw[-36:-4])  # 2 chunks x (offset, nbytes), then the index's crc32c
    offset, nbytes = np.frombuffer(bytes(index[16:32]), "<u8")
    index[16:24] = np.array([len(raw) + 64], "<u8").tobytes()  # the second chunk: past the end
    raw[-36:] = bytes(index) + google_crc32c.value(bytes(index)).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    store = us.open_store(d)
    np.testing.assert_array_equal(store["emb"].take([0, 9]), data[[0, 9]])
    for rows in ([10], [10, 11, 12], [19]):
        with pytest.raises(errors.CorruptDataError):
            store["emb"].take(rows)
