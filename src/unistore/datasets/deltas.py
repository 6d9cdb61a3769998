"""``DeltaCache``: delta embeddings per LoRA checkpoint, as arrays in TensorStores indexed by the catalog.

Each write (``put`` or ``put_many``) publishes one small store under the
cache's root holding a ``(n, hidden_size)`` float32 array ``deltas``; the
catalog's ``delta_embedding_cache`` table says which store and row holds the
delta of each checkpoint path, and the cache itself is a ``datasets`` row of
kind ``delta_cache`` (its ``hidden_size`` in the attrs).  The root may be any
URL (local, ``s3://...``); the catalog is the default one
(:func:`unistore.schemas.engine.default_catalog_url`) or any catalog URL
(PostgreSQL when several machines share one).

Publishing a store and recording its rows are ordered so that nothing is
ever half visible: the store is committed first, then the rows in one
transaction; a delta written again for the same checkpoint replaces the
previous entry in that transaction.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from unistore.errors import ShapeMismatchError
from unistore.storage.location import Location

__all__ = ["DeltaCache", "DEFAULT_HIDDEN_SIZE", "KIND", "normalize_checkpoint_path"]

log = logging.getLogger("unistore")

#: ``datasets.kind`` of delta caches
KIND = "delta_cache"
#: the hidden size assumed when a cache holds no delta yet (Qwen2.5-1.5B, as the LoRA spec documents)
DEFAULT_HIDDEN_SIZE = 1536


def normalize_checkpoint_path(path: str | os.PathLike[str]) -> str:
    """One spelling per checkpoint: absolute local paths, URLs without a trailing slash."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text:
        return text.rstrip("/")
    return os.path.abspath(text)


class DeltaCache:
    """Delta embeddings of LoRA checkpoints, keyed by checkpoint path.

    >>> cache = DeltaCache("deltas")                     # local: deltas/catalog.db holds the index
    >>> cache.put("data/teacher_checkpoints/task1", delta)          # delta: (hidden_size,) floats
    >>> cache.put_many({path: delta for path, delta in computed.items()})  # one store for all
    >>> cache.get("data/teacher_checkpoints/task1").shape
    (1536,)
    >>> cache.get_all_deltas()                           # {checkpoint path: float32 array}
    >>> DeltaCache("s3://bucket/deltas", catalog_url="postgresql://host/db", storage_options={...})

    Paths are matched in one spelling (absolute for local paths, see
    :func:`normalize_checkpoint_path`); ``get_all_deltas`` returns them as they
    were written.  The object pickles as its URLs: DataLoader workers reopen
    the catalog and stores themselves.

    Args:
        root_url: where the delta stores are written (any fsspec URL).
        catalog_url: the catalog (default:
            :func:`unistore.schemas.engine.default_catalog_url`).
        storage_options: for a remote root (credentials are never stored).
        format: format of the delta stores (``npy`` by default; any writable format).
        name: the cache's name in the catalog (default: derived from ``root_url``).

    Raises:
        ValueError: a remote root without a catalog URL.
    """

    def __init__(self, root_url: str | os.PathLike[str] = "deltas", *, catalog_url: str | None = None,
                 storage_options: Mapping[str, Any] | None = None, format: str = "npy", name: str | None = None):
        self.root = Location(root_url, storage_options)
        self.format = format
        from unistore.schemas.engine import default_catalog_url

        self.catalog_url = catalog_url or default_catalog_url()
        self.name = name or f"deltas:{self.root.url.rstrip('/')}"
        self._catalog: Any = None
        self._stores: dict[str, Any] = {}
        self._hidden_size: int | None = None

    # ------------------------------------------------------------- plumbing
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_catalog=None, _stores={})
        return state

    @property
    def catalog(self) -> Any:
        if self._catalog is None:
            from unistore.catalog import connect

            self._catalog = connect(self.catalog_url)
        return self._catalog

    def close(self) -> None:
        """Release the catalog connection (reopened on next use)."""
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None
        self._stores.clear()

    def _cache_row(self, session: Any, create: bool = False) -> Any:
        from sqlalchemy import select

        from unistore.schemas import Dataset

        ds = session.scalars(select(Dataset).where(Dataset.name == self.name)).one_or_none()
        if ds is None and create:
            ds = Dataset(name=self.name, kind=KIND, store_url=self.root.url, format=self.format, attrs={})
            session.add(ds)
            session.flush()
        elif ds is not None and ds.kind != KIND:
            raise ShapeMismatchError(f"{self.name!r} in the catalog at {self.catalog.url} is a {ds.kind!r} "
                                     "dataset, not a delta cache; pass another name=")
        return ds

    def _key(self, path: str | os.PathLike[str]) -> str:
        return hashlib.sha256(f"{self.name}\0{normalize_checkpoint_path(path)}".encode()).hexdigest()

    def _store(self, url: str) -> Any:
        from unistore.storage.store import open_store

        store = self._stores.get(url)
        if store is None:
            store = self._stores[url] = open_store(url, storage_options=self.root.storage_options)
        return store

    # ------------------------------------------------------------- queries
    @property
    def hidden_size(self) -> int | None:
        """Length of every delta in this cache (None while it is empty)."""
        if self._hidden_size is None:
            with self.catalog.session() as session:
                ds = self._cache_row(session)
                if ds is not None and ds.attrs.get("hidden_size") is not None:
                    self._hidden_size = int(ds.attrs["hidden_size"])
        return self._hidden_size

    def __len__(self) -> int:
        from sqlalchemy import func, select

        from unistore.schemas import DeltaEmbeddingCache

        with self.catalog.session() as session:
            ds = self._cache_row(session)
            if ds is None:
                return 0
            return int(session.scalar(select(func.count()).select_from(DeltaEmbeddingCache)
                                      .where(DeltaEmbeddingCache.dataset_id == ds.id)) or 0)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and bool(self.get_many([path]))

    def paths(self) -> list[str]:
        """Every checkpoint path with a delta, as written."""
        return sorted(self.get_all_deltas())

    def get(self, checkpoint_path: str | os.PathLike[str]) -> np.ndarray | None:
        """The delta of one checkpoint (float32, ``(hidden_size,)``), or None."""
        return self.get_many([checkpoint_path]).get(os.fspath(checkpoint_path))

    def get_many(self, checkpoint_paths: Iterable[str | os.PathLike[str]]) -> dict[str, np.ndarray]:
        """``{path: delta}`` for the given paths that have one (keys spelled as passed); one query, one
        ``take`` per store."""
        asked = {self._key(p): os.fspath(p) for p in checkpoint_paths}
        if not asked:
            return {}
        rows = self._rows(list(asked))
        found = self._read(rows)
        return {asked[key]: found[key] for key in asked if key in found}

    def get_all_deltas(self) -> dict[str, np.ndarray]:
        """``{checkpoint path (as written): delta}`` for the whole cache."""
        rows = self._rows(None)
        found = self._read(rows)
        return {path: found[key] for key, path, _, _, _ in rows}

    def _rows(self, keys: list[str] | None) -> list[tuple[str, str, str, str, int]]:
        from sqlalchemy import select

        from unistore.schemas import DeltaEmbeddingCache as Row

        with self.catalog.session() as session:
            ds = self._cache_row(session)
            if ds is None:
                return []
            query = select(Row.cache_key, Row.adapter_path, Row.store_url, Row.array_key, Row.row_index).where(
                Row.dataset_id == ds.id)
            out: list[tuple[str, str, str, str, int]] = []
            for start in range(0, len(keys) if keys is not None else 1, 500):
                q = query if keys is None else query.where(Row.cache_key.in_(keys[start:start + 500]))
                out.extend((r[0], r[1], r[2], r[3], int(r[4])) for r in session.execute(q.order_by(Row.id)))
            return out

    def _read(self, rows: list[tuple[str, str, str, str, int]]) -> dict[str, np.ndarray]:
        by_store: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for key, _, url, array_key, row in rows:
            by_store.setdefault((url, array_key), []).append((key, row))
        out: dict[str, np.ndarray] = {}
        for (url, array_key), members in by_store.items():
            arr = self._store(url)[array_key]
            if arr.ndim != 2 or (self.hidden_size is not None and arr.shape[1] != self.hidden_size):
                raise ShapeMismatchError(f"delta store {url} holds {array_key!r} of shape {arr.shape}, but this "
                                         f"cache's deltas are ({self.hidden_size},); the store was written by "
                                         "something else - rebuild the cache")
            values = arr.take(np.array([r for _, r in members], dtype=np.int64)).astype(np.float32, copy=False)
            for (key, _), value in zip(members, values):
                out[key] = value
        return out

    # ------------------------------------------------------------- writing
    def put(self, checkpoint_path: str | os.PathLike[str], delta: Any) -> None:
        """Store the delta of one checkpoint (replacing any earlier one).

        Raises:
            ShapeMismatchError: ``delta`` is not 1-D of the cache's ``hidden_size`` or not finite.
        """
        self.put_many({checkpoint_path: delta})

    def put_many(self, deltas: Mapping[str | os.PathLike[str], Any]) -> None:
        """Store many deltas as one store and one catalog transaction.

        Raises:
            ShapeMismatchError: a delta is not 1-D, not of the cache's ``hidden_size``
                (or of the others'), or holds NaN/inf - naming its checkpoint; nothing is written.
        """
        if not deltas:
            return
        paths = [os.fspath(p) for p in deltas]
        values = [_as_vector(p, d) for p, d in zip(paths, deltas.values())]
        hidden = self.hidden_size or values[0].shape[0]
        for path, value in zip(paths, values):
            if value.shape[0] != hidden:
                raise ShapeMismatchError(f"the delta of {path} has {value.shape[0]} values, but this cache's deltas "
                                         f"have hidden_size {hidden}; compute it with the same base model")
        url = self._write_store(np.stack(values))
        try:
            self._record(paths, url, hidden)
        except BaseException:
            self._remove_store(url)
            raise

    def _write_store(self, matrix: np.ndarray) -> str:
        from unistore.storage.formats import store_suffix
        from unistore.storage.store import create_store

        url = f"{self.root.url.rstrip('/')}/deltas-{uuid.uuid4().hex}{store_suffix(self.format)}"
        with create_store(url, format=self.format, storage_options=self.root.storage_options) as store:
            store.write_array("deltas", matrix)
            store.commit()
        return url

    def _remove_store(self, url: str) -> None:
        try:
            loc = Location(url, self.root.storage_options)
            loc.fs.rm(loc.path, recursive=True)
        except OSError as e:  # the catalog never listed it, so it is only wasted space
            log.warning("could not remove unrecorded delta store %s: %s", url, e)

    def _record(self, paths: list[str], url: str, hidden: int) -> None:
        from sqlalchemy import delete

        from unistore.schemas import DeltaEmbeddingCache as Row

        keys = [self._key(p) for p in paths]
        latest = dict(zip(keys, range(len(keys))))  # a path given twice keeps its last delta
        with self.catalog.session() as session:
            ds = self._cache_row(session, create=True)
            if ds.attrs.get("hidden_size") is None:
                ds.attrs = {**ds.attrs, "hidden_size": hidden}
            elif int(ds.attrs["hidden_size"]) != hidden:
                raise ShapeMismatchError(f"this cache's deltas have hidden_size {ds.attrs['hidden_size']}, "
                                         f"got {hidden}")
            for start in range(0, len(keys), 500):
                session.execute(delete(Row).where(Row.cache_key.in_(keys[start:start + 500])))
            session.add_all(Row(cache_key=key, dataset_id=ds.id, adapter_path=paths[i], store_url=url,
                                array_key="deltas", row_index=i) for key, i in latest.items())
        self._hidden_size = hidden

    def __repr__(self) -> str:
        return f"<unistore.datasets.DeltaCache {self.root.url} catalog={self.catalog_url!r}>"


def _as_vector(path: str, delta: Any) -> np.ndarray:
    if hasattr(delta, "detach"):
        delta = delta.detach().cpu().float().numpy()
    value = np.asarray(delta, dtype=np.float32)
    if value.ndim != 1 or value.shape[0] == 0:
        raise ShapeMismatchError(f"the delta of {path} has shape {value.shape}; a delta is one vector of "
                                 "hidden_size values")
    if not np.isfinite(value).all():
        raise ShapeMismatchError(f"the delta of {path} holds NaN or inf; recompute it")
    return value
