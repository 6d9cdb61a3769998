"""The dataset factory: named classification datasets read from TensorStores, with train/test loaders.

A dataset named ``name`` is a store at ``<data root>/<name>`` (any format,
any fsspec URL; ``<name>.zarr``, ``<name>.h5``, ... are found too) holding
``train/images``, ``train/labels``, ``test/images`` and ``test/labels``.
The data root is the ``data_dir`` argument, else ``$UNISTORE_DATA_DIR``,
else ``$DATA_DIR``, else ``./data``.  Nothing is downloaded: importers
(:mod:`unistore.datasets.importers`) turn the files users already have into
stores, and the ``synthetic`` dataset is generated on first use.

>>> from unistore.datasets import create_dataset, list_available_datasets
>>> data = create_dataset("cifar10", batch_size=128, subset_size=1000)
>>> for images, labels in data["train_loader"]: ...
>>> data["config"].input_size
3072

Every ``create_dataset`` call is recorded in the catalog
(:func:`~unistore.datasets.metadata.track_dataset_usage`) when one is known.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unistore.datasets.base import StoreDataset
from unistore.errors import DatasetNotFoundError, ShapeMismatchError
from unistore.storage.location import Location
from unistore.storage.store import TensorStore, open_store

__all__ = [
    "DatasetConfig",
    "DatasetLoader",
    "ClassificationDataset",
    "SyntheticLoader",
    "register_dataset",
    "register_loader",
    "get_dataset_config",
    "list_available_datasets",
    "create_dataset",
    "data_root",
    "dataset_url",
    "write_classification_store",
    "DATASET_CACHE",
]

log = logging.getLogger("unistore")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetConfig:
    """What a dataset is: its shape, classes and sizes (plus the normalisation applied to its images).

    ``mean``/``std`` (one value per channel) normalise images scaled to
    ``[0, 1]``; leave them ``None`` to keep the scaled values.
    """

    name: str
    full_name: str
    description: str
    input_shape: tuple[int, ...]
    num_classes: int
    num_train_samples: int
    num_test_samples: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    version: str = "1.0.0"
    preprocessing: tuple[str, ...] = field(default=("scale_0_1", "normalize"))

    @property
    def input_size(self) -> int:
        """The flattened input size (what a fully connected network's first layer takes)."""
        return int(math.prod(self.input_shape))


_CONFIGS: dict[str, DatasetConfig] = {}
_LOADERS: dict[str, type[DatasetLoader]] = {}
_LOCK = threading.Lock()
#: ``create_dataset`` results kept in this process, keyed by everything that shapes them
DATASET_CACHE: dict[tuple[Any, ...], dict[str, Any]] = {}


def register_dataset(config: DatasetConfig) -> DatasetConfig:
    """Make ``config`` available by its name (replacing a registration of the same name)."""
    if not config.name or "/" in config.name or config.name.startswith("."):
        raise ValueError(f"dataset name {config.name!r} must be non-empty, without '/' and not start with '.'")
    with _LOCK:
        _CONFIGS[config.name] = config
    return config


def register_loader(name: str, loader_class: type[DatasetLoader]) -> None:
    """Use ``loader_class`` to load the dataset registered as ``name``."""
    if not (isinstance(loader_class, type) and issubclass(loader_class, DatasetLoader)):
        raise TypeError(f"register_loader needs a DatasetLoader subclass, got {loader_class!r}")
    with _LOCK:
        _LOADERS[name] = loader_class


def list_available_datasets() -> list[str]:
    """Names of every registered dataset, sorted."""
    return sorted(_CONFIGS)


def get_dataset_config(name: str) -> DatasetConfig:
    """The registered config of ``name``.

    Raises:
        DatasetNotFoundError: no such dataset (the message lists those that exist).
    """
    try:
        return _CONFIGS[name]
    except KeyError:
        raise DatasetNotFoundError(f"no dataset named {name!r}; available: {', '.join(list_available_datasets())} "
                                   "(register_dataset adds one)") from None


def data_root(data_dir: str | os.PathLike[str] | None = None) -> str:
    """The root datasets are read from: ``data_dir``, ``$UNISTORE_DATA_DIR``, ``$DATA_DIR`` or ``./data``."""
    if data_dir is not None:
        return os.fspath(data_dir)
    return os.environ.get("UNISTORE_DATA_DIR") or os.environ.get("DATA_DIR") or "data"


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else os.path.join(root, name)


def dataset_url(name: str, data_dir: str | os.PathLike[str] | None = None,
                storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The URL of the store holding ``name`` below the data root, or None when there is none."""
    root = data_root(data_dir)
    from unistore.storage.formats import store_suffixes

    for suffix in store_suffixes():
        url = _join(root, name + suffix)
        if Location(url, storage_options).exists():
            return url
    return None


def write_classification_store(url: str, train: tuple[Any, Any], test: tuple[Any, Any], *, format: str = "npy",
                               storage_options: Mapping[str, Any] | None = None, attrs: Mapping[str, Any] | None = None,
                               chunks: int | None = None, compression: str | None = None,
                               overwrite: bool = False) -> str:
    """Write ``(images, labels)`` of both splits as one store (atomically); returns its URL.

    ``overwrite`` replaces an existing store only once the new one is complete.

    Raises:
        ShapeMismatchError: images and labels of a split differ in length, or labels are not 1-D.
    """
    from unistore.storage.store import create_store

    with create_store(url, format=format, storage_options=storage_options, overwrite=overwrite) as store:
        for split, (images, labels) in zip(SPLITS, (train, test)):
            images, labels = np.asarray(images), np.asarray(labels)
            if labels.ndim != 1 or len(images) != len(labels):
                raise ShapeMismatchError(f"{split}: {len(images)} images but labels of shape {labels.shape}")
            opts: dict[str, Any] = {"compression": compression}
            if chunks:
                opts["chunks"] = (chunks,) + images.shape[1:]
            store.write_array(f"{split}/images", images, **opts)
            store.write_array(f"{split}/labels", labels.astype(np.int64))
        store.attrs.update(dict(attrs or {}))
        store.commit()
    return url


class ClassificationDataset(StoreDataset):
    """``(image, label)`` samples of one split of a factory store; a batch is one ``take`` per array.

    Images are cast to float32, scaled to ``[0, 1]`` when stored as uint8,
    normalised by the config's ``mean``/``std``, and shaped ``input_shape``;
    labels are int64.  ``transform`` (any callable on one image tensor, e.g.
    torchvision transforms) is applied per sample after that.  ``rows``
    restricts the dataset to those rows (a subset).
    """

    def __init__(self, store: TensorStore, split: str, config: DatasetConfig,
                 transform: Callable[[Any], Any] | None = None, rows: np.ndarray | None = None):
        super().__init__(store, [f"{split}/images", f"{split}/labels"])
        self.split = split
        self.config = config
        self.transform = transform
        images = self.arrays[f"{split}/images"]
        if int(math.prod(images.shape[1:])) != config.input_size:
            raise ShapeMismatchError(f"{store.location.url}: {split}/images rows have shape {images.shape[1:]}, "
                                     f"but dataset {config.name!r} declares input_shape {config.input_shape}")
        self.rows = np.arange(self._len, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        channels = config.input_shape[0] if len(config.input_shape) == 3 else 1
        shape = (1, channels) + (1,) * (len(config.input_shape) - 1)
        self._mean = None if config.mean is None else np.asarray(config.mean, np.float32).reshape(shape)
        self._std = None if config.std is None else np.asarray(config.std, np.float32).reshape(shape)

    def __len__(self) -> int:
        return len(self.rows)

    def sample_rows(self) -> tuple[np.ndarray | None, list[Any]] | None:
        return self.rows, [self.arrays[f"{self.split}/images"], self.arrays[f"{self.split}/labels"]]

    def _get_batch(self, indices: np.ndarray) -> Any:
        import torch

        rows = self.rows[indices]
        raw = np.asarray(self.arrays[f"{self.split}/images"].take(rows))
        images = raw.astype(np.float32).reshape((len(rows),) + self.config.input_shape)
        if raw.dtype == np.uint8:
            images /= 255.0
        if self._mean is not None and self._std is not None:
            images = (images - self._mean) / self._std
        labels = np.asarray(self.arrays[f"{self.split}/labels"].take(rows), dtype=np.int64)
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.transform is not None:
            x = torch.stack([self.transform(img) for img in x])
        return x, torch.from_numpy(labels)


class DatasetLoader:
    """Loads one registered dataset from its store.  Subclass and :func:`register_loader` to customise.

    ``load_data`` returns ``(train_data, test_data)`` (here the opened store,
    twice), ``get_transform`` the per-sample transform of a split (None by
    default: images are already scaled and normalised), and
    ``create_datasets`` the torch datasets.
    """

    def __init__(self, config: DatasetConfig, data_dir: str | os.PathLike[str] | None = None,
                 storage_options: Mapping[str, Any] | None = None):
        self.config = config
        self.data_dir = data_root(data_dir)
        self.storage_options = dict(storage_options or {})

    def store_url(self) -> str:
        """Where this dataset's store is.

        Raises:
            DatasetNotFoundError: no store for it below the data root (the message says how to make one).
        """
        url = dataset_url(self.config.name, self.data_dir, self.storage_options)
        if url is None:
            raise DatasetNotFoundError(
                f"dataset {self.config.name!r} has no store below {self.data_dir} (looked for "
                f"{self.config.name}, {self.config.name}.zarr, ...); nothing is downloaded - import the files you "
                "have (unistore.datasets.import_mnist / import_cifar) or write one with write_classification_store, "
                "or point data_dir / $UNISTORE_DATA_DIR at the right root")
        return url

    def load_data(self) -> tuple[Any, Any]:
        store = open_store(self.store_url(), storage_options=self.storage_options)
        return store, store

    def get_transform(self, train: bool = True) -> Callable[[Any], Any] | None:
        return None

    def create_datasets(self, train_data: Any, test_data: Any) -> tuple[Any, Any]:
        return (ClassificationDataset(train_data, "train", self.config, self.get_transform(True)),
                ClassificationDataset(test_data, "test", self.config, self.get_transform(False)))


class SyntheticLoader(DatasetLoader):
    """The ``synthetic`` dataset: class prototypes plus noise, generated once into a store at the data root."""

    def load_data(self) -> tuple[Any, Any]:
        if dataset_url(self.config.name, self.data_dir, self.storage_options) is None:
            rng = np.random.default_rng(0)
            shape = self.config.input_shape
            prototypes = rng.uniform(40, 215, size=(self.config.num_classes,) + shape)

            def split(n: int) -> tuple[np.ndarray, np.ndarray]:
                labels = rng.integers(0, self.config.num_classes, n)
                images = prototypes[labels] + rng.normal(0, 30, size=(n,) + shape)
                return np.clip(images, 0, 255).astype(np.uint8), labels

            write_classification_store(_join(self.data_dir, self.config.name), split(self.config.num_train_samples),
                                       split(self.config.num_test_samples), storage_options=self.storage_options,
                                       attrs={"source": "synthetic", "seed": 0})
        return super().load_data()


def _subset_of(ds: Any, rows: np.ndarray | None) -> Any:
    """``ds`` restricted to ``rows``: a factory dataset keeps reading a batch in one ``take``; any other torch
    dataset (what a registered loader's ``create_datasets`` may return) becomes a ``torch.utils.data.Subset``."""
    if rows is None:
        return ds
    if isinstance(ds, ClassificationDataset):
        ds.rows = ds.rows[rows]
        return ds
    from torch.utils.data import Subset

    return Subset(ds, rows.tolist())


def _subset(n: int, size: int | None, seed: int) -> np.ndarray | None:
    if size is None or size >= n:
        return None
    if size <= 0:
        raise ValueError(f"subset_size must be positive, got {size}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def create_dataset(name: str = "mnist", batch_size: int = 64, subset_size: int | None = None,
                   force_reload: bool = False, *, data_dir: str | os.PathLike[str] | None = None,
                   storage_options: Mapping[str, Any] | None = None, num_workers: int = 0, seed: int = 0,
                   experiment_id: str | None = None, catalog_url: str | None = None,
                   **loader_kwargs: Any) -> dict[str, Any]:
    """``{"train_loader", "test_loader", "config"}`` for the registered dataset ``name``.

    ``subset_size`` keeps that many rows of each split (a seeded random
    choice).  Results are cached in this process (``DATASET_CACHE``):
    the same arguments return the same loaders; ``force_reload`` reopens the
    store and rebuilds them.  The use is recorded in the catalog
    (``catalog_url``, else :func:`unistore.schemas.engine.default_catalog_url`)
    with ``experiment_id`` when given.

    Raises:
        DatasetNotFoundError: ``name`` is not registered, or its store is missing.
        ShapeMismatchError: the store's images do not have the config's input shape.
    """
    from unistore.datasets.loader import make_loader

    config = get_dataset_config(name)
    root = data_root(data_dir)
    key = (name, root, batch_size, subset_size, num_workers, seed, tuple(sorted(loader_kwargs.items())))
    if not force_reload and key in DATASET_CACHE:
        result = DATASET_CACHE[key]
    else:
        loader = _LOADERS.get(name, DatasetLoader)(config, root, storage_options)
        train_data, test_data = loader.load_data()
        train, test = (_subset_of(ds, _subset(len(ds), subset_size, seed))
                       for ds in loader.create_datasets(train_data, test_data))
        result = {
            "train_loader": make_loader(train, batch_size, shuffle=True, seed=seed, num_workers=num_workers,
                                        **loader_kwargs),
            "test_loader": make_loader(test, batch_size, shuffle=False, num_workers=num_workers, **loader_kwargs),
            "config": config,
        }
        DATASET_CACHE[key] = result
    _record_use(config, result, root, subset_size, experiment_id, catalog_url, storage_options)
    return result


def _record_use(config: DatasetConfig, result: Mapping[str, Any], root: str, subset_size: int | None,
                experiment_id: str | None, catalog_url: str | None, storage_options: Any) -> None:
    from unistore.datasets.metadata import DatasetMetadata, track_dataset_usage
    from unistore.schemas.engine import default_catalog_url

    url = catalog_url or default_catalog_url()
    train, test = result["train_loader"].dataset, result["test_loader"].dataset
    store = getattr(train, "store", None)
    metadata = DatasetMetadata(dataset_name=config.name, version=config.version, source="unistore-store",
                               preprocessing_steps=list(config.preprocessing),
                               statistics={"mean": list(config.mean or ()), "std": list(config.std or ())},
                               store_url=store.location.url if store is not None else None)
    track_dataset_usage(experiment_id, metadata, {"size": subset_size, "train_rows": len(train),
                                                   "test_rows": len(test)}, catalog_url=url, purpose="create_dataset")


def _builtin(name: str, full: str, desc: str, shape: Sequence[int], classes: int, n_train: int, n_test: int,
             mean: Sequence[float] | None, std: Sequence[float] | None) -> DatasetConfig:
    return register_dataset(DatasetConfig(name, full, desc, tuple(shape), classes, n_train, n_test,
                                          tuple(mean) if mean else None, tuple(std) if std else None))


_builtin("mnist", "MNIST", "28x28 grayscale handwritten digits", (1, 28, 28), 10, 60000, 10000, (0.1307,), (0.3081,))
_builtin("cifar10", "CIFAR-10", "32x32 colour images in 10 classes", (3, 32, 32), 10, 50000, 10000,
         (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_builtin("cifar100", "CIFAR-100", "32x32 colour images in 100 classes", (3, 32, 32), 100, 50000, 10000,
         (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_builtin("imagenet", "ImageNet", "224x224 colour images in 1000 classes (ILSVRC-2012)", (3, 224, 224), 1000,
         1281167, 50000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_builtin("synthetic", "Synthetic", "8x8 grayscale class prototypes plus noise, generated locally (tests, demos)",
         (1, 8, 8), 4, 512, 128, (0.5,), (0.25,))
register_loader("synthetic", SyntheticLoader)
