"""Training histories as columnar arrays in TensorStores, referenced from the catalog.

A history is a list of immutable *segment* stores (HDF5 or zarr, on any
filesystem), each holding a run of rows: an ``epoch`` array and one float64
array per metric.  The catalog's ``training_history_refs`` row says which
segments make up the history, how many rows it has and the per-metric summary
statistics, all updated in one transaction per write:

- a crash (even ``kill -9``) while appending leaves the history exactly as it
  was after the last committed append: an unfinished segment is never
  published, and a published one the catalog does not list is never read;
- reading the last epochs touches only the segments (and chunks) that hold
  them;
- summary statistics are read from the catalog without touching any array.

Many appends make many small segments; past :data:`MAX_SEGMENTS` the newest
:data:`MERGE_SEGMENTS` are merged into one (so segment counts stay small and
rewrites stay proportional to what was appended recently).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unistore.errors import (
    ArrayNotFoundError,
    InvalidKeyError,
    NonFiniteMetricError,
    ShapeMismatchError,
    StoreExistsError,
)
from unistore.storage.location import Location, validate_key

__all__ = ["TimeSeriesConfig", "TimeSeriesStorage", "HistoryNotFoundError", "NonFiniteMetricError",
           "MAX_SEGMENTS", "MERGE_SEGMENTS", "CHUNK_ROWS"]

#: Rows per chunk of every segment array: reading a few epochs decodes at most a chunk or two per metric.
CHUNK_ROWS = 4096
#: A history with this many segments merges its newest :data:`MERGE_SEGMENTS` into one.
MAX_SEGMENTS = 32
MERGE_SEGMENTS = 16
EPOCH = "epoch"


class HistoryNotFoundError(ArrayNotFoundError):
    """No training history is stored under that key."""


@dataclass
class TimeSeriesConfig:
    """Where and how training histories are stored.

    Args:
        storage_dir: directory or URL (``s3://bucket/histories``) for the segment stores.
        use_hdf5: HDF5 segments (``.h5``) when true, zarr v3 (``.zarr``) otherwise.
        compression: ``"gzip"`` (both), ``"lzf"`` (HDF5), ``"zstd"`` (zarr) or ``None``.
        catalog_url: the catalog holding the references (default:
            :func:`unistore.schemas.engine.default_catalog_url`).
        storage_options: fsspec options for a remote ``storage_dir`` (never stored or printed).
    """

    storage_dir: str = "timeseries"
    use_hdf5: bool = True
    compression: str | None = "gzip"
    catalog_url: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


def _rows_to_columns(rows: Any) -> dict[str, np.ndarray]:
    """Columns (``epoch`` int64 when given, metrics float64) from a list of dicts or a mapping of sequences."""
    if isinstance(rows, Mapping):
        columns = {str(k): np.asarray(v) for k, v in rows.items()}
        lengths = {k: v.shape for k, v in columns.items()}
        if len({s[:1] for s in lengths.values()}) > 1 or any(len(s) != 1 for s in lengths.values()):
            raise ShapeMismatchError(f"history columns must be 1-D and of one length, got {lengths}")
    else:
        rows = list(rows)
        names: list[str] = []
        for row in rows:
            if not isinstance(row, Mapping):
                raise ShapeMismatchError(f"a history row must be a dict of metric -> value, got {type(row).__name__}")
            names.extend(k for k in row if k not in names)
        columns = {name: np.array([row.get(name, np.nan) for row in rows], dtype=np.float64 if name != EPOCH
                                  else None) for name in names}
    out: dict[str, np.ndarray] = {}
    for name, values in columns.items():
        if name != EPOCH:
            _check_metric_name(name)
        try:
            out[name] = values.astype(np.int64 if name == EPOCH else np.float64)
        except (TypeError, ValueError) as e:
            raise ShapeMismatchError(f"history column {name!r} is not numeric ({e})") from e
        if name == EPOCH and not np.array_equal(out[name], values.astype(np.float64)):
            raise ShapeMismatchError("history column 'epoch' must hold whole numbers")
        if name != EPOCH and np.isinf(out[name]).any():
            bad = int(np.flatnonzero(np.isinf(out[name]))[0])
            raise NonFiniteMetricError(f"metric {name!r} is {out[name][bad]} at row {bad}; histories store finite "
                                       "values, or NaN for 'not logged at this epoch'")
    return out


def _check_metric_name(name: str) -> None:
    try:
        validate_key(name)
    except InvalidKeyError as e:
        raise InvalidKeyError(f"metric name {name!r} cannot be stored: {e}") from e
    if "/" in name:
        raise InvalidKeyError(f"metric name {name!r} may not contain '/'")


def _merge_stats(stats: dict[str, Any], epochs: np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
    """Fold the new rows into the running per-metric statistics (in place)."""
    for name, values in columns.items():
        if name == EPOCH:
            continue
        s = stats.setdefault(name, {"count": 0, "sum": 0.0, "min": None, "max": None, "argmin_epoch": None,
                                    "argmax_epoch": None, "last": None, "last_epoch": None,
                                    "first_epoch": None})
        ok = ~np.isnan(values)
        if not ok.any():
            continue
        vals, eps = values[ok], epochs[ok]
        if s["first_epoch"] is None:
            s["first_epoch"] = int(eps[0])
        lo, hi = int(np.argmin(vals)), int(np.argmax(vals))
        if s["min"] is None or vals[lo] < s["min"]:
            s["min"], s["argmin_epoch"] = float(vals[lo]), int(eps[lo])
        if s["max"] is None or vals[hi] > s["max"]:
            s["max"], s["argmax_epoch"] = float(vals[hi]), int(eps[hi])
        s["count"] += int(ok.sum())
        s["sum"] += float(vals.sum())
        s["last"], s["last_epoch"] = float(vals[-1]), int(eps[-1])


class TimeSeriesStorage:
    """Store, append to and read training histories.

    >>> storage = TimeSeriesStorage(TimeSeriesConfig(storage_dir="s3://bucket/histories", use_hdf5=False,
    ...                                              compression="zstd", storage_options={...}))
    >>> key = storage.store_training_history("exp_001", [{"epoch": 0, "loss": 2.3}, {"epoch": 1, "loss": 1.8}])
    >>> storage.append_epochs(key, [{"epoch": 2, "loss": 1.5, "accuracy": 0.4}])
    >>> last, metadata = storage.retrieve_training_history(key, epochs=slice(-10, None))
    >>> storage.get_summary_statistics(key)["loss"]["min"]
    """

    def __init__(self, config: TimeSeriesConfig | None = None):
        self.config = config or TimeSeriesConfig()
        self.root = Location(self.config.storage_dir, self.config.storage_options)
        if self.config.compression not in (None, "gzip", "lzf", "zstd"):
            raise ValueError(f"compression must be gzip, lzf, zstd or None, got {self.config.compression!r}")
        from unistore.schemas.engine import default_catalog_url

        self.catalog_url = self.config.catalog_url or default_catalog_url()
        self._catalog: Any = None
        self._stores: dict[str, Any] = {}
        self._opened = 0

    # ------------------------------------------------------------- plumbing
    @property
    def catalog(self) -> Any:
        if self._catalog is None:
            from unistore.catalog import connect

            self._catalog = connect(self.catalog_url)
        return self._catalog

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

    def __enter__(self) -> TimeSeriesStorage:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def io_stats(self) -> dict[str, int]:
        """Requests and bytes read from segment stores by this object (reads only; the catalog is not counted)."""
        stats = [store.io_stats() for store in self._stores.values()]
        return {"requests": sum(s["requests"] for s in stats), "bytes": sum(s["bytes"] for s in stats),
                "stores_opened": self._opened}

    def reset_io_stats(self) -> None:
        for store in self._stores.values():
            store.reset_io_stats()
        self._opened = 0

    def _segment_url(self, key: str) -> str:
        ext = "h5" if self.config.use_hdf5 else "zarr"
        return f"{self.root.url.rstrip('/')}/{key}/seg-{uuid.uuid4().hex}.{ext}"

    def _write_segment(self, key: str, columns: Mapping[str, np.ndarray]) -> str:
        """Publish one immutable segment store (atomically) and return its URL."""
        from unistore.storage.store import create_store

        url = self._segment_url(key)
        fmt = "hdf5" if self.config.use_hdf5 else "zarr"
        n = len(columns[EPOCH])
        chunks = (max(1, min(CHUNK_ROWS, n)),)
        with create_store(url, format=fmt, storage_options=self.config.storage_options) as store:
            for name, values in columns.items():
                store.write_array(EPOCH if name == EPOCH else f"m/{name}", values, chunks=chunks,
                                  compression=self.config.compression)
        return url

    def _open_segment(self, url: str) -> Any:
        store = self._stores.get(url)
        if store is None:
            from unistore.storage.store import open_store

            store = open_store(url, storage_options=self.config.storage_options)
            self._stores[url] = store
            self._opened += 1
        return store

    def _remove_segments(self, urls: Iterable[str]) -> None:
        for url in urls:
            self._stores.pop(url, None)
            loc = Location(url, self.config.storage_options)
            try:
                loc.fs.rm(loc.path, recursive=True)
            except FileNotFoundError:
                pass

    def _ref(self, session: Any, key: str, lock: bool = False) -> Any:
        from sqlalchemy import select

        from unistore.schemas import TrainingHistoryRef

        stmt = select(TrainingHistoryRef).where(TrainingHistoryRef.key == key)
        ref = session.scalar(stmt.with_for_update() if lock else stmt)
        if ref is None:
            raise HistoryNotFoundError(f"no training history {key!r} in the catalog at {self.catalog.url}")
        return ref

    # ------------------------------------------------------------- writing
    def store_training_history(self, experiment_id: str, epoch_data: Any, metadata: Mapping[str, Any] | None = None,
                               key: str | None = None, overwrite: bool = False) -> str:
        """Store a new history for ``experiment_id``; returns its key (default: the experiment id).

        ``epoch_data`` is a list of ``{'epoch': e, metric: value, ...}`` dicts
        (a metric missing from a row is NaN there) or a mapping of columns.
        Without an ``epoch`` column rows are numbered from 0.

        Raises:
            StoreExistsError: ``key`` is taken and ``overwrite`` is false.
            NonFiniteMetricError / ShapeMismatchError / InvalidKeyError: bad rows or names.
        """
        from sqlalchemy import select

        from unistore.schemas import Experiment, TrainingHistoryRef, TrainingHistorySegment

        key = validate_key(key or str(experiment_id))
        columns = self._prepared(epoch_data, first_epoch=0)
        with self.catalog.session() as session:
            old = session.scalar(select(TrainingHistoryRef).where(TrainingHistoryRef.key == key))
            if old is not None and not overwrite:
                raise StoreExistsError(f"a training history {key!r} exists; append_epochs() to extend it, or pass "
                                       "overwrite=True to replace it")
        url = self._write_segment(key, columns) if len(columns[EPOCH]) else None
        stats: dict[str, Any] = {}
        _merge_stats(stats, columns[EPOCH], columns)
        replaced: list[str] = []
        try:
            with self.catalog.session() as session:
                experiment = session.scalar(select(Experiment).where(Experiment.name == str(experiment_id)))
                if experiment is None:
                    experiment = Experiment(name=str(experiment_id), config={}, status="created")
                    session.add(experiment)
                    session.flush()
                old = session.scalar(select(TrainingHistoryRef).where(TrainingHistoryRef.key == key))
                if old is not None:
                    if not overwrite:
                        raise StoreExistsError(f"a training history {key!r} was stored meanwhile")
                    replaced = [s.store_url for s in old.segments]
                    session.delete(old)
                    session.flush()
                ref = TrainingHistoryRef(experiment_id=experiment.id, store_url=f"{self.root.url.rstrip('/')}/{key}",
                                         key=key, n_epochs=len(columns[EPOCH]),
                                         summary=_summary(stats, columns, {}),
                                         meta=dict(metadata or {}))
                session.add(ref)
                session.flush()
                if url is not None:
                    session.add(TrainingHistorySegment(ref_id=ref.id, store_url=url, first_row=0,
                                                       n_rows=len(columns[EPOCH])))
        except BaseException:
            if url is not None:
                self._remove_segments([url])
            raise
        self._remove_segments(replaced)
        return key

    def append_epochs(self, key: str, rows: Any) -> int:
        """Append rows to the history ``key``; returns its new number of epochs.

        Crash-safe: the new rows are published as a segment store first and
        become part of the history in one catalog transaction.  Metrics may be
        new (earlier epochs read NaN for them).  Epochs must keep increasing.

        Raises:
            HistoryNotFoundError: no history ``key``.
            ShapeMismatchError: epochs that do not increase past the last stored one.
        """
        from unistore.schemas import TrainingHistorySegment

        with self.catalog.session() as session:
            ref = self._ref(session, key)
            n_before = ref.n_epochs
            last_epoch = (ref.summary or {}).get("last_epoch")
        columns = self._prepared(rows, first_epoch=(last_epoch + 1) if last_epoch is not None else n_before)
        n_new = len(columns[EPOCH])
        if n_new == 0:
            return n_before
        if last_epoch is not None and int(columns[EPOCH][0]) <= last_epoch:
            raise ShapeMismatchError(f"history {key!r} ends at epoch {last_epoch}; appended epochs must come after it, "
                                     f"got {int(columns[EPOCH][0])}")
        url = self._write_segment(key, columns)
        try:
            with self.catalog.session() as session:
                ref = self._ref(session, key, lock=True)
                if ref.n_epochs != n_before:
                    raise ShapeMismatchError(f"history {key!r} grew from {n_before} to {ref.n_epochs} epochs while "
                                             "appending; one writer per history")
                summary = dict(ref.summary or {})
                stats = {k: dict(v) for k, v in (summary.get("metrics") or {}).items()}
                _merge_stats(stats, columns[EPOCH], columns)
                ref.summary = _summary(stats, columns, summary)
                ref.n_epochs = n_before + n_new
                session.add(TrainingHistorySegment(ref_id=ref.id, store_url=url, first_row=n_before, n_rows=n_new))
                n_segments = len(ref.segments) + 1
        except BaseException:
            self._remove_segments([url])
            raise
        if n_segments > MAX_SEGMENTS:
            self._merge_tail(key)
        return n_before + n_new

    def _prepared(self, rows: Any, first_epoch: int) -> dict[str, np.ndarray]:
        columns = _rows_to_columns(rows)
        n = len(next(iter(columns.values()))) if columns else 0
        if EPOCH not in columns:
            columns = {EPOCH: np.arange(first_epoch, first_epoch + n, dtype=np.int64), **columns}
        epochs = columns[EPOCH]
        if len(epochs) > 1 and not (np.diff(epochs) > 0).all():
            bad = int(np.flatnonzero(np.diff(epochs) <= 0)[0]) + 1
            raise ShapeMismatchError(f"epochs must increase: row {bad} has epoch {int(epochs[bad])} after "
                                     f"{int(epochs[bad - 1])}")
        return columns

    def _merge_tail(self, key: str) -> None:
        """Rewrite the newest :data:`MERGE_SEGMENTS` segments as one (same rows, fewer stores)."""
        from sqlalchemy import delete

        from unistore.schemas import TrainingHistorySegment

        with self.catalog.session() as session:
            ref = self._ref(session, key)
            tail = [(s.id, s.store_url, s.first_row, s.n_rows) for s in ref.segments[-MERGE_SEGMENTS:]]
            order = list((ref.summary or {}).get("columns") or [])
        first, stop = tail[0][2], tail[-1][2] + tail[-1][3]
        columns = self._read_rows(tail, np.arange(first, stop), order)
        url = self._write_segment(key, columns)
        try:
            with self.catalog.session() as session:
                ref = self._ref(session, key, lock=True)
                current = {s.id for s in ref.segments}
                if not {t[0] for t in tail} <= current:
                    raise ShapeMismatchError(f"history {key!r} changed while merging segments")
                merged = [t[0] for t in tail]
                session.execute(delete(TrainingHistorySegment).where(TrainingHistorySegment.id.in_(merged)))
                session.add(TrainingHistorySegment(ref_id=ref.id, store_url=url, first_row=first, n_rows=stop - first))
        except BaseException:
            self._remove_segments([url])
            raise
        self._remove_segments(t[1] for t in tail)

    # ------------------------------------------------------------- reading
    def retrieve_training_history(self, key: str, epochs: slice | Sequence[int] | int | None = None,
                                  as_columns: bool = False) -> tuple[Any, dict[str, Any]]:
        """Rows of the history ``key`` and its metadata.

        ``epochs`` selects rows by position (``slice(-10, None)`` is the last
        ten; a list picks rows; ``None`` is everything).  Only the segments and
        chunks holding those rows are read.  Returns ``(rows, metadata)``: rows
        as a list of ``{'epoch': e, metric: value}`` dicts (NaN where a metric
        was not logged), or a dict of columns with ``as_columns=True``.

        Raises:
            HistoryNotFoundError: no history ``key``.
            OutOfBoundsError: a position outside the history.
        """
        from unistore.storage.array import normalize_indices

        with self.catalog.session() as session:
            ref = self._ref(session, key)
            segments = [(s.id, s.store_url, s.first_row, s.n_rows) for s in ref.segments]
            n, meta = ref.n_epochs, dict(ref.meta or {})
            order = list((ref.summary or {}).get("columns") or [])
        if epochs is None:
            positions = np.arange(n)
        elif isinstance(epochs, slice):
            positions = np.arange(n)[epochs]
        elif isinstance(epochs, (int, np.integer)):
            positions = normalize_indices([int(epochs)], n, f"history {key!r}")
        else:
            positions = normalize_indices(list(epochs), n, f"history {key!r}")
        columns = self._read_rows(segments, positions, order)
        if as_columns:
            return columns, meta
        names = list(columns)
        values = [columns[name].tolist() for name in names]
        return [dict(zip(names, row)) for row in zip(*values)], meta

    def _read_rows(self, segments: Sequence[tuple[int, str, int, int]], positions: np.ndarray,
                   order: Sequence[str]) -> dict[str, np.ndarray]:
        """Rows ``positions`` (history-wide) from the segments holding them, one take per array per segment."""
        out = {name: np.full(len(positions), np.nan) for name in order if name != EPOCH}
        out = {EPOCH: np.zeros(len(positions), dtype=np.int64), **out}
        if len(positions) == 0:
            return out
        starts = np.array([s[2] for s in segments], dtype=np.int64)
        owner = np.searchsorted(starts, positions, side="right") - 1
        for seg in np.unique(owner):
            _, url, first, _ = segments[int(seg)]
            sel = np.flatnonzero(owner == seg)
            store = self._open_segment(url)
            rows = positions[sel] - first
            out[EPOCH][sel] = store[EPOCH].take(rows)
            for name in out:
                if name != EPOCH and f"m/{name}" in store:
                    out[name][sel] = store[f"m/{name}"].take(rows)
        return out

    def get_summary_statistics(self, key: str) -> dict[str, Any]:
        """Per-metric ``min``, ``max``, ``mean``, ``last``, ``argmin_epoch``, ``argmax_epoch``, ``count``,
        ``first_epoch``, plus ``n_epochs``; read from the catalog without touching the arrays.

        Raises:
            HistoryNotFoundError: no history ``key``.
        """
        with self.catalog.session() as session:
            ref = self._ref(session, key)
            summary, n = dict(ref.summary or {}), ref.n_epochs
        stats: dict[str, Any] = {"n_epochs": n}
        for name, s in (summary.get("metrics") or {}).items():
            mean = s["sum"] / s["count"] if s["count"] else math.nan
            stats[name] = {"min": s["min"], "max": s["max"], "mean": mean, "last": s["last"],
                           "argmin_epoch": s["argmin_epoch"], "argmax_epoch": s["argmax_epoch"],
                           "count": s["count"], "first_epoch": s["first_epoch"]}
        return stats

    def list_histories(self, experiment_id: str | None = None) -> list[str]:
        """Keys of the stored histories (of one experiment, if given)."""
        from sqlalchemy import select

        from unistore.schemas import Experiment, TrainingHistoryRef

        stmt = select(TrainingHistoryRef.key).order_by(TrainingHistoryRef.key)
        if experiment_id is not None:
            stmt = stmt.join(Experiment).where(Experiment.name == str(experiment_id))
        with self.catalog.session() as session:
            return list(session.scalars(stmt))

    def delete_training_history(self, key: str) -> None:
        """Remove the history ``key``: its catalog rows, then its segment stores."""
        with self.catalog.session() as session:
            ref = self._ref(session, key)
            urls = [s.store_url for s in ref.segments]
            session.delete(ref)
        self._remove_segments(urls)


def _column_order(columns: Mapping[str, np.ndarray]) -> list[str]:
    return [EPOCH] + [c for c in columns if c != EPOCH]


def _summary(stats: dict[str, Any], columns: Mapping[str, np.ndarray], previous: Mapping[str, Any]) -> dict[str, Any]:
    """The reference's summary: statistics, column order and the last epoch stored."""
    order = list(previous.get("columns") or [])
    order += [c for c in _column_order(columns) if c not in order]
    epochs = columns[EPOCH]
    last = int(epochs[-1]) if len(epochs) else previous.get("last_epoch")
    return {**previous, "metrics": stats, "columns": order, "last_epoch": last}
