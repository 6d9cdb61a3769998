"""Importers: the dataset files users already have, as factory stores.

- MNIST (and Fashion-MNIST) IDX files: ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, plain or ``.gz``.
- CIFAR-10 / CIFAR-100 "python version" batches (``data_batch_1`` ...
  ``test_batch``; ``train`` / ``test``).  These are pickles: they are read with
  an unpickler that builds dicts, lists, bytes and numeric numpy arrays only,
  so a batch that would run code is refused, not run.

Sources may be local or any fsspec URL; the store is written atomically
under the data root (see :func:`~unistore.datasets.factory.data_root`).
"""

from __future__ import annotations

import gzip
import io
import pickle
import posixpath
from collections.abc import Mapping
from typing import Any

import numpy as np

from unistore.datasets.factory import _join, data_root, get_dataset_config, write_classification_store
from unistore.errors import CorruptDataError, DatasetNotFoundError, TruncatedDataError, UnsafePickleError
from unistore.storage.location import Location, retry_remote

__all__ = ["import_mnist", "import_cifar", "read_idx", "read_cifar_batch"]

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read(source: Location, name: str) -> tuple[bytes, str]:
    """Bytes of ``name`` (or ``name.gz``, decompressed) below ``source``; and the URL read."""
    for candidate in (name, name + ".gz"):
        path = f"{source.path.rstrip('/')}/{candidate}"
        url = path if source.is_local else f"{source.protocol}://{path}"
        try:
            raw = retry_remote(lambda p=path: source.fs.cat_file(p), source)  # type: ignore[misc]
        except FileNotFoundError:
            continue
        if candidate.endswith(".gz"):
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as e:
                raise CorruptDataError(f"{url} is not a valid gzip file ({e}); download it again") from e
        return bytes(raw), url
    raise DatasetNotFoundError(f"{source.url} has no {name} (or {name}.gz)")


def read_idx(data: bytes, where: str, ndim: int) -> np.ndarray:
    """The array in an IDX file (MNIST's format): magic ``0 0 <dtype> <ndim>``, big-endian dims, body.

    Raises:
        CorruptDataError: the magic number is wrong (or not ``ndim`` dimensions).
        TruncatedDataError: the body is shorter than the dims say.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] != ndim:
        raise CorruptDataError(f"{where} has magic number {data[:4].hex() or 'none'}, expected 0000{0x08:02x}"
                               f"{ndim:02x} (an IDX file of {ndim} dimensions); is it the right file?")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    head = 4 + 4 * ndim
    if len(data) < head:
        raise TruncatedDataError(f"{where} ends inside its header ({len(data)} bytes); download it again")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    need = head + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) < need:
        raise TruncatedDataError(f"{where} is {len(data)} bytes, but its header {dims} needs {need}; "
                                 "download it again")
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(dims, dtype=np.int64)), offset=head).reshape(dims)


def import_mnist(source_dir: str, data_dir: str | None = None, *, name: str = "mnist", format: str = "npy",
                 storage_options: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
    """Turn MNIST IDX files into the factory store ``<data root>/<name>``; returns its URL.

    Images are stored ``(N, 1, 28, 28)`` uint8, labels int64.

    Raises:
        DatasetNotFoundError: a file is missing.
        CorruptDataError / TruncatedDataError: a wrong magic number or a short body (naming the file).
        ShapeMismatchError: images and labels of a split differ in count.
    """
    source = Location(source_dir, storage_options)
    splits = []
    for split in ("train", "test"):
        images_name, labels_name = _MNIST_FILES[split]
        images_raw, images_url = _read(source, images_name)
        labels_raw, labels_url = _read(source, labels_name)
        images = read_idx(images_raw, images_url, 3)
        labels = read_idx(labels_raw, labels_url, 1)
        if len(images) != len(labels):
            from unistore.errors import ShapeMismatchError

            raise ShapeMismatchError(f"{images_url} holds {len(images)} images but {labels_url} "
                                     f"{len(labels)} labels")
        splits.append((images.astype(np.uint8)[:, None], labels))
    return _write(name, splits, data_dir, format, storage_options, overwrite, source.url)


def read_cifar_batch(data: bytes, where: str) -> dict[str, Any]:
    """One CIFAR python batch as ``{"data": (N, 3072) uint8, "labels": (N,) int64, ...}``.

    Raises:
        UnsafePickleError: the pickle names anything but numpy's array builders (it is not run).
        CorruptDataError: not a pickle of a CIFAR batch dict.
    """
    # dicts, lists, bytes and numeric numpy arrays: everything a CIFAR batch holds, nothing that runs
    from unistore.migrations.legacy import NumpyOnlyUnpickler

    try:
        value = NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{where}: {e}") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError) as e:
        raise CorruptDataError(f"{where} is truncated or not a CIFAR batch ({type(e).__name__}: {e})") from e
    if not isinstance(value, dict):
        raise CorruptDataError(f"{where} holds a {type(value).__name__}, not a CIFAR batch dict")
    batch = {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in value.items()}
    labels_key = next((k for k in ("labels", "fine_labels") if k in batch), None)
    if "data" not in batch or labels_key is None:
        raise CorruptDataError(f"{where} has keys {sorted(batch)}; a CIFAR batch has 'data' and 'labels' "
                               "(or 'fine_labels')")
    images = np.asarray(batch["data"])
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise CorruptDataError(f"{where}: data is {images.dtype} {images.shape}, expected uint8 (N, 3072)")
    labels = np.asarray(batch[labels_key], dtype=np.int64)
    if labels.shape != (len(images),):
        raise CorruptDataError(f"{where}: {len(images)} images but {labels.size} labels")
    batch["data"], batch["labels"] = images, labels
    return batch


def import_cifar(source_dir: str, data_dir: str | None = None, *, variant: str = "cifar10", name: str | None = None,
                 format: str = "npy", storage_options: Mapping[str, Any] | None = None,
                 overwrite: bool = False) -> str:
    """Turn CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``) python
    batches into the factory store ``<data root>/<name>``; returns its URL.

    Images are stored ``(N, 3, 32, 32)`` uint8, labels int64 (CIFAR-100: fine labels).

    Raises:
        DatasetNotFoundError: a batch file is missing.
        UnsafePickleError: a batch's pickle would run code (nothing is run, nothing written).
        CorruptDataError: a batch is truncated or not a CIFAR batch.
    """
    if variant not in ("cifar10", "cifar100"):
        raise ValueError(f"variant must be 'cifar10' or 'cifar100', got {variant!r}")
    source = Location(source_dir, storage_options)
    files = ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]} if variant == "cifar10"
             else {"train": ["train"], "test": ["test"]})
    splits = []
    for split in ("train", "test"):
        parts = [read_cifar_batch(*_read(source, f)) for f in files[split]]
        images = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([p["labels"] for p in parts])
        classes = get_dataset_config(variant).num_classes
        if len(labels) and (labels.min() < 0 or labels.max() >= classes):
            raise CorruptDataError(f"{source.url}: {split} labels span {labels.min()}..{labels.max()}, "
                                   f"{variant} has {classes} classes")
        splits.append((images, labels))
    return _write(name or variant, splits, data_dir, format, storage_options, overwrite, source.url)


def _write(name: str, splits: list[tuple[np.ndarray, np.ndarray]], data_dir: str | None, format: str,
           storage_options: Mapping[str, Any] | None, overwrite: bool, source: str) -> str:
    url = _join(data_root(data_dir), name)
    return write_classification_store(url, splits[0], splits[1], format=format, storage_options=storage_options,
                                      attrs={"source": posixpath.basename(source.rstrip("/")) or source,
                                             "imported_from": source}, overwrite=overwrite)
