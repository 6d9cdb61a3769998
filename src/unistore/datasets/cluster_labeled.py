"""``ClusterLabeledDataset``: (base embedding, steering embedding, cluster label) triplets.

Embeddings are two arrays of a :class:`~unistore.TensorStore` (the seed
layout's raw ``np.memmap`` dumps, or any format on any filesystem); samples
and labels live in the catalog.  A DataLoader batch is one ``take`` per
embedding array plus one catalog query.

A seed-layout directory (``dataset.db`` with pickled labels beside
``base_embeddings.npy`` / ``steering_embeddings.npy``) is opened as it is: its
database is imported once, read-only and through the restricted unpickler,
into the catalog (the default one unless ``catalog_url`` is given), reused by
later opens and imported again when ``dataset.db`` changes; label corrections
made through the catalog keep applying to the new import.
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
    LabelCorrectionsError,
    ShapeMismatchError,
    UnsupportedError,
)
from unistore.storage.array import Array
from unistore.storage.location import Location

__all__ = ["ClusterLabeledDataset", "LABEL_TYPES", "EMBEDDING_KEYS", "import_seed_layout"]

log = logging.getLogger("unistore")

LABEL_TYPES = ("source", "steering", "combined")
EMBEDDING_KEYS = ("base_embeddings", "steering_embeddings")
#: ``datasets.kind`` of cluster-labelled datasets written by :meth:`ClusterLabeledDataset.export`.
KIND = "cluster_labeled"
_MMAP_MODES = ("r", "r+", "w+", "c")


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


def _manual_labels(session: Any, dataset_id: int) -> dict[int, dict[str, Any]]:
    """``{sample_id: {kind: vector}}`` of the labels corrected through the catalog (provenance ``manual``)."""
    from sqlalchemy import select

    from unistore.schemas import Label, Sample

    found: dict[int, dict[str, Any]] = {}
    for sid, kind, vector in session.execute(
            select(Sample.sample_id, Label.kind, Label.vector).join(Label, Label.sample_pk == Sample.id)
            .where(Sample.dataset_id == dataset_id, Label.provenance == "manual")):
        found.setdefault(int(sid), {})[kind] = vector
    return found


def _stale_error(catalog_url: str, name: str, kept: str, problems: Sequence[str]) -> LabelCorrectionsError:
    from unistore.schemas.engine import resolve_url, safe_url

    url = safe_url(resolve_url(catalog_url))
    return LabelCorrectionsError(
        f"dataset.db of {name!r} changed since its labels were corrected through unistore, and "
        f"{len(problems)} correction(s) no longer fit it ({'; '.join(problems[:5])}). They are kept in dataset "
        f"{kept!r} of the catalog {url}: save them with `unistore db export-labels {kept!r} --manual -o "
        f"corrections.json --url {url}`, then discard them with `unistore db drop-dataset {kept!r} --url {url}` "
        "and open the dataset again")


def _reimport(catalog: Any, ds_id: int, name: str, db_path: str, catalog_url: str) -> None:
    """Import a changed ``dataset.db`` again; label corrections made through the catalog keep applying.

    The previous import is renamed aside, the file imported afresh, and each
    correction applied again to the same ``sample_id`` (same label shape) in
    one transaction; the previous import is then dropped.  Corrections that no
    longer fit (their sample is gone, or the labels changed shape) keep the
    previous import, and the new one records it, so every open raises
    :class:`~unistore.errors.LabelCorrectionsError` until the user exports or
    discards them - a correction never silently stops applying.
    """
    import uuid

    from sqlalchemy import delete, select, update

    from unistore.migrations.legacy import import_legacy
    from unistore.schemas import Dataset, Label, Sample

    kept = f"{name}@replaced-{uuid.uuid4().hex[:8]}"
    with catalog.session() as session:
        corrections = _manual_labels(session, ds_id)
        if not corrections:
            session.execute(delete(Dataset).where(Dataset.id == ds_id))
        else:
            row = session.get(Dataset, ds_id)
            assert row is not None
            row.name = kept
            row.attrs = {**(row.attrs or {}), "replaced": True, "legacy_db": None, "replaced_from": db_path}
    import_legacy(db_path, catalog_url, name=name)
    if not corrections:
        log.info("%s changed since it was imported; imported it again into %s", db_path, catalog.url)
        return
    problems: list[str] = []
    applied = 0
    with catalog.session() as session:
        new_id = session.scalar(select(Dataset.id).where(Dataset.name == name))
        current = {(int(sid), kind): (pk, vec) for sid, pk, kind, vec in session.execute(
            select(Sample.sample_id, Label.sample_pk, Label.kind, Label.vector)
            .join(Label, Label.sample_pk == Sample.id)
            .where(Sample.dataset_id == new_id, Sample.sample_id.in_(list(corrections))))}
        for sid, labels in sorted(corrections.items()):
            for kind, vector in labels.items():
                found = current.get((sid, kind))
                if found is None:
                    problems.append(f"sample_id {sid} is gone")
                    continue
                if np.shape(found[1]) != np.shape(vector):
                    problems.append(f"{kind} label of sample_id {sid} is {np.shape(found[1])} now, the correction "
                                    f"{np.shape(vector)}")
                    continue
                session.execute(update(Label).where(Label.sample_pk == found[0], Label.kind == kind)
                                .values(vector=vector, provenance="manual", version=Label.version + 1))
                applied += 1
        if problems:
            row = session.get(Dataset, new_id)
            assert row is not None
            row.attrs = {**(row.attrs or {}), "stale_corrections": kept}
            log.warning("%s changed since it was imported: %d correction(s) applied again, %d no longer fit; they "
                        "are kept as dataset %r in %s", db_path, applied, len(problems), kept, catalog.url)
        else:
            session.execute(delete(Dataset).where(Dataset.id == ds_id))
            log.info("%s changed since it was imported; imported it again into %s and applied its %d label "
                     "correction(s) again", db_path, catalog.url, applied)
    if problems:
        raise _stale_error(catalog_url, name, kept, problems)


def _stray_corrections(directory: str, catalog_url: str) -> None:
    """A ``catalog.db`` inside a seed-layout directory that holds label corrections, while the default catalog
    is elsewhere: refuse to read the labels without them (name the catalog to pass)."""
    import sqlite3

    stray = os.path.join(directory, "catalog.db")
    if not os.path.isfile(stray) or os.path.abspath(_sqlite_path(catalog_url) or "") == stray:
        return
    try:
        conn = sqlite3.connect(f"file:{stray}?mode=ro", uri=True)
        try:
            manual = conn.execute("SELECT count(*) FROM labels WHERE provenance = 'manual'").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:  # not a catalog (or not one with labels): nothing of ours to lose
        return
    if manual:
        raise LabelCorrectionsError(
            f"{stray} holds {manual} label correction(s) made through unistore, but this open would read the "
            f"default catalog ({catalog_url}) without them: pass catalog_url={stray!r} (or set "
            "UNISTORE_CATALOG_URL to it) to keep using them")


def _is_store(path: str) -> bool:
    """Whether a local directory is a store (zarr metadata, or unistore's own) rather than a seed layout."""
    from unistore.storage.formats import directory_markers
    from unistore.storage.formats.base import META_NAME

    return any(os.path.exists(os.path.join(path, name)) for name in (*directory_markers(), META_NAME))


def _import_name(session: Any, db_path: str, directory: str) -> str:
    """The catalog name of ``db_path``'s import: the one already made from that file, else the directory's name,
    else (another directory of that name was imported) the name with a digest of the path."""
    from sqlalchemy import select

    from unistore.schemas import Dataset

    base = os.path.basename(directory) or "dataset"
    for ds_name, attrs in session.execute(select(Dataset.name, Dataset.attrs)):
        if (attrs or {}).get("legacy_db") == db_path:
            return str(ds_name)
    if session.scalar(select(Dataset.id).where(Dataset.name == base)) is None:
        return base
    return f"{base}-{hashlib.sha1(db_path.encode()).hexdigest()[:8]}"


def import_seed_layout(dataset_dir: str, catalog_url: str | None = None, name: str | None = None) -> tuple[str, str]:
    """Make sure the catalog holds the current ``dataset_dir/dataset.db``; returns ``(catalog_url, name)``.

    The catalog is ``catalog_url``, else the default one
    (:func:`unistore.schemas.engine.default_catalog_url`); the dataset is
    named after its directory (with a digest of the path when another
    directory of that name was imported first).  Imports on first use, reuses
    the import while ``dataset.db`` is unchanged (same size and mtime, or same
    SHA-256), and imports it again when the file changed, applying the label
    corrections made through the catalog again.  ``dataset.db`` is only ever
    opened read-only.  A failed first import leaves no catalog file behind.

    Raises:
        DatasetNotFoundError: ``dataset_dir`` or its ``dataset.db`` does not exist (nothing is created).
        LabelCorrectionsError: corrections that no longer fit a changed ``dataset.db`` (kept, not applied).
        LegacyImportError / UnsafePickleError / CorruptDataError: a bad row (nothing imported).
    """
    from sqlalchemy import select

    from unistore.catalog import connect
    from unistore.migrations.legacy import import_legacy
    from unistore.schemas import Dataset
    from unistore.schemas.engine import default_catalog_url

    directory = os.path.abspath(dataset_dir)
    db_path = os.path.join(directory, "dataset.db")
    if not os.path.isdir(directory):
        raise DatasetNotFoundError(f"dataset directory {dataset_dir} does not exist (a ClusterLabeled dataset "
                                   "directory holds dataset.db, base_embeddings.npy and steering_embeddings.npy)")
    if not os.path.isfile(db_path):
        raise DatasetNotFoundError(f"dataset.db not found in {dataset_dir}: a ClusterLabeled dataset directory "
                                   "needs dataset.db, base_embeddings.npy and steering_embeddings.npy (for a store "
                                   "whose samples are in a catalog, pass catalog_url=)")
    if catalog_url is None:
        catalog_url = default_catalog_url()
        _stray_corrections(directory, catalog_url)
    sqlite_file = _sqlite_path(catalog_url)
    created = sqlite_file is not None and not os.path.exists(sqlite_file)
    try:
        with _import_lock(catalog_url):
            stamp = _fingerprint(db_path)
            catalog = connect(catalog_url)
            try:
                with catalog.session() as session:
                    name = name or _import_name(session, db_path, directory)
                    ds = session.scalar(select(Dataset).where(Dataset.name == name))
                    attrs = dict(ds.attrs or {}) if ds is not None else {}
                    stale = attrs.get("stale_corrections")
                    if ds is not None and stale and \
                            session.scalar(select(Dataset.id).where(Dataset.name == stale)) is None:
                        ds.attrs = {k: v for k, v in attrs.items() if k != "stale_corrections"}
                        stale = None  # the kept corrections were discarded: the import applies as it is
                if stale:
                    raise _stale_error(catalog_url, name, stale, [f"see dataset {stale!r}"])
                if ds is not None and attrs.get("replaced"):  # an import kept aside: opened as it is
                    return catalog_url, name
                if ds is not None and attrs.get("legacy_db") != db_path:
                    raise ShapeMismatchError(
                        f"the catalog at {catalog.url} already has a dataset {name!r} imported from "
                        f"{attrs.get('legacy_db') or 'elsewhere'}; pass dataset_name= to import {db_path} under "
                        "another name")
                if ds is not None and attrs.get("legacy_stamp") == stamp:
                    return catalog_url, name
                digest = _sha256(db_path)
                if ds is None:
                    import_legacy(db_path, catalog_url, name=name)
                elif attrs.get("legacy_sha256") != digest:
                    _reimport(catalog, ds.id, name, db_path, catalog_url)
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


class _SampleCache:
    """The LRU cache of samples the seed document specifies (``cache_size`` samples), used by every read.

    A sample's rows live in preallocated slot arrays (one per tensor of the
    sample, allocated at the first batch), its metadata dict beside them, so a
    batch is looked up, filled and assembled with a few vectorized copies
    rather than a tensor per sample.  ``entries`` maps position -> slot in
    recency order (the dataset's ``_sample_cache``).  Hit and miss counts are
    in shared memory made before DataLoader workers start, so the counts the
    main process reports include every worker's reads.
    """

    def __init__(self, size: int):
        import multiprocessing as mp

        self.size = max(int(size), 0)
        self.entries: OrderedDict[int, int] = OrderedDict()
        self.free = list(range(self.size))
        self.rows: list[np.ndarray] | None = None
        self.extra: list[Any] = [None] * self.size
        self.lock = threading.Lock()
        self.counts = mp.get_context("spawn").Array("q", 2)  # [hits, misses] of this process and its workers

    def __getstate__(self) -> dict[str, Any]:
        from multiprocessing.context import get_spawning_popen

        # the counters travel to workers being started (shared memory); a dataset pickled otherwise counts anew
        return {"size": self.size, "counts": self.counts if get_spawning_popen() is not None else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        counts = state["counts"]
        self.__init__(state["size"])  # type: ignore[misc]
        if counts is not None:
            self.counts = counts

    def count(self, hits: int, misses: int) -> None:
        with self.counts.get_lock():
            self.counts[0] += hits
            self.counts[1] += misses

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], list[Any]]:
        """``(hit mask, the hits' rows of each part, the hits' extras)``, copied out under the lock (a slot may
        be reused by another thread right after); hits become the most recently used."""
        if not self.entries:
            return np.zeros(len(positions), dtype=bool), [], []
        with self.lock:
            got = [self.entries.get(p) for p in positions.tolist()]
            hit = np.fromiter((g is not None for g in got), dtype=bool, count=len(got))
            if not hit.any():
                return hit, [], []
            for p, g in zip(positions.tolist(), got):
                if g is not None:
                    self.entries.move_to_end(p)
            slots = np.array([g for g in got if g is not None], dtype=np.int64)
            assert self.rows is not None
            return hit, [stored[slots] for stored in self.rows], [self.extra[s] for s in slots.tolist()]

    def put(self, positions: np.ndarray, parts: Sequence[np.ndarray], extra: Sequence[Any] | None) -> None:
        """Keep samples ``positions`` (rows ``j`` of each of ``parts``), evicting the least recently used."""
        if self.size == 0 or not len(positions):
            return
        with self.lock:
            if self.rows is None:
                self.rows = [np.empty((self.size,) + p.shape[1:], p.dtype) for p in parts]
            keep: dict[int, int] = {}
            for j, p in enumerate(positions.tolist()[-self.size:], start=max(len(positions) - self.size, 0)):
                keep[p] = j  # the last copy of a repeated position
            slots, rows = [], []
            for p, j in keep.items():
                slot = self.entries.pop(p, None)
                if slot is None:
                    slot = self.free.pop() if self.free else self.entries.popitem(last=False)[1]
                self.entries[p] = slot
                slots.append(slot)
                rows.append(j)
            s, r = np.array(slots, dtype=np.int64), np.array(rows, dtype=np.int64)
            for store, part in zip(self.rows, parts):
                store[s] = part[r]
            if extra is not None:
                for slot, j in zip(slots, rows):
                    self.extra[slot] = extra[j]

    def forget(self, position: int) -> None:
        with self.lock:
            slot = self.entries.pop(position, None)
            if slot is not None:
                self.free.append(slot)
                self.extra[slot] = None

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.free = list(range(self.size))
            self.extra = [None] * self.size
        with self.counts.get_lock():
            self.counts[0] = self.counts[1] = 0


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
        catalog_url: the catalog (default:
            :func:`unistore.schemas.engine.default_catalog_url`, the same for every entry point).
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
        from unistore._optional import require

        require("sqlalchemy", "ClusterLabeledDataset (its labels live in the catalog)")
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
        if location.is_local and not os.path.exists(location.path):
            raise DatasetNotFoundError(f"dataset directory {location.path} does not exist (a ClusterLabeled "
                                       "dataset directory holds dataset.db, base_embeddings.npy and "
                                       "steering_embeddings.npy)")
        seed_layout = location.is_local and os.path.isdir(location.path) and (
            os.path.isfile(os.path.join(location.path, "dataset.db")) or not _is_store(location.path))
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
        self._cache = _SampleCache(self._cache_size)

    @property
    def _sample_cache(self) -> OrderedDict[int, int]:
        """The cached positions, least recently used first (``len()`` is the number of cached samples)."""
        return self._cache.entries

    @property
    def _cache_lock(self) -> Any:
        return self._cache.lock

    def _conn_catalog(self, write: bool = False) -> Any:
        """This process's catalog for reading (or writing), opened again after fork or in a spawned worker."""
        if self._pid != os.getpid():
            self._catalog = self._writer = None
            self._pid = os.getpid()
        attr = "_writer" if write else "_catalog"
        if getattr(self, attr) is None:
            from unistore.catalog import connect

            setattr(self, attr, connect(self.catalog_url, write_lock=write))
        return getattr(self, attr)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_catalog", "_writer"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._catalog = self._writer = None
        self._pid = -1

    # ------------------------------------------------------------- reading
    def sample_rows(self) -> tuple[np.ndarray | None, list[Any]] | None:
        return self._embedding_idx, [self.arrays["base_embeddings"], self.arrays["steering_embeddings"]]

    def _read(self, idx: np.ndarray) -> tuple[Any, ...]:
        """Samples at positions ``idx`` from storage and the catalog: one gather per array, one query."""
        import torch

        from unistore.schemas.labels import SAMPLE_FIELDS, labels_by_pk, samples_by_pk
        from unistore.storage.array import to_tensor

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
            meta.update({f"{kind}_label": tensors[kind][j].clone() for kind in LABEL_TYPES})
            metadata.append(meta)
        return base, steering, tensors[self.label_type], metadata

    def _get_batch(self, indices: np.ndarray) -> Any:
        """The batch at ``indices``: cached samples from the LRU cache, the rest read in one go and cached."""
        import torch

        from unistore.storage.array import normalize_indices

        idx = normalize_indices(indices, len(self), self.dataset_name)
        cache = self._cache
        if cache.size == 0:
            cache.count(0, len(idx))
            return self._read(idx)
        hit, cached, extras = cache.lookup(idx)
        n_hit = int(hit.sum())
        cache.count(n_hit, len(idx) - n_hit)
        if n_hit == 0:
            out = self._read(idx)
            self._keep(idx, out)
            return out
        miss = ~hit
        fetched = self._read(idx[miss]) if miss.any() else None
        parts = []
        for k, rows in enumerate(cached):
            part = np.empty((len(idx),) + rows.shape[1:], rows.dtype)
            part[hit] = rows
            if fetched is not None:
                part[miss] = fetched[k].numpy()
            parts.append(torch.from_numpy(part))
        if fetched is not None:
            self._keep(idx[miss], fetched)
        if not self.return_metadata:
            return tuple(parts)
        metadata: list[Any] = [None] * len(idx)
        for j, extra in zip(np.flatnonzero(hit).tolist(), extras):
            metadata[j] = dict(extra)
        if fetched is not None:
            for j, meta in zip(np.flatnonzero(miss).tolist(), fetched[3]):
                metadata[j] = meta
        return (*parts, metadata)

    def _keep(self, idx: np.ndarray, samples: tuple[Any, ...]) -> None:
        """Put samples ``idx`` (as :meth:`_read` returned them) into the LRU cache."""
        self._cache.put(idx, [t.numpy() for t in samples[:3]], samples[3] if self.return_metadata else None)

    def prefetch(self, indices: Any) -> None:
        """The loader's read-ahead: bring the batch's embedding rows into the storage caches (the sample cache
        and its statistics are left to the reads themselves)."""
        from unistore.datasets.base import as_index_array
        from unistore.storage.array import normalize_indices

        rows = self._embedding_idx[normalize_indices(as_index_array(indices), len(self), self.dataset_name)]
        for key in EMBEDDING_KEYS:
            arr = self.arrays[key]
            if isinstance(arr, Array):
                arr.prefetch(rows)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    # ------------------------------------------------------------- cache
    def get_cache_stats(self) -> dict[str, Any]:
        """``{'hits', 'misses', 'hit_rate', 'size'}`` of the LRU sample cache.

        Every read counts: ``dataset[i]``, DataLoader batches, and the reads
        of DataLoader workers started from this dataset (each worker has its
        own cache; their counts add up here).  ``size`` is the number of
        samples cached in this process.
        """
        with self._cache.counts.get_lock():
            hits, misses = int(self._cache.counts[0]), int(self._cache.counts[1])
        total = hits + misses
        return {"hits": hits, "misses": misses, "hit_rate": hits / total if total else 0.0,
                "size": len(self._cache.entries)}

    def prefill_cache(self, indices: Sequence[int]) -> None:
        """Read ``indices`` in one batch and keep them in the LRU cache (the last ``cache_size`` of them);
        the reads are not counted as hits or misses."""
        from unistore.storage.array import normalize_indices

        wanted = [int(i) for i in indices][-self._cache_size:] if self._cache_size > 0 else []
        if not wanted:
            return
        idx = normalize_indices(np.asarray(wanted, dtype=np.int64), len(self), self.dataset_name)
        self._keep(idx, self._read(idx))

    def clear_cache(self) -> None:
        """Empty the LRU cache and reset its statistics."""
        self._cache.clear()

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
        self._cache.forget(position)

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

    from unistore.catalog import connect
    from unistore.errors import StoreExistsError
    from unistore.schemas import Dataset, DatasetArray, DatasetInfo, Label, Sample
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
