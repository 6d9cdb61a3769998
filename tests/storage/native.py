"""Write and read each format with its *own* library, bypassing unistore.

The shared suite uses these hooks to check that unistore reads files other
tools wrote, and that other tools read what unistore wrote.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from unistore.storage.formats.base import bfloat16

BASE_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64"]


def dtype_of(name: str) -> np.dtype[Any]:
    return bfloat16 if name == "bfloat16" else np.dtype(name)


def sample(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = dtype_of(dtype)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(max(info.min, -(1 << 40)), min(info.max, 1 << 40), size=shape, dtype=np.int64,
                            endpoint=True).astype(dt)
    if dt.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    return (rng.standard_normal(shape) * 100).astype(dt)


def _torch(data: np.ndarray) -> Any:
    from unistore.storage.array import to_tensor

    return to_tensor(np.array(data, copy=True))


class NativeHooks:
    """How one format's *own* library writes and reads a store, for the shared suite (one subclass per format:
    adding a format to the suite is one more subclass in :data:`HOOKS`)."""

    fmt: str
    #: the store's name: a directory for directory formats, a file name otherwise
    store_name = "store"
    #: dtypes beyond :data:`BASE_DTYPES` the format stores
    extra_dtypes: tuple[str, ...] = ("uint16", "uint32", "uint64", "complex64", "complex128")
    #: whether the format has a native ragged type (lists of lists)
    native_ragged = False

    def write(self, path: str, arrays: dict[str, np.ndarray], ragged: dict[str, list[list[int]]]) -> None:
        raise NotImplementedError

    def read(self, path: str) -> dict[str, Any]:
        raise NotImplementedError

    def header_member(self, key: str) -> str | None:
        """The file below the store holding ``key``'s metadata, when it is not the file holding its data."""
        return None

    def chunk_member(self, key: str) -> str:
        """The file below the store holding ``key``'s first chunk (formats whose arrays are chunked)."""
        raise NotImplementedError(self.fmt)


def _walk(path: str, suffix: str, load: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d, _, files in os.walk(path):
        for name in files:
            if name.endswith(suffix):
                key = os.path.relpath(os.path.join(d, name), path)[:-len(suffix)].replace(os.sep, "/")
                out[key] = load(os.path.join(d, name))
    return out


class NpyHooks(NativeHooks):
    fmt = "npy"

    def write(self, path: str, arrays: dict[str, np.ndarray], ragged: dict[str, list[list[int]]]) -> None:
        os.makedirs(path)
        for key, data in arrays.items():
            target = os.path.join(path, key + ".npy")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            np.save(target, data)

    def read(self, path: str) -> dict[str, Any]:
        return _walk(path, ".npy", lambda f: np.load(f, allow_pickle=False))


class PtHooks(NativeHooks):
    fmt = "pt"
    extra_dtypes = ("complex64", "bfloat16")
    native_ragged = True

    def write(self, path: str, arrays: dict[str, np.ndarray], ragged: dict[str, list[list[int]]]) -> None:
        import torch

        os.makedirs(path)
        for key, data in arrays.items():
            target = os.path.join(path, key + ".pt")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            torch.save(_torch(data), target)
        for key, rows in ragged.items():
            torch.save(rows, os.path.join(path, key + ".pt"))

    def read(self, path: str) -> dict[str, Any]:
        import torch

        if os.path.isfile(path):
            return dict(torch.load(path, weights_only=True))
        return _walk(path, ".pt", lambda f: torch.load(f, weights_only=True))


class SafetensorsHooks(NativeHooks):
    fmt = "safetensors"
    store_name = "store.safetensors"
    extra_dtypes = ("uint16", "uint32", "uint64", "complex64", "bfloat16")

    def write(self, path: str, arrays: dict[str, np.ndarray], ragged: dict[str, list[list[int]]]) -> None:
        from safetensors.torch import save_file

        save_file({k: _torch(v) for k, v in arrays.items()}, path, metadata={"origin": "native"})

    def read(self, path: str) -> dict[str, Any]:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}


class Hdf5Hooks(NativeHooks):
    fmt = "hdf5"
    store_name = "store.h5"
    native_ragged = True

    def write(self, path: str, arrays: dict[str, np.ndarray], ragged: dict[str, list[list[int]]]) -> None:
        import h5py

        with h5py.File(path, "w") as f:
            f.attrs["origin"] = "native"
            for key, data in arrays.items():
                f.create_dataset(key, data=data)
            for key, rows in ragged.items():
                ds = f.create_dataset(key, shape=(len(rows),), dtype=h5py.vlen_dtype(np.int64))
                for i, r in enumerate(rows):
                    ds[i] = np.asarray(r, dtype=np.int64)

    def read(self, path: str) -> dict[str, Any]:
        import h5py

        out: dict[str, Any] = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
        return out


class ZarrHooks(NativeHooks):
    fmt = "zarr"
    store_name = "store.zarr"

    def write(self, path: str, arrays: dict[str, np.ndarray], ragged: dict[str, list[list[int]]]) -> None:
        import zarr

        group = zarr.open_group(path, mode="w", zarr_format=3)
        group.attrs["origin"] = "native"
        for key, data in arrays.items():
            arr = group.create_array(key, shape=data.shape, dtype=data.dtype,
                                     chunks=(max(1, min(7, data.shape[0])),) + data.shape[1:] if data.ndim else ())
            arr[...] = data

    def read(self, path: str) -> dict[str, Any]:
        import zarr

        group = zarr.open_group(path, mode="r")
        return {key: arr[...] for key, arr in group.members(max_depth=None) if isinstance(arr, zarr.Array)}

    def header_member(self, key: str) -> str | None:
        return f"{key}/zarr.json"

    def chunk_member(self, key: str) -> str:
        return f"{key}/c/0/0"


#: the hooks of every format the shared suite runs
HOOKS: dict[str, NativeHooks] = {h.fmt: h for h in (NpyHooks(), PtHooks(), SafetensorsHooks(), Hdf5Hooks(),
                                                     ZarrHooks())}
FORMATS = tuple(HOOKS)
#: store names per format: directory formats get a directory, others a file
STORE_NAME = {fmt: h.store_name for fmt, h in HOOKS.items()}
EXTRA_DTYPES = {fmt: list(h.extra_dtypes) for fmt, h in HOOKS.items()}
NATIVE_RAGGED = {fmt for fmt, h in HOOKS.items() if h.native_ragged}


def native_write(fmt: str, path: str, arrays: dict[str, np.ndarray], ragged: dict[str, list[list[int]]]) -> None:
    """Write ``arrays`` (and ``ragged`` where the format has a native type) at local ``path``."""
    HOOKS[fmt].write(path, arrays, ragged)


def native_read(fmt: str, path: str) -> dict[str, Any]:
    """Every array at local ``path`` read by the format's own library."""
    return HOOKS[fmt].read(path)


def as_numpy(value: Any) -> np.ndarray:
    """A natively-read value as ndarray (torch tensors included, bfloat16 too)."""
    if type(value).__module__.startswith("torch"):
        import torch

        if value.dtype == torch.bfloat16:
            return value.view(torch.int16).numpy().view(bfloat16)
        return value.numpy()
    return np.asarray(value)
