"""Write and read each format with its *own* library, bypassing unistore.

The shared suite uses these hooks to check that unistore reads files other
tools wrote, and that other tools read what unistore wrote.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from unistore.storage.formats.base import bfloat16

# store names per format: directory formats get a directory, others a file
STORE_NAME = {"npy": "store", "pt": "store", "safetensors": "store.safetensors", "hdf5": "store.h5",
              "zarr": "store.zarr"}
FORMATS = tuple(STORE_NAME)

BASE_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64"]
EXTRA_DTYPES = {
    "npy": ["uint16", "uint32", "uint64", "complex64", "complex128"],
    "pt": ["complex64", "bfloat16"],
    "safetensors": ["uint16", "uint32", "uint64", "complex64", "bfloat16"],
    "hdf5": ["uint16", "uint32", "uint64", "complex64", "complex128"],
    "zarr": ["uint16", "uint32", "uint64", "complex64", "complex128"],
}
NATIVE_RAGGED = {"pt", "hdf5"}


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


def native_write(fmt: str, path: str, arrays: dict[str, np.ndarray], ragged: dict[str, list[list[int]]]) -> None:
    """Write ``arrays`` (and ``ragged`` where the format has a native type) at local ``path``."""
    if fmt == "npy":
        os.makedirs(path)
        for key, data in arrays.items():
            target = os.path.join(path, key + ".npy")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            np.save(target, data)
    elif fmt == "pt":
        import torch

        os.makedirs(path)
        for key, data in arrays.items():
            target = os.path.join(path, key + ".pt")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            torch.save(_torch(data), target)
        for key, rows in ragged.items():
            torch.save(rows, os.path.join(path, key + ".pt"))
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: _torch(v) for k, v in arrays.items()}, path, metadata={"origin": "native"})
    elif fmt == "hdf5":
        import h5py

        with h5py.File(path, "w") as f:
            f.attrs["origin"] = "native"
            for key, data in arrays.items():
                f.create_dataset(key, data=data)
            for key, rows in ragged.items():
                ds = f.create_dataset(key, shape=(len(rows),), dtype=h5py.vlen_dtype(np.int64))
                for i, r in enumerate(rows):
                    ds[i] = np.asarray(r, dtype=np.int64)
    elif fmt == "zarr":
        import zarr

        group = zarr.open_group(path, mode="w", zarr_format=3)
        group.attrs["origin"] = "native"
        for key, data in arrays.items():
            arr = group.create_array(key, shape=data.shape, dtype=data.dtype,
                                     chunks=(max(1, min(7, data.shape[0])),) + data.shape[1:] if data.ndim else ())
            arr[...] = data
    else:
        raise ValueError(fmt)


def native_read(fmt: str, path: str) -> dict[str, Any]:
    """Every array at local ``path`` read by the format's own library."""
    out: dict[str, Any] = {}
    if fmt == "npy":
        for d, _, files in os.walk(path):
            for name in files:
                if name.endswith(".npy"):
                    key = os.path.relpath(os.path.join(d, name), path)[:-4].replace(os.sep, "/")
                    out[key] = np.load(os.path.join(d, name), allow_pickle=False)
    elif fmt == "pt":
        import torch

        if os.path.isfile(path):
            return dict(torch.load(path, weights_only=True))
        for d, _, files in os.walk(path):
            for name in files:
                if name.endswith(".pt"):
                    key = os.path.relpath(os.path.join(d, name), path)[:-3].replace(os.sep, "/")
                    out[key] = torch.load(os.path.join(d, name), weights_only=True)
    elif fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    elif fmt == "hdf5":
        import h5py

        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    elif fmt == "zarr":
        import zarr

        group = zarr.open_group(path, mode="r")
        for key, arr in group.members(max_depth=None):
            if isinstance(arr, zarr.Array):
                out[key] = arr[...]
    return out


def as_numpy(value: Any) -> np.ndarray:
    """A natively-read value as ndarray (torch tensors included, bfloat16 too)."""
    if type(value).__module__.startswith("torch"):
        import torch

        if value.dtype == torch.bfloat16:
            return value.view(torch.int16).numpy().view(bfloat16)
        return value.numpy()
    return np.asarray(value)
