"""``ClusterLabeledDataset``: (base embedding, steering embedding, cluster label) triplets.

Embeddings are two arrays of a :class:`~unistore.TensorStore` (the seed
layout's raw ``np.memmap`` dumps, or any format on any filesystem); samples
and labels live in the catalog.  A DataLoader batch is one ``take`` per
embedding array plus one catalog query.

A seed-layout directory (``dataset.db`` with pickled labels beside
``base_embeddings.npy`` / ``steering_embeddings.npy``) is opened as it is: its
database is imported once, read-only and through the restricted unpickler,
into a catalog (``catalog.db`` in the same directory by default), reused by
later opens and imported again when ``dataset.db`` changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from unistore.datasets.base import StoreDataset
from unistore.errors import (
    ArrayNotFoundError,
    DatasetNotFoundError,
    IntegrityError,
    ShapeMismatchError,
    UnsupportedError,
)
from unistore.storage.location import Location

__all__ = ["ClusterLabeledDataset", "LABEL_TYPES", "EMBEDDING_KEYS", "default_catalog_path"]

log = logging.getLogger("unistore")

LABEL_TYPES = ("source", "steering", "combined")
EMBEDDING_KEYS = ("base_embeddings", "steering_embeddings")
#: ``datasets.kind`` of cluster-labelled datasets written by :meth:`ClusterLabeledDataset.export`.
KIND = "cluster_labeled"
_MMAP_MODES = ("r", "r+", "w+", "c")


def default_catalog_path(dataset_dir: str) -> str:
    """``catalog.db`` inside ``dataset_dir``, or a per-user cache file when that directory is not writable."""
    directory = os.path.abspath(dataset_dir)
    if os.access(directory, os.W_OK):
        return os.path.join(directory, "catalog.db")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha1(directory.encode()).hexdigest()[:12]
    os.makedirs(os.path.join(cache, "unistore", "catalogs"), exist_ok=True)
    return os.path.join(cache, "unistore", "catalogs", f"{os.path.basename(directory) or 'dataset'}-{digest}.db")


def _sqlite_path(url: str) -> str | None:
    from unistore.schemas.engine import resolve_url

    full = resolve_url(url)
    if full.startswith("sqlite:///") and full != "sqlite:///:memory:":
        return full[len("sqlite:///"):]
    return None


@contextlib.contextmanager
def _import_lock(catalog_url: str) -> Iterator[None]:
    """Serialise first imports of one SQLite catalog across processes (ranks opening the same directory)."""
    path = _sqlite_path(catalog_url)
    if path is None:  # a server database: its transactions serialise the import
        yield
        return
    import fcntl

    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fingerprint(db_path: str) -> dict[str, Any]:
    st = os.stat(db_path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _retire_import(catalog: Any, dataset_id: int, name: str, db_path: str) -> None:
    """Make room for a new import of a changed ``dataset.db``.

    An import that holds label corrections made through the catalog is kept
    under another name (nothing a user wrote is lost); one that holds only
    what ``dataset.db`` still has is dropped.
    """
    import uuid

    from sqlalchemy import delete, func, select

    from unistore.schemas import Dataset, Label, Sample

    with catalog.session() as session:
        manual = session.scalar(select(func.count()).select_from(Label).join(Sample, Label.sample_pk == Sample.id)
                                .where(Sample.dataset_id == dataset_id, Label.provenance == "manual"))
        if manual:
            kept = f"{name}@replaced-{uuid.uuid4().hex[:8]}"
            row = session.get(Dataset, dataset_id)
            assert row is not None
            row.name = kept
            row.attrs = {**(row.attrs or {}), "replaced": True}  # opened as it is, never imported into again
            log.warning("%s changed since it was imported; importing it again. The previous import holds %d label "
                        "corrections made through the catalog and is kept as dataset %r in %s", db_path, manual, kept,
                        catalog.url)
        else:
            session.execute(delete(Dataset).where(Dataset.id == dataset_id))
            log.info("%s changed since it was imported; importing it again into %s", db_path, catalog.url)


def import_seed_layout(dataset_dir: str, catalog_url: str | None = None, name: str | None = None) -> tuple[str, str]:
    """Make sure the catalog holds the current ``dataset_dir/dataset.db``; returns ``(catalog_url, name)``.

    Imports on first use, reuses the import while ``dataset.db`` is unchanged
    (same size and mtime, or same SHA-256), and imports it again when the file
    changed (keeping the previous import under another name if it holds label
    corrections).  ``dataset.db`` is only ever opened read-only.  A failed first
    import leaves no catalog file behind.

    Raises:
        DatasetNotFoundError: no ``dataset.db`` in ``dataset_dir``.
        LegacyImportError / UnsafePickleError / CorruptDataError: a bad row (nothing imported).
    """
    from sqlalchemy import select

    from unistore.migrations.legacy import import_legacy
    from unistore.schemas import Dataset, connect

    db_path = os.path.join(os.path.abspath(dataset_dir), "dataset.db")
    if not os.path.isfile(db_path):
        raise DatasetNotFoundError(f"dataset.db not found in {dataset_dir}: a ClusterLabeled dataset directory "
                                   "needs dataset.db, base_embeddings.npy and steering_embeddings.npy (for a store "
                                   "whose samples are in a catalog, pass catalog_url=)")
    catalog_url = catalog_url or default_catalog_path(dataset_dir)
    name = name or os.path.basename(os.path.abspath(dataset_dir)) or "dataset"
    sqlite_file = _sqlite_path(catalog_url)
    created = sqlite_file is not None and not os.path.exists(sqlite_file)
    try:
        with _import_lock(catalog_url):
            stamp = _fingerprint(db_path)
            catalog = connect(catalog_url)
            try:
                with catalog.session() as session:
                    ds = session.scalar(select(Dataset).where(Dataset.name == name))
                    attrs = dict(ds.attrs or {}) if ds is not None else {}
                if ds is not None and attrs.get("legacy_db") != db_path:
                    raise ShapeMismatchError(
                        f"the catalog at {catalog.url} already has a dataset {name!r} imported from "
                        f"{attrs.get('legacy_db') or 'elsewhere'}; pass dataset_name= to import {db_path} under "
                        "another name")
                if ds is not None and (attrs.get("legacy_stamp") == stamp or attrs.get("replaced")):
                    return catalog_url, name
                digest = _sha256(db_path)
                if ds is None or attrs.get("legacy_sha256") != digest:
                    if ds is not None:
                        _retire_import(catalog, ds.id, name, db_path)
                    import_legacy(db_path, catalog_url, name=name)
                with catalog.session() as session:
                    row = session.scalar(select(Dataset).where(Dataset.name == name))
                    assert row is not None
                    row.attrs = {**(row.attrs or {}), "legacy_stamp": stamp, "legacy_sha256": digest}
            finally:
                catalog.close()
    except BaseException:
        if created and sqlite_file is not None:  # nothing may be left behind by a failed first import
            for suffix in ("", "-wal", "-shm", "-journal", ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(sqlite_file + suffix)
        raise
    return catalog_url, name


class ClusterLabeledDataset(StoreDataset):
    """``(base_emb [D], steering_emb [D], label [n_clusters])`` per sample, plus metadata on request.

    Args:
        dataset_dir: a seed-layout directory (``dataset.db`` + two raw memmap
            files), or the URL of a store holding ``base_embeddings`` and
            ``steering_embeddings`` (any format, any filesystem) whose samples
            and labels are in the catalog at ``catalog_url``.
        label_type: ``"source"``, ``"steering"`` or ``"combined"``.
        return_metadata: also return a dict of sample fields and all three labels.
        mmap_mode: ``"r"`` (default) or ``"c"``: embeddings are mapped read-only either way.
        cache_size: samples kept by the LRU cache of single-item access (``dataset[i]``).
        catalog_url: the catalog (default: ``catalog.db`` beside a seed layout, else
            ``$UNISTORE_CATALOG_URL``).
        dataset_name: the dataset's name in the catalog (default: the directory's
            name, or the dataset whose store is ``dataset_dir``).
        storage_options: fsspec options for a remote store (never stored or printed).

    Batches from a DataLoader (``__getitems__``) are one gather per embedding
    array plus one catalog query and do not pass through the LRU cache.

    Raises:
        ValueError: ``label_type`` or ``mmap_mode`` is invalid.
        DatasetNotFoundError (a ``FileNotFoundError``): no ``dataset.db`` / no such dataset or store.
        ShapeMismatchError (a ``ValueError``): embedding shapes disagree with each other or ``dataset_info``.
        IntegrityError (a ``ValueError``): a sample's ``embedding_idx`` is outside the embeddings.
        LegacyImportError / UnsafePickleError (``ValueError``): a bad or malicious label blob.
    """

    def __init__(self, dataset_dir: str | os.PathLike[str], label_type: str = "combined",
                 return_metadata: bool = False, mmap_mode: str = "r", cache_size: int = 1000, *,
                 catalog_url: str | None = None, dataset_name: str | None = None,
                 storage_options: Mapping[str, Any] | None = None):
        if label_type not in LABEL_TYPES:
            raise ValueError(f"label_type must be one of {LABEL_TYPES}, got {label_type!r}")
        if mmap_mode not in _MMAP_MODES:
            raise ValueError(f"mmap_mode must be one of {_MMAP_MODES}, got {mmap_mode!r}")
        if mmap_mode in ("r+", "w+"):
            raise UnsupportedError(f"mmap_mode={mmap_mode!r} would let the dataset write its embedding files; "
                                   "unistore maps them read-only ('r' or 'c'). Write embeddings with "
                                   "unistore.create_store")
        self.label_type = label_type
        self.return_metadata = return_metadata
        self.mmap_mode = mmap_mode
        self._cache_size = int(cache_size)
        location = Location(dataset_dir, storage_options)
        seed_layout = location.is_local and os.path.isdir(location.path) and (
            os.path.isfile(os.path.join(location.path, "dataset.db")) or catalog_url is None)
        if seed_layout:
            catalog_url, dataset_name = import_seed_layout(location.path, catalog_url, dataset_name)
        self.catalog_url = catalog_url
        self._catalog: Any = None
        self._writer: Any = None
        self._pid = -1
        info, store_url, store_format = self._load_catalog(location, dataset_name)
        self.n_clusters = int(info["n_clusters"])
        if seed_layout:
            size, dim = int(info["dataset_size"]), int(info["embedding_dim"])
            raw = {k: ((size, dim), "float32") for k in EMBEDDING_KEYS}
            self._open_store_for(location, raw)
        else:
            self._open_store_for(Location(store_url or location.url, storage_options), None, store_format)
        self.as_numpy = False
        self._check_embeddings(info)
        self._init_cache()

    # ------------------------------------------------------------- set-up
    def _open_store_for(self, location: Location, raw: Mapping[str, Any] | None, fmt: str | None = "auto") -> None:
        from unistore.storage.store import open_store

        if not location.exists():
            raise DatasetNotFoundError(f"the embeddings store {location.url} does not exist")
        options: dict[str, Any] = {"raw": raw} if raw else {}
        store = open_store(location, format="npy" if raw else (fmt or "auto"), **options)
        missing = [k for k in EMBEDDING_KEYS if k not in store]
        if missing:
            raise DatasetNotFoundError(f"{location.url} lacks {', '.join(missing)}: a ClusterLabeled store needs "
                                       f"{' and '.join(EMBEDDING_KEYS)}")
        self._open_arrays(store, list(EMBEDDING_KEYS))

    def _load_catalog(self, location: Location, name: str | None) -> tuple[dict[str, str], str | None, str | None]:
        """Find the dataset; load its sample index (catalog row, sample id, embedding row per position)."""
        from sqlalchemy import select

        from unistore.schemas import Dataset, DatasetInfo, Sample

        catalog = self._conn_catalog()
        with catalog.session() as session:
            if name is None:
                candidates = session.scalars(select(Dataset).where(Dataset.store_url == location.url)).all()
                if len(candidates) != 1:
                    known = session.scalars(select(Dataset.name)).all()
                    raise DatasetNotFoundError(
                        f"no dataset in the catalog at {catalog.url} has its store at {location.url}; pass "
                        f"dataset_name= (datasets there: {', '.join(known) or 'none'})")
                ds = candidates[0]
            else:
                ds = session.scalar(select(Dataset).where(Dataset.name == name))
                if ds is None:
                    known = session.scalars(select(Dataset.name)).all()
                    raise DatasetNotFoundError(f"no dataset {name!r} in the catalog at {catalog.url} "
                                               f"(datasets there: {', '.join(known) or 'none'})")
            self.dataset_name = ds.name
            self._dataset_id = ds.id
            info = {key: value for key, value in session.execute(
                select(DatasetInfo.key, DatasetInfo.value).where(DatasetInfo.dataset_id == ds.id))}
            rows = session.execute(select(Sample.id, Sample.sample_id, Sample.embedding_idx)
                                   .where(Sample.dataset_id == ds.id).order_by(Sample.sample_id)).all()
            store_url, store_format = ds.store_url, ds.format
        if "n_clusters" not in info:
            raise ShapeMismatchError(f"dataset {ds.name!r} in {catalog.url} has no n_clusters in its dataset info")
        table = np.array(rows, dtype=np.int64).reshape(-1, 3)
        self._pks, self._sample_ids, self._embedding_idx = table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy()
        self._position = {int(s): i for i, s in enumerate(self._sample_ids.tolist())}
        self._len = len(table)
        return info, store_url, store_format

    def _check_embeddings(self, info: Mapping[str, str]) -> None:
        base, steering = (self.arrays[k] for k in EMBEDDING_KEYS)
        if len(base.shape) != 2 or base.shape != steering.shape:
            raise ShapeMismatchError(f"{self.store.location.url}: base_embeddings {base.shape} and "
                                     f"steering_embeddings {steering.shape} must both be [N, D]")
        if "embedding_dim" in info and int(info["embedding_dim"]) != base.shape[1]:
            raise ShapeMismatchError(f"{self.store.location.url}: embeddings have D={base.shape[1]}, dataset_info "
                                     f"says embedding_dim={info['embedding_dim']}")
        if len(self._embedding_idx):
            bad = np.flatnonzero((self._embedding_idx < 0) | (self._embedding_idx >= base.shape[0]))
            if bad.size:
                i = int(bad[0])
                raise IntegrityError(f"sample_id {self._sample_ids[i]} has embedding_idx {self._embedding_idx[i]}, "
                                     f"outside the {base.shape[0]} rows of {self.store.location.url}")
        self.embedding_dim = int(base.shape[1])

    def _init_cache(self) -> None:
        self._sample_cache: OrderedDict[int, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def _conn_catalog(self, write: bool = False) -> Any:
        """This process's catalog for reading (or writing), opened again after fork or in a spawned worker."""
        if self._pid != os.getpid():
            self._catalog = self._writer = None
            self._pid = os.getpid()
        attr = "_writer" if write else "_catalog"
        if getattr(self, attr) is None:
            from unistore.schemas import connect

            setattr(self, attr, connect(self.catalog_url, write_lock=write))
        return getattr(self, attr)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_catalog", "_writer", "_sample_cache", "_cache_lock"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._catalog = self._writer = None
        self._pid = -1
        self._init_cache()

    # ------------------------------------------------------------- reading
    def sample_rows(self) -> tuple[np.ndarray | None, list[Any]] | None:
        return self._embedding_idx, [self.arrays["base_embeddings"], self.arrays["steering_embeddings"]]

    def _get_batch(self, indices: np.ndarray) -> Any:
        import torch

        from unistore.schemas.labels import SAMPLE_FIELDS, labels_by_pk, samples_by_pk
        from unistore.storage.array import normalize_indices, to_tensor

        idx = normalize_indices(indices, len(self), self.dataset_name)
        rows = self._embedding_idx[idx]
        base = self.arrays["base_embeddings"].take(rows, as_tensor=True)
        steering = self.arrays["steering_embeddings"].take(rows, as_tensor=True)
        pks = self._pks[idx]
        with self._conn_catalog().engine.connect() as conn:
            if not self.return_metadata:
                label = to_tensor(labels_by_pk(conn, pks, self.label_type))
                return base, steering, label
            fields, labels = samples_by_pk(conn, pks)
        tensors = {kind: torch.from_numpy(labels[kind]) for kind in LABEL_TYPES}
        metadata = []
        for j, values in enumerate(fields):
            meta: dict[str, Any] = dict(zip(SAMPLE_FIELDS, values))
            del meta["embedding_idx"]
            meta.update({f"{kind}_label": tensors[kind][j] for kind in LABEL_TYPES})
            metadata.append(meta)
        return base, steering, tensors[self.label_type], metadata

    def __getitem__(self, index: int) -> Any:
        key = int(index) + (len(self) if int(index) < 0 else 0)
        with self._cache_lock:
            cached = self._sample_cache.get(key)
            if cached is not None:
                self._sample_cache.move_to_end(key)
                self._hits += 1
                return cached
            self._misses += 1
        sample = self.__getitems__([key])[0]
        self._remember(key, sample)
        return sample

    def _remember(self, key: int, sample: Any) -> None:
        if self._cache_size <= 0:
            return
        with self._cache_lock:
            self._sample_cache[key] = sample
            self._sample_cache.move_to_end(key)
            while len(self._sample_cache) > self._cache_size:
                self._sample_cache.popitem(last=False)

    # ------------------------------------------------------------- cache
    def get_cache_stats(self) -> dict[str, Any]:
        """``{'hits', 'misses', 'hit_rate', 'size'}`` of the single-item LRU cache in this process."""
        with self._cache_lock:
            total = self._hits + self._misses
            return {"hits": self._hits, "misses": self._misses, "hit_rate": self._hits / total if total else 0.0,
                    "size": len(self._sample_cache)}

    def prefill_cache(self, indices: Sequence[int]) -> None:
        """Read ``indices`` in one batch and keep them in the LRU cache (up to ``cache_size``)."""
        wanted = [int(i) for i in indices][-self._cache_size:] if self._cache_size > 0 else []
        if not wanted:
            return
        batch = self.__getitems__(wanted)
        for j, key in enumerate(wanted):
            self._remember(key + (len(self) if key < 0 else 0), batch[j])

    def clear_cache(self) -> None:
        """Empty the LRU cache and reset its statistics."""
        with self._cache_lock:
            self._sample_cache.clear()
            self._hits = self._misses = 0

    # ------------------------------------------------------------- samples and labels
    def get_sample_by_id(self, sample_id: int) -> dict[str, Any] | None:
        """The catalog record of ``sample_id`` (its fields and three labels as float32 arrays), or ``None``."""
        from unistore.schemas.labels import SAMPLE_FIELDS, samples_by_pk

        position = self._position.get(int(sample_id))
        if position is None:
            return None
        with self._conn_catalog().engine.connect() as conn:
            fields, labels = samples_by_pk(conn, [self._pks[position]])
        record: dict[str, Any] = dict(zip(SAMPLE_FIELDS, fields[0]))
        record.update({f"{kind}_label": labels[kind][0] for kind in LABEL_TYPES})
        return record

    def update_labels(self, sample_id: int, source_label: Any = None, steering_label: Any = None,
                      combined_label: Any = None) -> None:
        """Replace some labels of ``sample_id`` in one catalog transaction; ``None`` keeps a label.

        The sample's cached entry is dropped, so the next read (here, or in a
        worker started afterwards) returns the new labels.  ``dataset.db`` is
        not touched: corrections live in the catalog, with provenance
        ``"manual"`` and a version number.

        Raises:
            ArrayNotFoundError (a ``KeyError``): no such sample.
            ShapeMismatchError (a ``ValueError``): a label of another shape than ``(n_clusters,)``.
        """
        from unistore.schemas.labels import update_labels

        position = self._position.get(int(sample_id))
        if position is None:
            raise ArrayNotFoundError(f"no sample_id {sample_id} in dataset {self.dataset_name!r}")
        new = {"source": source_label, "steering": steering_label, "combined": combined_label}
        for kind, value in new.items():
            if value is not None and np.asarray(value).shape != (self.n_clusters,):
                raise ShapeMismatchError(f"{kind}_label for sample_id {sample_id} has shape "
                                         f"{np.asarray(value).shape}, expected ({self.n_clusters},)")
        update_labels(self._conn_catalog(write=True), self._dataset_id, int(sample_id), new, provenance="manual")
        with self._cache_lock:
            self._sample_cache.pop(position, None)

    # ------------------------------------------------------------- export
    def export(self, store_url: str, format: str, *, catalog_url: str | None = None, name: str | None = None,
               storage_options: Mapping[str, Any] | None = None, compression: str | None = None,
               chunks: tuple[int, ...] | None = None, overwrite: bool = False) -> str:
        """Copy this dataset: embeddings to a new ``format`` store at ``store_url``, samples and labels to a catalog.

        Returns the new dataset's name (``name``, default ``<this name>-<format>``);
        open it with ``ClusterLabeledDataset(store_url, catalog_url=..., dataset_name=name)``.
        The store is written atomically through :func:`unistore.convert`; its
        URL (never its credentials) is recorded in the catalog.
        """
        from unistore.storage.convert import convert

        name = name or f"{self.dataset_name}-{format}"
        catalog_url = catalog_url or self.catalog_url
        src = self.store.location
        src_options: dict[str, Any] = {}
        if self.arrays["base_embeddings"].attrs.get("raw_memmap"):  # the seed layout's headerless files
            src_options["raw"] = {k: (self.arrays[k].shape, "float32") for k in EMBEDDING_KEYS}
        convert(src.url, store_url, format, compression=compression, chunks=chunks, keys=list(EMBEDDING_KEYS),
                src_storage_options=src.storage_options, dst_storage_options=storage_options,
                src_format=self.store.format, overwrite=overwrite, **src_options)
        with self._conn_catalog().engine.connect() as conn:
            from unistore.schemas.labels import samples_by_pk

            fields, labels = samples_by_pk(conn, self._pks)
        register_cluster_labeled(catalog_url, name, store_url, format, fields, labels, self.n_clusters,
                                 self.embedding_dim, len(self.arrays["base_embeddings"]))
        return name

    def __repr__(self) -> str:
        return (f"<ClusterLabeledDataset {self.dataset_name!r} samples={len(self)} D={self.embedding_dim} "
                f"clusters={self.n_clusters} store={self.store.location.url}>")


def register_cluster_labeled(catalog_url: str | None, name: str, store_url: str, format: str,
                             fields: Sequence[tuple[Any, ...]], labels: Mapping[str, np.ndarray], n_clusters: int,
                             embedding_dim: int, n_rows: int) -> None:
    """Record a cluster-labelled dataset in the catalog: its store, info, samples and labels, in one transaction.

    ``fields`` are rows of :data:`unistore.schemas.labels.SAMPLE_FIELDS`;
    ``labels`` maps each label type to an ``(n_samples, n_clusters)`` array.

    Raises:
        StoreExistsError: the catalog already has a dataset called ``name``.
    """
    from sqlalchemy import insert, select

    from unistore.errors import StoreExistsError
    from unistore.schemas import Dataset, DatasetArray, DatasetInfo, Label, Sample, connect
    from unistore.schemas.labels import SAMPLE_FIELDS
    from unistore.storage.location import Location as Loc

    shown = Loc(store_url).url
    with connect(catalog_url) as catalog, catalog.session() as session:
        if session.scalar(select(Dataset.id).where(Dataset.name == name)) is not None:
            raise StoreExistsError(f"the catalog at {catalog.url} already has a dataset {name!r}; pick another name")
        ds = Dataset(name=name, kind=KIND, store_url=shown, format=format)
        session.add(ds)
        session.flush()
        for key, value in (("n_clusters", n_clusters), ("embedding_dim", embedding_dim), ("dataset_size", n_rows)):
            session.add(DatasetInfo(dataset_id=ds.id, key=key, value=str(value)))
        for key in EMBEDDING_KEYS:
            session.add(DatasetArray(dataset_id=ds.id, key=key, shape=[n_rows, embedding_dim], dtype="float32",
                                     format=format, nbytes=n_rows * embedding_dim * 4))
        conn = session.connection()
        if fields:
            conn.execute(insert(Sample), [{"dataset_id": ds.id, **dict(zip(SAMPLE_FIELDS, f))}
                                                    for f in fields])
            pk_of = dict(conn.execute(select(Sample.sample_id, Sample.id).where(Sample.dataset_id == ds.id)).all())
            conn.execute(insert(Label), [
                {"sample_pk": pk_of[f[0]], "kind": kind, "vector": labels[kind][j], "provenance": "export",
                 "version": 1}
                for j, f in enumerate(fields) for kind in LABEL_TYPES
            ])
