"""What only one format has: unsafe pickles, raw memmaps, HDF5 filters, zarr codecs and v2."""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore import errors
from unistore.storage.layout import ChunkedLayout, ContiguousLayout

from ..helpers import Sentinel as _Sentinel


# ---------------------------------------------------------------- pt
def test_pt_malicious_pickle_runs_nothing(tmp_path: Any) -> None:
    import torch

    sentinel = tmp_path / "pwned"
    store_dir = tmp_path / "jasper"
    store_dir.mkdir()
    torch.save(torch.arange(4), store_dir / "ok.pt")
    torch.save({"x": _Sentinel(str(sentinel))}, store_dir / "evil.pt")
    with pytest.raises(errors.UnsafePickleError, match="evil.pt"):
        us.open_store(store_dir)
    assert not sentinel.exists()


def test_pt_plain_pickle_file_is_refused(tmp_path: Any) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    with open(path, "wb") as f:
        pickle.dump(_Sentinel(str(sentinel)), f)
    with pytest.raises(errors.UnistoreError):
        us.open_store(path, format="pt")
    assert not sentinel.exists()


def test_pt_jasper_layout_reads_as_byte_layouts(tmp_path: Any) -> None:
    import torch

    d = tmp_path / "dataset"
    d.mkdir()
    q = torch.randn(50, 8)
    torch.save(q, d / "question_embs.pt")
    torch.save(torch.randint(0, 50, (30, 2)), d / "pair_index.pt")
    torch.save([[1, 2], [3], []], d / "pair_keyword_ids.pt")
    torch.save(q[10:20], d / "view.pt")  # a view: storage larger than the tensor
    store = us.open_store(d)
    assert store.format == "pt"
    assert isinstance(store["question_embs"].layout, ContiguousLayout)
    np.testing.assert_array_equal(store["question_embs"].take([3, 49]), q[[3, 49]].numpy())
    np.testing.assert_array_equal(store["view"][...], q[10:20].numpy())
    assert store["pair_keyword_ids"].to_list() == [[1, 2], [3], []]


def test_pt_single_dict_file(tmp_path: Any) -> None:
    import torch

    path = tmp_path / "weights.pt"
    torch.save({"a": torch.ones(3, 2), "b": torch.arange(5), "nested": {"c": torch.zeros(2)}}, path)
    store = us.open_store(path)
    assert store.keys() == ["a", "b", "nested/c"]
    np.testing.assert_array_equal(store["b"][...], np.arange(5))


# ---------------------------------------------------------------- npy / raw memmap
def test_raw_memmap_needs_shape_and_checks_size(tmp_path: Any) -> None:
    d = tmp_path / "clusters"
    d.mkdir()
    base = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    mm = np.memmap(d / "base_embeddings.npy", dtype=np.float32, mode="w+", shape=base.shape)
    mm[:] = base
    mm.flush()
    with pytest.raises(errors.FormatError, match="raw="):
        us.open_store(d, format="npy")
    store = us.open_store(d, format="npy", raw={"base_embeddings": ((-1, 16), "float32")})
    np.testing.assert_array_equal(store["base_embeddings"].take([99, 0]), base[[99, 0]])
    with pytest.raises(errors.ShapeMismatchError):
        us.open_store(d, format="npy", raw={"base_embeddings": ((7, 16), "float32")})
    with pytest.raises(errors.TruncatedDataError):
        us.open_store(d, format="npy", raw={"base_embeddings": ((200, 16), "float32")})


def test_npy_object_array_is_refused(tmp_path: Any) -> None:
    d = tmp_path / "s"
    d.mkdir()
    np.save(d / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(errors.UnsafePickleError):
        us.open_store(d)


def test_npy_fortran_order_reads_correctly(tmp_path: Any) -> None:
    d = tmp_path / "s"
    d.mkdir()
    data = np.asfortranarray(np.arange(24.0).reshape(6, 4))
    np.save(d / "f.npy", data)
    np.testing.assert_array_equal(us.open_store(d)["f"].take([5, 1]), data[[5, 1]])


# ---------------------------------------------------------------- hdf5
@pytest.mark.parametrize("compression", ["gzip", "lzf", None])
def test_hdf5_chunked_and_filtered(tmp_path: Any, compression: str | None) -> None:
    import h5py

    path = tmp_path / "d.h5"
    data = np.random.default_rng(1).standard_normal((300, 5)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("grp/emb", data=data, chunks=(16, 5), compression=compression)
        f["grp/emb"].attrs["kind"] = "question"
    store = us.open_store(path)
    arr = store["grp/emb"]
    assert isinstance(arr.layout, ChunkedLayout)
    assert arr.chunks == (16, 5) and arr.compression == compression
    assert arr.attrs == {"kind": "question"}
    np.testing.assert_array_equal(arr.take([299, 0, 17, 17]), data[[299, 0, 17, 17]])
    before = store.io_stats()["chunks_decoded"]
    arr.take([1, 2, 3, 20])  # chunks 0 and 1, both cached now
    assert store.io_stats()["chunks_decoded"] == before


def test_hdf5_writes_compressed_through_unistore(tmp_path: Any) -> None:
    import h5py

    data = np.tile(np.arange(64, dtype=np.float32), (200, 1))
    with us.create_store(tmp_path / "c.h5", format="hdf5") as store:
        store.write_array("emb", data, chunks=(50, 64), compression="gzip")
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["emb"].compression == "gzip" and f["emb"].chunks == (50, 64)
    assert os.path.getsize(tmp_path / "c.h5") < data.nbytes / 4


def test_unsupported_compression_names_the_alternatives(tmp_path: Any) -> None:
    store = us.create_store(tmp_path / "x", format="npy")
    with pytest.raises(errors.UnsupportedError, match="zarr"):
        store.write_array("a", np.ones(3), compression="zstd")
    store.abort()


# ---------------------------------------------------------------- zarr
@pytest.mark.parametrize("compression,shards", [("zstd", None), ("gzip", 4), (None, 2), ("blosc", None)])
def test_zarr_codecs_and_sharding(tmp_path: Any, compression: str | None, shards: int | None) -> None:
    import zarr

    data = np.random.default_rng(2).standard_normal((500, 12)).astype(np.float32)
    url = tmp_path / "e.zarr"
    with us.create_store(url, format="zarr", shards=shards) as store:
        store.write_array("emb", data, chunks=(32, 12), compression=compression)
    z = zarr.open_group(url, mode="r")["emb"]
    assert z.chunks == (32, 12)
    if shards:
        assert z.shards == (32 * shards, 12)
    np.testing.assert_array_equal(z[...], data)
    arr = us.open_store(url)["emb"]
    assert (arr.compression or "").startswith(compression or "") if compression else arr.compression is None
    np.testing.assert_array_equal(arr.take([499, 3, 3, 250]), data[[499, 3, 3, 250]])


def test_zarr_v2_store_is_readable(tmp_path: Any) -> None:
    import zarr

    data = np.arange(60, dtype=np.int32).reshape(20, 3)
    g = zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    a = g.create_array("ids", shape=data.shape, dtype=data.dtype, chunks=(4, 3))
    a[...] = data
    store = us.open_store(tmp_path / "v2.zarr")
    assert store.format == "zarr"
    np.testing.assert_array_equal(store["ids"].take([19, 0]), data[[19, 0]])


def test_zarr_chunks_read_once_per_take(tmp_path: Any) -> None:
    from unistore.storage.cache import chunk_cache

    data = np.arange(1000, dtype=np.float64).reshape(250, 4)
    with us.create_store(tmp_path / "z.zarr", format="zarr") as store:
        store.write_array("x", data, chunks=(10, 4), compression="zstd")
    chunk_cache.clear()
    store = us.open_store(tmp_path / "z.zarr")
    idx = np.array([0, 1, 2, 9, 10, 11, 249, 248, 0])
    np.testing.assert_array_equal(store["x"].take(idx), data[idx])
    assert store.io_stats()["chunks_decoded"] == 3  # chunks 0, 1 and 24, each once


def test_zarr_corrupt_chunk_is_a_typed_error(tmp_path: Any) -> None:
    data = np.arange(100, dtype=np.float32).reshape(25, 4)
    with us.create_store(tmp_path / "z.zarr", format="zarr") as store:
        store.write_array("x", data, chunks=(5, 4), compression="zstd")
    chunk = tmp_path / "z.zarr" / "x" / "c" / "0" / "0"
    chunk.write_bytes(b"garbage" * 3)
    with pytest.raises(errors.CorruptDataError):
        us.open_store(tmp_path / "z.zarr")["x"].take([0])


# ---------------------------------------------------------------- detection
def test_format_sniffing_prefers_magic_bytes(tmp_path: Any) -> None:
    import h5py

    with h5py.File(tmp_path / "misnamed.npy", "w") as f:
        f["a"] = np.arange(3)
    assert us.open_store(tmp_path / "misnamed.npy").format == "hdf5"
    (tmp_path / "junk.bin").write_bytes(b"not a tensor file at all")
    with pytest.raises(errors.UnknownFormatError):
        us.open_store(tmp_path / "junk.bin")
    with pytest.raises(errors.UnknownFormatError):
        us.create_store(tmp_path / "x", format="parquet")


def test_file_urls_and_paths_name_the_same_store(tmp_path: Any) -> None:
    data = np.arange(12, dtype=np.float32).reshape(4, 3)
    with us.create_store(f"file://{tmp_path}/a.safetensors", format="safetensors") as store:
        store.write_array("x", data)
    for url in (f"file://{tmp_path}/a.safetensors", tmp_path / "a.safetensors", str(tmp_path / "a.safetensors")):
        store = us.open_store(url)
        assert store.location.is_local
        np.testing.assert_array_equal(store["x"].take([3, 0]), data[[3, 0]])


def test_a_store_never_committed_warns_and_leaves_nothing(tmp_path: Any) -> None:
    import gc

    store = us.create_store(tmp_path / "x", format="npy")
    store.write_array("a", np.ones(3))
    with pytest.warns(ResourceWarning, match="never committed"):
        del store
        gc.collect()
    assert os.listdir(tmp_path) == []


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's descriptors (Linux)")
def test_mapped_files_hold_one_descriptor_each_and_a_bounded_number(tmp_path: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A file's arrays share one mapping (one descriptor), and a process maps at most MAX_MAPPED_FILES files:
    reading thousands of checkpoints never runs out of file descriptors."""
    from safetensors.numpy import save_file

    from unistore.storage import budget

    tensors = {f"layer{i}.weight": np.full((4, 8), i, np.float32) for i in range(30)}
    save_file(tensors, str(tmp_path / "ckpt.safetensors"))
    before = _open_fds()
    store = us.open_store(str(tmp_path / "ckpt.safetensors"))
    for key, value in tensors.items():
        np.testing.assert_array_equal(store[key].take([1, 3]), value[[1, 3]])
    assert _open_fds() - before <= 1
    monkeypatch.setattr(budget, "MAX_MAPPED_FILES", 8)
    for i in range(40):
        np.save(tmp_path / f"a{i}.npy", np.full((5, 3), i, np.int64))
    before = _open_fds()
    for _ in range(2):
        for i in range(40):
            assert us.open_store(str(tmp_path / f"a{i}.npy"))[f"a{i}"].take([4])[0, 0] == i
    assert _open_fds() - before <= 8


@pytest.mark.parametrize("arrays, attrs", [
    ({"emb": (2000, 384)}, {}),
    ({"a": (3,), "b/c": (17, 5), "s": ()}, {"note": 'é\n"quoted"'}),
    ({"w": (123457, 7), "ids": (9,)}, {"k": "v" * 100, "n": 7}),
])
def test_safetensors_written_by_unistore_start_their_data_at_64_bytes(tmp_path: Any, arrays: dict[str, Any],
                                                                       attrs: dict[str, Any]) -> None:
    """The data of a file unistore writes starts at a multiple of 64 bytes, whatever its names, shapes and
    metadata; safetensors itself reads the file back, tensors and metadata alike."""
    from safetensors import safe_open

    rng = np.random.default_rng(1)
    data = {k: rng.standard_normal(shape).astype(np.float32 if k != "ids" else np.int64) for k, shape in
            arrays.items()}
    path = str(tmp_path / "x.safetensors")
    with us.create_store(path, format="safetensors") as store:
        for key, value in data.items():
            store.write_array(key, value)
        store.attrs.update(attrs)
    with open(path, "rb") as f:
        assert (8 + int.from_bytes(f.read(8), "little")) % 64 == 0
    store = us.open_store(path)
    assert dict(store.attrs) == attrs
    with safe_open(path, "np") as f:
        for key, value in data.items():
            np.testing.assert_array_equal(f.get_tensor(key), value)
            np.testing.assert_array_equal(store[key][...], value)
            assert store[key].shape == value.shape
