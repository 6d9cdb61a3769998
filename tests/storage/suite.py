"""The one shared suite every format x filesystem runs (see test_formats.py).

Hooks (``put_native`` / ``get_native``) write and read with each format's own
library, never through unistore, so round trips cannot hide symmetric bugs.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore import errors
from unistore.storage.layout import ContiguousLayout

from .native import (
    BASE_DTYPES,
    EXTRA_DTYPES,
    HOOKS,
    NATIVE_RAGGED,
    STORE_NAME,
    as_numpy,
    native_read,
    native_write,
    sample,
)


@dataclass
class Where:
    """One filesystem under test: how to name a store there and move files in and out."""

    kind: str
    root: str
    options: dict[str, Any] | None
    tmp: str

    def url(self, name: str) -> str:
        if self.kind == "local":
            return os.path.join(self.root, name)
        return f"{self.root}/{name}"

    @property
    def fs(self) -> Any:
        return us.Location(self.url("x"), self.options).fs

    def remote_path(self, name: str) -> str:
        return us.Location(self.url(name), self.options).path

    def put_native(self, fmt: str, name: str, arrays: dict[str, np.ndarray],
                   ragged: dict[str, list[list[int]]] | None = None) -> str:
        """Write with the format's library, then place it at ``url(name)``; returns the URL."""
        ragged = ragged or {}
        if self.kind == "local":
            native_write(fmt, self.url(name), arrays, ragged)
        else:
            local = os.path.join(self.tmp, "native-" + name)
            native_write(fmt, local, arrays, ragged)
            if os.path.isdir(local):
                self.fs.put(local + "/", self.remote_path(name), recursive=True)
            else:
                self.fs.put_file(local, self.remote_path(name))
        return self.url(name)

    def get_native(self, fmt: str, name: str) -> dict[str, Any]:
        """Read ``url(name)`` with the format's own library."""
        if self.kind == "local":
            return native_read(fmt, self.url(name))
        local = os.path.join(self.tmp, "fetched-" + name)
        self.fs.get(self.remote_path(name), local, recursive=True)
        return native_read(fmt, local)

    def write_bytes(self, name: str, data: bytes) -> str:
        if self.kind == "local":
            with open(self.url(name), "wb") as f:
                f.write(data)
        else:
            self.fs.pipe_file(self.remote_path(name), data)
        return self.url(name)

    def read_bytes(self, name: str) -> bytes:
        if self.kind == "local":
            with open(self.url(name), "rb") as f:
                return f.read()
        return bytes(self.fs.cat_file(self.remote_path(name)))


class StoreSuite:
    """Every format x filesystem runs these; subclasses set ``fmt`` and ``fs_kind``."""

    fmt: str
    fs_kind: str

    @pytest.fixture(autouse=True)
    def _where(self, request: pytest.FixtureRequest, tmp_path: Any) -> None:
        tmp = str(tmp_path)
        if self.fs_kind == "local":
            root = os.path.join(tmp, "data")
            os.makedirs(root)
            self.where = Where("local", root, None, tmp)
        elif self.fs_kind == "memory":
            root = request.getfixturevalue("memory_root")
            self.where = Where("memory", f"memory://{root}", None, tmp)
        else:
            s3 = request.getfixturevalue("s3")
            self.where = Where("s3", f"s3://{s3['bucket']}", s3["options"], tmp)

    # ------------------------------------------------------------ helpers
    @property
    def name(self) -> str:
        return STORE_NAME[self.fmt]

    def create(self, name: str | None = None, **kw: Any) -> us.TensorStore:
        return us.create_store(self.where.url(name or self.name), format=self.fmt,
                               storage_options=self.where.options, **kw)

    def open(self, name: str | None = None, **kw: Any) -> us.TensorStore:
        return us.open_store(self.where.url(name or self.name), storage_options=self.where.options, **kw)

    def write(self, arrays: dict[str, Any], attrs: dict[str, Any] | None = None, name: str | None = None) -> None:
        with self.create(name) as store:
            for key, data in arrays.items():
                store.write_array(key, data)
            store.attrs.update(attrs or {})

    @property
    def dtypes(self) -> list[str]:
        return BASE_DTYPES + EXTRA_DTYPES[self.fmt]

    # ------------------------------------------------------------ round trips
    def test_roundtrip_every_dtype(self) -> None:
        arrays = {f"d_{dt}": sample((11, 3), dt, seed=i) for i, dt in enumerate(self.dtypes)}
        self.write(arrays)
        store = self.open()
        assert store.format == self.fmt
        assert sorted(store.keys()) == sorted(arrays)
        for key, expected in arrays.items():
            arr = store[key]
            assert arr.dtype == expected.dtype, key
            assert arr.shape == expected.shape
            got = arr[...]
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8), err_msg=key)

    def test_shapes_zero_length_0d_1d_3d(self) -> None:
        arrays = {
            "scalar": np.array(3.25, np.float32),  # stays 0-d: not a 1-element array
            "empty": np.zeros((0, 4), np.float32),
            "one_d": np.arange(17, dtype=np.int64),
            "three_d": sample((6, 2, 5), "float32"),
            "single_row": sample((1, 8), "float64"),
        }
        self.write(arrays)
        store = self.open()
        for key, expected in arrays.items():
            arr = store[key]
            assert arr.shape == expected.shape, key
            np.testing.assert_array_equal(arr[...], expected)
            np.testing.assert_array_equal(np.asarray(arr), expected)
        assert store["empty"].take([]).shape == (0, 4)
        np.testing.assert_array_equal(store["three_d"].take([5, 0, 5]), arrays["three_d"][[5, 0, 5]])

    def test_take_and_slicing_match_numpy(self) -> None:
        data = sample((257, 6), "float32", seed=3)
        self.write({"emb": data})
        arr = self.open()["emb"]
        rng = np.random.default_rng(0)
        for idx in (rng.integers(0, 257, 64), np.array([5, 5, 5, 0, 256]), np.arange(257)[::-1], np.array([-1, -257])):
            np.testing.assert_array_equal(arr.take(idx), data[idx])
        np.testing.assert_array_equal(arr[10:50], data[10:50])
        np.testing.assert_array_equal(arr[::7], data[::7])
        np.testing.assert_array_equal(arr[-3:], data[-3:])
        np.testing.assert_array_equal(arr[42], data[42])
        np.testing.assert_array_equal(arr[3:9, 2], data[3:9, 2])
        np.testing.assert_array_equal(arr[[4, 1]], data[[4, 1]])
        tensor = arr.take([3, 1], as_tensor=True)
        assert type(tensor).__name__ == "Tensor"
        np.testing.assert_array_equal(tensor.numpy(), data[[3, 1]])

    def test_take_out_of_bounds_and_bad_indices(self) -> None:
        self.write({"emb": sample((10, 2), "float32")})
        arr = self.open()["emb"]
        with pytest.raises(errors.OutOfBoundsError, match="10"):
            arr.take([0, 10])
        with pytest.raises(IndexError):
            arr.take([-11])
        with pytest.raises(errors.ShapeMismatchError):
            arr.take([[0, 1]])
        with pytest.raises(errors.ShapeMismatchError):
            arr.take([0.5])

    def test_ragged_arrays(self) -> None:
        rows = [[1, 2, 3], [], [7], [4, 5, 6, 8, 9], []]
        self.write({"keywords": rows, "dense": np.arange(5)})
        store = self.open()
        rag = store["keywords"]
        assert isinstance(rag, us.RaggedArray)
        assert len(rag) == 5
        assert rag.to_list() == rows
        got = rag.take([3, 0, 3, 1])
        assert [g.tolist() for g in got] == [rows[3], rows[0], rows[3], rows[1]]
        assert rag[2].tolist() == [7]
        assert [t.tolist() for t in rag.take([0], as_tensor=True)] == [rows[0]]

    def test_attrs(self) -> None:
        with self.create() as store:
            store.write_array("emb", np.ones((2, 2)), attrs={"unit": "cm", "scale": 2})
            store.attrs.update({"name": "demo", "version": 3})
        store = self.open()
        assert store.attrs["name"] == "demo"
        assert store.attrs["version"] == 3
        assert store["emb"].attrs["unit"] == "cm"
        assert store["emb"].attrs["scale"] == 2

    # ------------------------------------------------------------ interop
    def test_reads_what_the_native_library_wrote(self) -> None:
        arrays = {"emb": sample((23, 4), "float32"), "ids": np.arange(23, dtype=np.int64),
                  "half": sample((5,), "float16")}
        ragged = {"kw": [[1, 2], [], [3, 4, 5]]} if self.fmt in NATIVE_RAGGED else {}
        url = self.where.put_native(self.fmt, self.name, arrays, ragged)
        store = us.open_store(url, storage_options=self.where.options)
        assert store.format == self.fmt
        for key, expected in arrays.items():
            np.testing.assert_array_equal(store[key][...], expected)
            np.testing.assert_array_equal(store[key].take([2, 0, 2]), expected[[2, 0, 2]])
        for key, rows in ragged.items():
            assert store[key].to_list() == rows
        assert store.verify() == {k: "no checksum" for k in store.keys()}

    def test_native_library_reads_what_unistore_wrote(self) -> None:
        arrays = {"emb": sample((9, 3), "float32"), "grp/ids": np.arange(9, dtype=np.int32)}
        self.write(arrays)
        native = self.where.get_native(self.fmt, self.name)
        for key, expected in arrays.items():
            np.testing.assert_array_equal(as_numpy(native[key]), expected)

    # ------------------------------------------------------------ process safety
    def test_pickled_store_and_array_read_the_same(self) -> None:
        data = sample((40, 3), "float32")
        self.write({"emb": data, "kw": [[1], [2, 3]]})
        store = self.open()
        store2 = pickle.loads(pickle.dumps(store))
        arr2 = pickle.loads(pickle.dumps(store["emb"]))
        np.testing.assert_array_equal(store2["emb"].take([3, 1]), data[[3, 1]])
        np.testing.assert_array_equal(arr2.take([39, 0]), data[[39, 0]])
        assert pickle.loads(pickle.dumps(store["kw"])).to_list() == [[1], [2, 3]]

    # ------------------------------------------------------------ bad input
    @pytest.mark.parametrize("key", ["../evil", "/abs", "a/../../b", "nul\x00", "back\\slash", "", "a//b",
                                     ".hidden", "..hidden", "...", ".zgroup", "g/.x", "k" * 300,
                                     "/".join(["d"] * 1000), "a/" + "é" * 150])
    def test_bad_keys_are_refused_and_nothing_is_written(self, key: str) -> None:
        store = self.create()
        with pytest.raises(errors.InvalidKeyError):
            store.write_array(key, np.ones(3))
        store.abort()
        assert not us.Location(self.where.url(self.name), self.where.options).exists()
        if self.where.kind == "local":
            assert os.listdir(self.where.root) == []

    def test_keys_with_dots_inside_round_trip(self) -> None:
        keys = ["v1.2", "run.final/emb.x", "a" * 190, "/".join(["g"] * 12)]
        self.write({k: np.full((2, 2), i, np.float32) for i, k in enumerate(keys)})
        store = self.open()
        assert sorted(keys) == [k for k in store.keys() if k in keys]
        for i, k in enumerate(keys):
            np.testing.assert_array_equal(store[k][...], np.full((2, 2), i, np.float32))

    def test_missing_array_and_missing_store(self) -> None:
        self.write({"emb": np.ones((2, 2))})
        store = self.open()
        with pytest.raises(errors.ArrayNotFoundError, match="emb"):
            store["nope"]
        with pytest.raises(KeyError):
            store["nope"]
        with pytest.raises(errors.InvalidKeyError):
            store["../etc/passwd"]
        with pytest.raises(errors.StoreNotFoundError):
            us.open_store(self.where.url("missing-" + self.name), storage_options=self.where.options)
        with pytest.raises(FileNotFoundError):
            us.open_store(self.where.url("missing-" + self.name), storage_options=self.where.options)

    def test_read_only_store_refuses_writes(self) -> None:
        self.write({"emb": np.ones((2, 2))})
        store = self.open()
        with pytest.raises(errors.ReadOnlyError):
            store.write_array("more", np.ones(2))
        with pytest.raises(PermissionError):
            store.write_array("more", np.ones(2))

    def test_existing_store_is_not_overwritten_by_accident(self) -> None:
        self.write({"emb": np.ones((2, 2))})
        with pytest.raises(errors.StoreExistsError):
            self.create()
        with self.create(overwrite=True) as store:
            store.write_array("emb", np.zeros((3, 2)))
        np.testing.assert_array_equal(self.open()["emb"][...], np.zeros((3, 2)))

    def test_failed_write_leaves_nothing_and_keeps_the_old_store(self) -> None:
        self.write({"emb": np.ones((2, 2))})
        with pytest.raises(RuntimeError, match="boom"):
            with self.create(overwrite=True) as store:
                store.write_array("emb", np.zeros((5, 2)))
                raise RuntimeError("boom")
        np.testing.assert_array_equal(self.open()["emb"][...], np.ones((2, 2)))
        if self.where.kind == "local":
            assert os.listdir(self.where.root) == [self.name]

    def test_object_arrays_are_refused(self) -> None:
        store = self.create()
        with pytest.raises(errors.ShapeMismatchError, match="object"):
            store.write_array("obj", np.array([{"a": 1}, None], dtype=object))
        store.abort()

    def _data_member(self, key: str = "emb") -> tuple[us.Location, int]:
        """The file holding ``key``'s data and the offset just past its last byte."""
        arr = self.open()[key]
        layout = arr.layout
        if isinstance(layout, ContiguousLayout):
            return layout.location, layout.offset + arr.nbytes
        loc = us.Location(self.where.url(f"{self.name}/{HOOKS[self.fmt].chunk_member(key)}"), self.where.options)
        return loc, int(loc.fs.size(loc.path))

    def test_truncated_file_raises_typed_error(self) -> None:
        self.write({"emb": sample((64, 16), "float32")})
        loc, end = self._data_member()
        raw = bytes(loc.fs.cat_file(loc.path))
        loc.fs.pipe_file(loc.path, raw[: end - 100])
        with pytest.raises((errors.TruncatedDataError, errors.CorruptDataError)):
            self.open()["emb"][...]

    def test_corrupt_header_raises_typed_error(self) -> None:
        self.write({"emb": sample((8, 4), "float32")})
        loc, _ = self._data_member()
        header = HOOKS[self.fmt].header_member("emb")
        if header is not None:
            loc = us.Location(self.where.url(f"{self.name}/{header}"), self.where.options)
        raw = bytearray(loc.fs.cat_file(loc.path))
        raw[:64] = b"\xff" * 64
        loc.fs.pipe_file(loc.path, bytes(raw))
        with pytest.raises(errors.UnistoreError):
            self.open(format=self.fmt)["emb"][...]

    def test_checksums_verify_and_detect_corruption(self) -> None:
        self.write({"emb": sample((32, 8), "float32"), "kw": [[1, 2], [3]]})
        assert self.open().verify() == {"emb": "ok", "kw": "ok"}
        loc, end = self._data_member()
        raw = bytearray(loc.fs.cat_file(loc.path))
        raw[end - 5] ^= 0xFF  # inside the last row; headers untouched
        loc.fs.pipe_file(loc.path, bytes(raw))
        with pytest.raises(errors.ChecksumMismatchError, match="emb"):
            self.open().verify()
