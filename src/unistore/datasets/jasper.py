"""``JASPERSteeringDataset``: embedding triplets with hard negatives and a steering curriculum.

The dataset is a set of arrays in one :class:`~unistore.TensorStore`: the PT
directory (``question_embs.pt``, ...), ``dataset.h5`` with its groups
(``embeddings/questions``, ...), or the same arrays in zarr, safetensors or
npy, on local disk or at any fsspec URL.  Small datasets are read into memory
(or onto ``device``) once; above :data:`MMAP_AUTO_BYTES` (or with
``use_mmap=True``) every batch is gathered from storage with one ``take`` per
array, so a dataset larger than RAM trains with a small, flat footprint.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from unistore.datasets.base import StoreDataset
from unistore.errors import (
    DatasetNotFoundError,
    IntegrityError,
    ShapeMismatchError,
    UnknownFormatError,
    UnsupportedError,
)
from unistore.storage.array import Array, RaggedArray, to_tensor
from unistore.storage.formats import detect_format, missing_library, store_suffix
from unistore.storage.location import Location
from unistore.storage.store import TensorStore, open_store

__all__ = ["JASPERSteeringDataset", "ARRAY_KEYS", "STEERING_VARIANTS", "compute_steering_probs", "MMAP_AUTO_BYTES",
           "convert_pt_to_hdf5", "copy_dataset"]

log = logging.getLogger("unistore")

#: ``use_mmap=None`` memory-maps datasets whose arrays add up to more than this (10 GiB), as documented.
MMAP_AUTO_BYTES = 10 * 1024**3

#: Logical array -> its key in the HDF5 layout.  The PT layout's keys are the logical names (file stems).
ARRAY_KEYS: dict[str, str] = {
    "question_embs": "embeddings/questions",
    "source_embs": "embeddings/sources",
    "keyword_embs": "embeddings/keywords",
    "centroid_embs": "embeddings/centroids",
    "pair_index": "pair_data/index",
    "pair_cluster_id": "pair_data/cluster_id",
    "pair_relevance": "pair_data/relevance",
    "pair_keyword_ids": "pair_data/keyword_ids",
    "hard_negatives": "negatives/hard",
    "negative_tiers": "negatives/tiers",
    "steering_centroid": "steering/centroid",
    "steering_keyword_weighted": "steering/keyword_weighted",
    "steering_residual": "steering/residual",
    "centroid_distances": "steering/distances",
    "train_idx": "splits/train",
    "val_idx": "splits/val",
    "test_idx": "splits/test",
}
#: Arrays a dataset may lack: they only serve the keyword-id integrity check.
OPTIONAL = ("keyword_embs", "pair_keyword_ids")
SPLITS = ("train", "val", "test")
STEERING_VARIANTS = ("none", "centroid", "keyword_weighted", "residual")
_STEERING_ARRAYS = {1: "steering_centroid", 2: "steering_keyword_weighted", 3: "steering_residual"}
#: Arrays no batch reads: they are only checked (sizes, keyword ids), never loaded.
_UNBATCHED = ("keyword_embs", "centroid_embs")
#: Arrays whose rows are gathered per batch to find other rows; kept as numpy on the CPU.
_INDEX_ARRAYS = ("pair_index", "hard_negatives")
_GROUPS = {"embeddings": "embeddings", "pair_data": "pair data", "negatives": "negatives",
           "steering": "steering tensors", "splits": "split indices"}
_FORMATS = ("auto", "pt", "hdf5", "zarr", "safetensors", "npy")
#: ``storage_format`` -> the store's name inside ``dataset_dir`` (``None``: the directory itself).
#: The PT layout of the seed document is the directory's own ``.pt`` files, and npy is a directory store.
_STORE_NAMES: dict[str, str | None] = {fmt: None if fmt == "pt" else ("dataset" + store_suffix(fmt) if store_suffix(fmt)
                                                                      else None) for fmt in _FORMATS[1:]}

_CURRICULUM = np.array([
    [0.7, 0.2, 0.1, 0.0],
    [0.5, 0.3, 0.15, 0.05],
    [0.3, 0.3, 0.25, 0.15],
    [0.1, 0.3, 0.35, 0.25],
    [0.0, 0.2, 0.4, 0.4],
])


def compute_steering_probs(epoch: int) -> np.ndarray:
    """Probabilities of the steering variants (none, centroid, keyword_weighted, residual) at ``epoch``.

    ::

        Epoch   | None | Centroid | Keyword | Residual
        0-9     | 0.7  | 0.2      | 0.1     | 0.0
        10-19   | 0.5  | 0.3      | 0.15    | 0.05
        20-29   | 0.3  | 0.3      | 0.25    | 0.15
        30-39   | 0.1  | 0.3      | 0.35    | 0.25
        40+     | 0.0  | 0.2      | 0.4     | 0.4
    """
    return _CURRICULUM[min(max(int(epoch), 0) // 10, len(_CURRICULUM) - 1)].copy()


def _child(location: Location, name: str) -> Location:
    return Location(posixpath.join(location.url.rstrip("/"), name), location.storage_options)


def _find_store(dataset_dir: Location, storage_format: str) -> tuple[Location, str]:
    """Where the dataset's arrays are and in which format."""
    if storage_format not in _FORMATS:
        raise ValueError(f"storage_format must be one of {_FORMATS}, got {storage_format!r}")
    if not dataset_dir.is_local:  # listings are cached per filesystem; the dataset may be newer than the cache
        dataset_dir.fs.invalidate_cache(dataset_dir.path)
    if not dataset_dir.exists():
        raise DatasetNotFoundError(f"dataset directory {dataset_dir.url} does not exist")
    if not dataset_dir.isdir():  # the dataset is one file store (dataset.h5 or a .safetensors)
        found = detect_format(dataset_dir)
        if storage_format not in ("auto", found):
            raise DatasetNotFoundError(f"{dataset_dir.url} is a {found} store, not {storage_format}")
        return dataset_dir, found
    names = {posixpath.basename(p.rstrip("/")) for p in dataset_dir.fs.ls(dataset_dir.path, detail=False)}
    wanted = ("hdf5", "zarr", "safetensors", "pt", "npy") if storage_format == "auto" else (storage_format,)
    unreadable: list[Exception] = []  # "auto": a layout whose library is missing falls back to the next one
    for fmt in wanted:
        name = _STORE_NAMES[fmt]
        present = (name in names) if name is not None else any(n.endswith(f".{fmt}") for n in names)
        if not present:
            continue
        missing = missing_library(fmt) if storage_format == "auto" else None
        if missing is not None:
            log.info("%s: %s skipped (%s)", dataset_dir.url, name or f"the .{fmt} files", missing)
            unreadable.append(missing)
            continue
        return (_child(dataset_dir, name), fmt) if name is not None else (dataset_dir, fmt)
    if unreadable:
        raise unreadable[0]
    try:  # the directory itself is a store: a zarr group, or a unistore-written npy/pt directory with subgroups
        itself: str | None = detect_format(dataset_dir)
    except UnknownFormatError:
        itself = None
    if itself is not None and storage_format in ("auto", itself):
        return dataset_dir, itself
    where = f"{_STORE_NAMES[storage_format]} in " if _STORE_NAMES.get(storage_format) else ""
    kind = "dataset.h5, dataset.zarr, dataset.safetensors, .pt or .npy files" if storage_format == "auto" else (
        f"{where}{storage_format} files")
    raise DatasetNotFoundError(f"no JASPER dataset in {dataset_dir.url}: expected {kind} "
                               f"(found: {', '.join(sorted(names)[:10]) or 'nothing'})")


def _resolve_keys(store: TensorStore, split: str) -> dict[str, str]:
    """Logical name -> key in ``store`` (PT names or HDF5 group names), checking nothing needed is missing."""
    keys: dict[str, str] = {}
    needed = [n for n in ARRAY_KEYS if not n.endswith("_idx")] + [f"{split}_idx"]
    missing = []
    for name in needed:
        for candidate in (name, ARRAY_KEYS[name]):
            if candidate in store:
                keys[name] = candidate
                break
        else:
            if name not in OPTIONAL:
                missing.append(name)
    if f"{split}_idx" in missing:
        raise DatasetNotFoundError(f"split {split!r} not found in {store.location.url}: no {split}_idx.pt "
                                   f"or splits/{split} array")
    if missing:
        shown = ", ".join(f"{n} ({ARRAY_KEYS[n]})" for n in missing)
        raise DatasetNotFoundError(f"{store.location.url} lacks arrays the JASPER dataset needs: {shown}")
    return keys


class JASPERSteeringDataset(StoreDataset):
    """JASPER training pairs with hard negatives and curriculum-selected steering.

    ``dataset[i]`` is a dict with ``question_emb [D]``, ``target_source_emb [D]``,
    ``steering [D]``, ``negative_embs [n_neg, D]``, ``cluster_id`` (long),
    ``relevance``, ``centroid_distance`` (float32), ``steering_variant`` (long,
    0-3) and ``negative_tiers [n_neg]`` (long); a DataLoader batch stacks them.

    Args:
        dataset_dir: directory (or URL) of the dataset: the PT layout, ``dataset.h5``,
            ``dataset.zarr``, ``dataset.safetensors`` or ``.npy`` files; or a store URL itself.
        split: ``"train"``, ``"val"`` or ``"test"``.
        epoch: initial epoch of the curriculum.
        device: preload the arrays onto this device (default CPU).
        storage_format: ``"auto"`` (HDF5, then zarr, safetensors, PT, npy), or one of them.
        use_mmap: gather every batch from storage instead of preloading; ``None``
            chooses it above :data:`MMAP_AUTO_BYTES`.
        storage_options: fsspec options for remote URLs (never printed).
        seed: seeds the per-epoch choice of steering variants.

    Raises:
        DatasetNotFoundError (a ``ValueError``): the directory, a split or an array is missing.
        IntegrityError (a ``ValueError``): an index points outside the array it refers to.
        ShapeMismatchError (a ``ValueError``): arrays disagree in shape.
        MissingDependencyError (an ``ImportError``): HDF5 asked for without h5py.
    """

    def __init__(self, dataset_dir: str | os.PathLike[str], split: str, epoch: int = 0, device: Any = None,
                 storage_format: str = "auto", use_mmap: bool | None = None, *,
                 storage_options: Mapping[str, Any] | None = None, seed: int = 0):
        import torch

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.dataset_dir = Location(dataset_dir, storage_options)
        location, self.storage_format = _find_store(self.dataset_dir, storage_format)
        store = open_store(location, format=self.storage_format)
        self._keys = _resolve_keys(store, split)
        self._open_arrays(store, list(self._keys.values()))
        self.as_numpy = False
        self.split = split
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        named = {name: self.arrays[key] for name, key in self._keys.items()}
        self.config = self._read_config(store)
        total = sum(a.nbytes for a in named.values())
        if use_mmap is None:
            use_mmap = total > MMAP_AUTO_BYTES and self.device.type == "cpu"
        if use_mmap and self.device.type != "cpu":
            raise UnsupportedError(f"use_mmap=True reads batches from storage and cannot preload onto {self.device}; "
                                   "pass use_mmap=False to preload, or leave device unset")
        self.use_mmap = bool(use_mmap)
        self._split = np.asarray(named[f"{split}_idx"].read(), dtype=np.int64).reshape(-1)
        self._len = len(self._split)
        self._check_shapes(named)
        self._data: dict[str, Any] = {}
        for name, arr in named.items():
            if name.endswith("_idx") or name in _UNBATCHED:
                continue
            if self.use_mmap or isinstance(arr, RaggedArray):
                self._data[name] = arr
            elif name in _INDEX_ARRAYS:
                self._data[name] = np.asarray(arr.read(), dtype=np.int64)
            elif self.device.type == "cpu":  # numpy fancy indexing gathers faster than torch's on the CPU
                self._data[name] = arr.read()
            else:
                self._data[name] = arr.read(as_tensor=True).to(self.device)
        self._validate()
        self._forced: int | None = None
        self.epoch = 0
        self.set_epoch(epoch)
        log.info("JASPER %s split of %s: %d pairs, %s, %.1f MB in memory", split, self.dataset_dir.url, len(self),
                 "memory-mapped" if self.use_mmap else f"preloaded on {self.device}", self._compute_memory_usage())

    # ----------------------------------------------------------- set-up
    def _read_config(self, store: TensorStore) -> dict[str, Any]:
        """``config.json`` beside the arrays, else the store's ``config`` attr, else ``{}``."""
        path = _child(self.dataset_dir, "config.json")
        if self.dataset_dir.isdir() and path.exists():
            try:
                config = json.loads(path.fs.cat_file(path.path))
            except ValueError as e:
                raise ShapeMismatchError(f"{path.url} is not valid JSON ({e})") from e
            return dict(config)
        return dict(store.attrs.get("config") or {})

    def _check_shapes(self, named: Mapping[str, Array | RaggedArray]) -> None:
        def fail(text: str) -> None:
            raise ShapeMismatchError(f"{self.store.location.url}: {text}")

        q = named["question_embs"]
        if len(q.shape) != 2:
            fail(f"question_embs must be 2-D [N_questions, D], got shape {q.shape}")
        dim = q.shape[1]
        n_pairs = named["pair_index"].shape[0]
        for name, arr in named.items():
            if name.endswith("_embs") and (len(arr.shape) != 2 or arr.shape[1] != dim):
                fail(f"{name} has shape {arr.shape}; every embedding array needs D={dim} columns")
            if name.startswith(("pair_", "steering_", "hard_", "negative_", "centroid_dist")) and len(arr) != n_pairs:
                fail(f"{name} has {len(arr)} rows but pair_index has {n_pairs}")
            if name.startswith("steering_") and arr.shape[1:] != (dim,):
                fail(f"{name} has shape {arr.shape}; expected [{n_pairs}, {dim}]")
        if named["pair_index"].shape[1:] != (2,):
            fail(f"pair_index has shape {named['pair_index'].shape}; expected [N_pairs, 2]")
        neg, tiers = named["hard_negatives"], named["negative_tiers"]
        if len(neg.shape) != 2 or neg.shape != tiers.shape:
            fail(f"hard_negatives {neg.shape} and negative_tiers {tiers.shape} must both be [N_pairs, n_neg]")
        for key, value in (("embedding_dim", dim), ("n_neg", neg.shape[1])):
            if key in self.config and int(self.config[key]) != value:
                fail(f"config.json says {key}={self.config[key]}, the arrays have {value}")
        self.embedding_dim = dim
        self.n_neg = neg.shape[1]
        self.n_clusters = named["centroid_embs"].shape[0]
        self.n_pairs = n_pairs

    def _validate(self) -> None:
        """Referential integrity: every stored index points inside the array it refers to."""
        sizes = {name: len(self.arrays[key]) for name, key in self._keys.items()}
        _check_range(f"{self.split}_idx", self._split, sizes["pair_index"], "pair_index")
        checks = [("pair_index", 0, "question_embs"), ("pair_index", 1, "source_embs"),
                  ("hard_negatives", None, "source_embs"), ("pair_cluster_id", None, "centroid_embs")]
        if "pair_keyword_ids" in self._keys and "keyword_embs" in self._keys:
            checks.append(("pair_keyword_ids", None, "keyword_embs"))
        for name, column, target in checks:
            source = self._data[name]
            if isinstance(source, RaggedArray):
                _check_ragged(name, source, sizes[target], target)
            else:
                _check_range(name, source, sizes[target], target, column)

    # ----------------------------------------------------------- batches
    def _rows(self, name: str, idx: np.ndarray) -> Any:
        """Rows ``idx`` of a float/label array as a tensor on ``self.device``."""
        import torch

        src = self._data[name]
        if isinstance(src, torch.Tensor):
            return src[torch.from_numpy(idx).to(src.device)]
        if isinstance(src, np.ndarray):
            return to_tensor(src[idx])
        return src.take(idx, as_tensor=True).to(self.device)

    def _index_rows(self, name: str, idx: np.ndarray) -> np.ndarray:
        src = self._data[name]
        return np.asarray(src[idx] if isinstance(src, np.ndarray) else src.take(idx), dtype=np.int64)

    def sample_rows(self) -> tuple[np.ndarray | None, list[Any]] | None:
        """The split's pairs and the per-pair arrays read from storage (None when the arrays are preloaded)."""
        per_pair = [src for name, src in self._data.items()
                    if name not in ("question_embs", "source_embs") and isinstance(src, Array)]
        return (self._split, per_pair) if self.use_mmap and per_pair else None

    def _get_batch(self, indices: np.ndarray) -> dict[str, Any]:
        import torch

        from unistore.storage.array import normalize_indices

        idx = normalize_indices(indices, len(self), f"{self.split} split")
        pairs = self._split[idx]
        b = len(pairs)
        qs = self._index_rows("pair_index", pairs)
        negatives = self._index_rows("hard_negatives", pairs)
        sources = self._rows("source_embs", np.concatenate([qs[:, 1], negatives.reshape(-1)]))  # one gather
        question = self._rows("question_embs", qs[:, 0])
        variants = self._variants[idx]
        steering = torch.zeros((b, self.embedding_dim), dtype=question.dtype, device=self.device)
        for variant, name in _STEERING_ARRAYS.items():
            sel = np.flatnonzero(variants == variant)
            if sel.size:
                steering[torch.from_numpy(sel).to(self.device)] = self._rows(name, pairs[sel]).to(question.dtype)
        return {
            "question_emb": question,
            "target_source_emb": sources[:b],
            "steering": steering,
            "negative_embs": sources[b:].reshape(b, self.n_neg, self.embedding_dim),
            "cluster_id": self._rows("pair_cluster_id", pairs).long(),
            "relevance": self._rows("pair_relevance", pairs).float(),
            "centroid_distance": self._rows("centroid_distances", pairs).float(),
            "steering_variant": torch.from_numpy(variants.astype(np.int64)).to(self.device),
            "negative_tiers": self._rows("negative_tiers", pairs).long(),
        }

    # ----------------------------------------------------------- curriculum
    def set_epoch(self, epoch: int) -> None:
        """Use the curriculum of ``epoch``: a steering variant per sample, drawn from ``(seed, epoch)``.

        The draw does not depend on batch size, worker count or order, so every
        process that sets the same epoch serves the same variants.
        """
        self.epoch = int(epoch)
        if self._forced is not None:
            self._variants = np.full(len(self), self._forced, dtype=np.int8)
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        drawn = rng.choice(len(STEERING_VARIANTS), size=len(self), p=compute_steering_probs(epoch))
        self._variants = drawn.astype(np.int8)

    def force_steering(self, variant: str | None) -> None:
        """Always serve ``variant``; ``None`` resumes the curriculum.

        Variants: ``"none"``, ``"centroid"``, ``"keyword_weighted"``, ``"residual"``.

        Raises:
            ValueError: an unknown variant.
        """
        if variant is not None and variant not in STEERING_VARIANTS:
            raise ValueError(f"steering variant must be one of {STEERING_VARIANTS} or None, got {variant!r}")
        self._forced = None if variant is None else STEERING_VARIANTS.index(variant)
        self.set_epoch(self.epoch)

    def get_steering_stats(self) -> dict[str, Any]:
        """``{'epoch', 'probs', 'variant_names', 'forced', 'counts'}`` of the current curriculum."""
        probs = compute_steering_probs(self.epoch)
        if self._forced is not None:
            probs = np.eye(len(STEERING_VARIANTS))[self._forced]
        return {"epoch": self.epoch, "probs": probs.tolist(), "variant_names": list(STEERING_VARIANTS),
                "forced": None if self._forced is None else STEERING_VARIANTS[self._forced],
                "counts": np.bincount(self._variants, minlength=len(STEERING_VARIANTS)).tolist()}

    def subset_by_cluster(self, cluster_ids: Sequence[int]) -> Any:
        """A ``torch.utils.data.Subset`` of the samples whose pair belongs to one of ``cluster_ids``."""
        from torch.utils.data import Subset

        clusters = self._rows("pair_cluster_id", self._split).cpu().numpy()  # the split's pairs only
        positions = np.flatnonzero(np.isin(clusters, np.asarray(list(cluster_ids))))
        return Subset(self, positions.tolist())

    # ----------------------------------------------------------- reports
    def _compute_memory_usage(self) -> float:
        """MB this dataset holds in process memory (memory-mapped arrays count nothing)."""
        return sum(self.memory_report()["bytes"].values()) / 1024**2

    def memory_report(self) -> dict[str, Any]:
        """Bytes held in memory per group (embeddings, pairs, negatives, steering, splits) and the mode."""
        import torch

        groups = {"embeddings": 0, "pairs": 0, "negatives": 0, "steering": 0, "splits": 0}
        group_of = {"pair_data": "pairs", "negatives": "negatives", "steering": "steering",
                    "embeddings": "embeddings"}
        for name, src in self._data.items():
            held = src.nbytes if isinstance(src, np.ndarray) else (
                src.element_size() * src.nelement() if isinstance(src, torch.Tensor) else 0)
            groups[group_of[ARRAY_KEYS[name].split("/")[0]]] += int(held)
        groups["splits"] = int(self._split.nbytes + self._variants.nbytes)
        return {"mode": "mmap" if self.use_mmap else "preloaded", "device": str(self.device),
                "storage_format": self.storage_format, "bytes": groups,
                "stored_bytes": sum(self.arrays[k].nbytes for k in self._keys.values())}

    def __repr__(self) -> str:
        return (f"<JASPERSteeringDataset {self.dataset_dir.url} split={self.split} pairs={len(self)} "
                f"format={self.storage_format} mmap={self.use_mmap}>")

    @staticmethod
    def convert_pt_to_hdf5(dataset_dir: str | os.PathLike[str], compression: str | None = "gzip",
                           **options: Any) -> dict[str, Any]:
        """Write ``dataset_dir/dataset.h5`` from the PT files beside it; see :func:`convert_pt_to_hdf5`."""
        return convert_pt_to_hdf5(dataset_dir, compression, **options)


_BLOCK_ROWS = 1 << 20


def _blocks(source: Any) -> Any:
    """``(first row, block)`` pairs of an in-memory array, tensor or store array, a bounded block at a time."""
    if isinstance(source, np.ndarray):
        yield 0, source
        return
    if hasattr(source, "cpu"):
        yield 0, source.cpu().numpy()
        return
    for start in range(0, len(source), _BLOCK_ROWS):
        yield start, np.asarray(source[start:start + _BLOCK_ROWS])


def _check_range(name: str, source: Any, size: int, target: str, column: int | None = None) -> None:
    """Raise :class:`IntegrityError` naming the first entry of ``source`` outside ``[0, size)``."""
    for first, block in _blocks(source):
        values = block if column is None else block[:, column]
        if values.size == 0:
            continue
        if int(values.min()) >= 0 and int(values.max()) < size:
            continue
        bad = np.argwhere((values < 0) | (values >= size))[0]
        where = (first + int(bad[0]),) + tuple(int(b) for b in bad[1:])
        if column is not None:
            where = (where[0], column)
        value = values[tuple(bad)]
        raise IntegrityError(f"{name}[{', '.join(map(str, where))}] = {value} is out of range: {target} has {size} "
                             f"rows; the dataset's index arrays disagree with its embeddings - rebuild it")


def _check_ragged(name: str, source: RaggedArray, size: int, target: str) -> None:
    values = np.asarray(source.values.read()).reshape(-1)
    if values.size == 0 or (int(values.min()) >= 0 and int(values.max()) < size):
        return
    flat = int(np.flatnonzero((values < 0) | (values >= size))[0])
    row = int(np.searchsorted(source.offsets, flat, side="right")) - 1
    raise IntegrityError(f"{name}[{row}] holds {values[flat]}, out of range: {target} has {size} rows; "
                         "the dataset's keyword ids disagree with its keyword embeddings - rebuild it")


def convert_pt_to_hdf5(dataset_dir: str | os.PathLike[str], compression: str | None = "gzip", *,
                       storage_options: Mapping[str, Any] | None = None, overwrite: bool = True,
                       verbose: bool = True) -> dict[str, Any]:
    """Write the PT dataset in ``dataset_dir`` as ``dataset_dir/dataset.h5`` in the documented group layout.

    The ``.pt`` files are kept.  The copy goes through :func:`unistore.convert`,
    so it is atomic: a failed conversion leaves no ``dataset.h5`` (or the
    previous one).  Prints the documented progress lines and size report, and
    returns ``{"path", "pt_bytes", "hdf5_bytes", "saving"}``.

    Raises:
        DatasetNotFoundError: no PT dataset in ``dataset_dir``.
        UnsupportedError: a compression HDF5 does not have (``gzip``, ``lzf`` or ``None``).
    """
    from unistore.storage.convert import convert, store_size
    from unistore.storage.formats.base import list_members

    root = Location(dataset_dir, storage_options)
    src, _ = _find_store(root, "pt")
    store = open_store(src, format="pt")
    missing = [name for name in ARRAY_KEYS if name not in store and name not in OPTIONAL]
    if missing:
        raise DatasetNotFoundError(f"{root.url} is not a complete PT dataset: missing {', '.join(missing)}.pt")
    keys = [name for name in ARRAY_KEYS if name in store] + [k for k in store.keys() if k not in ARRAY_KEYS]
    dst = _child(root, "dataset.h5")
    say = print if verbose else (lambda *a, **k: None)
    say(f"Converting PT format to HDF5 in {root.url}")
    seen: list[str] = []

    def announce(key: str) -> None:
        group = _GROUPS.get(ARRAY_KEYS.get(key, "").split("/")[0], "other arrays")
        if group not in seen:
            seen.append(group)
            say(f"Converting {group}...")

    convert(src, dst, format="hdf5", compression=compression, src_format="pt", keys=keys, rename=ARRAY_KEYS,
            on_array=announce, overwrite=overwrite)
    pt_bytes = sum(size for _, size in list_members(src, ".pt").values())
    h5_bytes = store_size(dst)
    saving = 100.0 * (1 - h5_bytes / pt_bytes) if pt_bytes else 0.0
    say(f"Conversion complete. HDF5 file saved to {dst.url}")
    say(f"File sizes: PT format={pt_bytes / 1024**2:.1f} MB, HDF5={h5_bytes / 1024**2:.1f} MB "
        f"(compression: {saving:.1f}%)")
    return {"path": dst.url, "pt_bytes": pt_bytes, "hdf5_bytes": h5_bytes, "saving": saving}


def copy_dataset(dataset_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], storage_format: str,
                 compression: str | None = None, chunks: tuple[int, ...] | None = None, *,
                 storage_options: Mapping[str, Any] | None = None,
                 out_storage_options: Mapping[str, Any] | None = None) -> str:
    """Copy the JASPER dataset in ``dataset_dir`` into a new dataset directory ``out_dir`` in ``storage_format``.

    The copy is laid out as the class finds it: the arrays in ``out_dir`` itself
    for ``"pt"`` / ``"npy"``, in ``out_dir/dataset.h5`` / ``dataset.zarr`` /
    ``dataset.safetensors`` otherwise, with ``config.json`` beside them.  Any
    filesystem at either end; written through :func:`unistore.convert`, so
    atomically.  Returns ``out_dir``'s URL.

    Raises:
        DatasetNotFoundError: no JASPER dataset in ``dataset_dir``.
        StoreExistsError: the destination store exists.
    """
    from unistore.storage.convert import convert

    if storage_format not in _STORE_NAMES:
        raise ValueError(f"storage_format must be one of {sorted(_STORE_NAMES)}, got {storage_format!r}")
    root = Location(dataset_dir, storage_options)
    src, src_format = _find_store(root, "auto")
    out = Location(out_dir, out_storage_options)
    name = _STORE_NAMES[storage_format]
    dst = _child(out, name) if name else out
    convert(src, dst, storage_format, compression=compression, chunks=chunks, src_format=src_format)
    config = _child(root, "config.json")
    if root.isdir() and config.exists():
        out.fs.pipe_file(f"{out.path.rstrip('/')}/config.json", config.fs.cat_file(config.path))
    return out.url
