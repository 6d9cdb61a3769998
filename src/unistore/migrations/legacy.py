"""Import a legacy ``dataset.db`` (the ClusterLabeledDataset raw SQLite layout) into the catalog.

The legacy file keeps labels as pickled numpy arrays.  They are read with
:class:`NumpyOnlyUnpickler`, which admits exactly the globals numpy uses to
rebuild an array (numpy 1.x and 2.x names, pickle protocols 2-5) and nothing
else: a malicious blob raises :class:`~unistore.errors.UnsafePickleError`
without running anything.  The legacy file is opened read-only.
"""

from __future__ import annotations

import io
import os
import pickle
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unistore.errors import CorruptDataError, ShapeMismatchError, StoreNotFoundError, UnistoreError, UnsafePickleError

__all__ = ["NumpyOnlyUnpickler", "load_numpy_pickle", "import_legacy", "ImportReport", "LegacyImportError",
           "LEGACY_KIND", "SEED_SCHEMA"]

#: The legacy ``dataset.db`` schema, as the ClusterLabeledDataset spec documents it (labels are pickled numpy).
SEED_SCHEMA = """
CREATE TABLE samples (
    sample_id INTEGER PRIMARY KEY,
    embedding_idx INTEGER NOT NULL,
    sample_type TEXT NOT NULL,
    text TEXT NOT NULL,
    chroma_id TEXT NOT NULL,
    suggestions TEXT,
    steering_mode TEXT NOT NULL,
    source_label BLOB NOT NULL,
    steering_label BLOB NOT NULL,
    combined_label BLOB NOT NULL
);
CREATE TABLE dataset_info (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
#: ``datasets.kind`` of datasets created by this importer.
LEGACY_KIND = "cluster_labeled_legacy"
LABEL_COLUMNS = ("source_label", "steering_label", "combined_label")
_SAMPLE_COLUMNS = ("dataset_id", "sample_id", "embedding_idx", "sample_type", "text", "chroma_id", "suggestions",
                   "steering_mode")
_LABEL_COLUMNS = ("sample_pk", "kind", "vector", "provenance", "version")
#: Imports of at least this many new rows decode pickles in worker processes.
PARALLEL_DECODE_ROWS = 20_000


class LegacyImportError(UnistoreError, ValueError):
    """A legacy row is bad and ``skip_bad`` was not set: nothing was imported."""


def _safe_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype[Any]:
    dtype = np.dtype(spec, align=align, copy=copy)
    if dtype.hasobject:
        raise UnsafePickleError("pickled array has an object dtype; only numeric arrays are imported")
    return dtype


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # protocol 2 has no bytes type: Python pickles bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("pickle calls _codecs.encode with arguments numpy never writes")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    table: dict[tuple[str, str], Any] = {}
    for core in ("numpy.core", "numpy._core"):  # pickles name numpy 1.x or 2.x modules
        table[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # type: ignore[attr-defined]
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = _safe_dtype
    table[("_codecs", "encode")] = _latin1_encode
    return table


_ALLOWED = _numpy_globals()


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can build numeric numpy arrays and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"pickle refers to {module}.{name}; only numpy array pickles are accepted, so it was not run"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("pickle uses persistent ids; only numpy array pickles are accepted")


def load_numpy_pickle(blob: bytes) -> np.ndarray:
    """The numeric ndarray in ``blob``; never runs code.

    Raises:
        UnsafePickleError: the pickle names anything but numpy's array builders, or holds objects.
        CorruptDataError: the blob is truncated or not a pickle of an array.
    """
    try:
        value = NumpyOnlyUnpickler(io.BytesIO(bytes(blob))).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError) as e:
        raise CorruptDataError(f"label blob is truncated or not a numpy pickle ({type(e).__name__}: {e})") from e
    if type(value) is not np.ndarray:
        raise CorruptDataError(f"label blob holds a {type(value).__name__}, not a numpy array")
    if value.dtype.hasobject:
        raise UnsafePickleError("label blob holds an object array; only numeric arrays are imported")
    return value


@dataclass
class ImportReport:
    """What an import did."""

    dataset: str
    imported: int = 0
    already_present: int = 0
    #: (sample_id as stored - an int, or whatever a bad row holds - and what is wrong with the row)
    bad: list[tuple[Any, str]] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.dataset}: imported {self.imported} samples, {self.already_present} already present"
        if self.bad:
            text += f", skipped {len(self.bad)} bad: " + "; ".join(f"sample {i}: {r}" for i, r in self.bad[:20])
            if len(self.bad) > 20:
                text += f"; ... {len(self.bad) - 20} more"
        return text


def _open_readonly(path: str) -> sqlite3.Connection:
    if not os.path.isfile(path):
        raise StoreNotFoundError(f"no legacy database at {path}")
    uri = "file:" + os.path.abspath(path).replace("?", "%3f").replace("#", "%23") + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        conn.close()
        raise _corrupt(path, e) from e
    missing = {"samples", "dataset_info"} - tables
    if missing:
        conn.close()
        raise LegacyImportError(f"{path} is not a legacy dataset.db: tables {sorted(missing)} are missing")
    return conn


def _corrupt(path: str, e: sqlite3.DatabaseError) -> LegacyImportError:
    return LegacyImportError(f"{path} is not a readable SQLite database ({e}); it is corrupt or truncated - restore "
                             "it from a copy; nothing was imported")


def _info(conn: sqlite3.Connection, path: str) -> tuple[dict[str, str], int, int, int]:
    info = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM dataset_info")}
    try:
        return info, int(info["n_clusters"]), int(info["embedding_dim"]), int(info["dataset_size"])
    except (KeyError, ValueError) as e:
        raise LegacyImportError(f"{path}: dataset_info needs integer n_clusters, embedding_dim and dataset_size "
                                f"({e})") from e


def _check_row(row: tuple[Any, ...], n_clusters: int, dataset_size: int) -> list[np.ndarray]:
    sample_id, embedding_idx = row[0], row[1]
    if not isinstance(sample_id, int) or not isinstance(embedding_idx, int):
        raise ShapeMismatchError("sample_id and embedding_idx must be integers")
    for column, value in zip(_SAMPLE_COLUMNS[3:], row[2:7]):
        if value is not None and not isinstance(value, str):
            raise ShapeMismatchError(f"{column} holds a {type(value).__name__}, not text")
    if not 0 <= embedding_idx < dataset_size:
        raise ShapeMismatchError(f"embedding_idx {embedding_idx} is outside 0..{dataset_size - 1}")
    labels = []
    for column, blob in zip(LABEL_COLUMNS, row[7:10]):
        if blob is None:
            raise CorruptDataError(f"{column} is NULL")
        try:
            label = load_numpy_pickle(blob)
        except UnistoreError as e:
            raise type(e)(f"{column}: {e}") from e
        if label.shape != (n_clusters,):
            raise ShapeMismatchError(f"{column} has shape {label.shape}, dataset_info says ({n_clusters},)")
        if label.dtype.kind != "f":
            raise ShapeMismatchError(f"{column} has dtype {label.dtype}, expected a float vector")
        labels.append(label)
    return labels


Decoded = tuple[tuple[Any, ...], tuple[bytes, bytes, bytes]] | tuple[int, str]


def _decode_batch(rows: list[tuple[Any, ...]], n_clusters: int, dataset_size: int) -> list[Decoded]:
    """Check and re-encode one batch: ``(sample columns, 3 NDArray blobs)`` or ``(sample_id, reason)``.

    Pure and picklable, so it runs in worker processes for large imports.
    """
    from unistore.schemas.types import encode_array

    out: list[Decoded] = []
    for row in rows:
        try:
            vectors = _check_row(row, n_clusters, dataset_size)
        except UnistoreError as e:
            out.append((row[0], str(e)))
            continue
        out.append((row[:7], (encode_array(vectors[0]), encode_array(vectors[1]), encode_array(vectors[2]))))
    return out


def _decoded_batches(legacy: sqlite3.Connection, batch: int, n_clusters: int, dataset_size: int,
                     existing: set[int], parallel: bool) -> Iterator[tuple[int, int, list[Decoded]]]:
    """``(rows read, rows already present, decoded)`` per batch, decoded ahead in worker processes if ``parallel``."""

    def fresh() -> Iterator[tuple[int, int, list[tuple[Any, ...]]]]:
        for rows in _rows(legacy, batch):
            todo = [r for r in rows if r[0] not in existing]
            yield len(rows), len(rows) - len(todo), todo

    if not parallel:
        for n, present, todo in fresh():
            yield n, present, _decode_batch(todo, n_clusters, dataset_size)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                             mp_context=mp.get_context(method)) as pool:
        pending = []
        for n, present, todo in fresh():
            pending.append((n, present, pool.submit(_decode_batch, todo, n_clusters, dataset_size)))
            if len(pending) > 4:  # bounded read-ahead
                n0, p0, fut = pending.pop(0)
                yield n0, p0, fut.result()
        for n0, p0, fut in pending:
            yield n0, p0, fut.result()


def _rows(conn: sqlite3.Connection, batch: int) -> Iterator[list[tuple[Any, ...]]]:
    cursor = conn.execute(
        "SELECT sample_id, embedding_idx, sample_type, text, chroma_id, suggestions, steering_mode, "
        "source_label, steering_label, combined_label FROM samples ORDER BY sample_id"
    )
    while True:
        rows = cursor.fetchmany(batch)
        if not rows:
            return
        yield rows


def import_legacy(db_path: str | os.PathLike[str], url: str | os.PathLike[str] | None = None, *,
                  name: str | None = None, skip_bad: bool = False, progress: bool = False,
                  batch_size: int = 5000) -> ImportReport:
    """Import ``db_path`` (legacy ``dataset.db``) into the catalog at ``url``.

    All-or-nothing by default: the first bad row raises
    :class:`LegacyImportError` naming its ``sample_id`` and nothing is written.
    With ``skip_bad=True`` good rows are imported and bad ones reported.
    Running it again imports nothing new (samples are matched by
    ``sample_id``).  The legacy file is opened read-only.

    Raises:
        LegacyImportError: a bad row (without ``skip_bad``), bad ``dataset_info``, or a corrupt database file.
    """
    path = os.fspath(db_path)
    legacy = _open_readonly(path)
    try:
        return _import(legacy, path, url, name, skip_bad, progress, batch_size)
    except sqlite3.DatabaseError as e:  # damage deeper in the file than its schema
        raise _corrupt(path, e) from e
    finally:
        legacy.close()


def _import(legacy: sqlite3.Connection, path: str, url: str | os.PathLike[str] | None, name: str | None,
            skip_bad: bool, progress: bool, batch_size: int) -> ImportReport:
    from sqlalchemy import select

    from unistore.catalog import connect
    from unistore.schemas import DatasetArray, DatasetInfo, Sample
    from unistore.schemas.models import Dataset

    info, n_clusters, dim, size = _info(legacy, path)
    total = int(legacy.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
    directory = os.path.dirname(os.path.abspath(path))
    ds_name = name or os.path.basename(directory) or "legacy"
    report = ImportReport(ds_name)
    catalog = connect(url)
    bar = _progress(total, f"import {ds_name}", progress)
    try:
        with catalog.session() as session:
            dataset = session.scalar(select(Dataset).where(Dataset.name == ds_name))
            if dataset is None:
                dataset = Dataset(name=ds_name, kind=LEGACY_KIND, store_url=directory, format="npy",
                                  attrs={"legacy_db": os.path.abspath(path)})
                session.add(dataset)
                session.flush()
            present_info = {i.key for i in dataset.info}
            for key, value in info.items():
                if key not in present_info:
                    session.add(DatasetInfo(dataset_id=dataset.id, key=key, value=value))
            present_arrays = {a.key for a in dataset.arrays}
            for key in ("base_embeddings", "steering_embeddings"):
                emb_path = os.path.join(directory, f"{key}.npy")
                if os.path.exists(emb_path) and os.path.getsize(emb_path) != size * dim * 4:
                    raise LegacyImportError(
                        f"{emb_path} holds {os.path.getsize(emb_path)} bytes, but dataset_info says "
                        f"{size} x {dim} float32 = {size * dim * 4}; fix dataset_info or the file"
                    )
                if key not in present_arrays and os.path.exists(emb_path):
                    session.add(DatasetArray(dataset_id=dataset.id, key=key, shape=[size, dim], dtype="float32",
                                             format="npy", nbytes=size * dim * 4))
            existing = set(session.scalars(select(Sample.sample_id).where(Sample.dataset_id == dataset.id)))
            conn = session.connection()
            parallel = total - len(existing) >= PARALLEL_DECODE_ROWS
            for n_read, present, decoded in _decoded_batches(legacy, batch_size, n_clusters, size, existing,
                                                             parallel):
                report.already_present += present
                good = []
                for item in decoded:
                    if isinstance(item[1], str):
                        if not skip_bad:
                            raise LegacyImportError(
                                f"sample_id {item[0]} in {path}: {item[1]}; nothing was imported "
                                "(use --skip-bad to import the good rows)"
                            )
                        report.bad.append((item[0], item[1]))
                    else:
                        good.append(item)
                if good:
                    _write_batch(conn, dataset.id, good)
                report.imported += len(good)
                bar.update(n_read)
            if report.imported:
                # fresh planner statistics: right after a bulk load PostgreSQL would
                # otherwise scan every sample of the dataset for a batch of labels
                for table in ("samples", "labels"):
                    conn.exec_driver_sql(f"ANALYZE {table}")
    finally:
        bar.close()
        catalog.close()
    return report


def _write_batch(conn: Any, dataset_id: int, items: list[Any]) -> None:
    """Insert one batch of samples and their three (already encoded) labels each."""
    from sqlalchemy import select

    from unistore.schemas import Label, Sample

    # straight to the driver's executemany: the ORM's bulk path splits batches
    # wherever a nullable column is None, and per-row parameter processing
    # would cost more than the insert itself
    _bulk_insert(conn, Sample.__table__, _SAMPLE_COLUMNS, [(dataset_id, *columns) for columns, _ in items])
    batch_ids = [columns[0] for columns, _ in items]
    pks = dict(conn.execute(
        select(Sample.sample_id, Sample.id).where(Sample.dataset_id == dataset_id, Sample.sample_id.in_(batch_ids))
    ).all())
    _bulk_insert(conn, Label.__table__, _LABEL_COLUMNS, [
        (pks[sid], kind, blob, "legacy-import", 1)
        for sid, (_, blobs) in zip(batch_ids, items)
        for kind, blob in zip(("source", "steering", "combined"), blobs)
    ])


def _bulk_insert(conn: Any, table: Any, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """INSERT ``rows`` (tuples of driver-ready values in ``columns`` order) with one DBAPI executemany."""
    from sqlalchemy import bindparam, insert

    compiled = insert(table).values({c: bindparam(c) for c in columns}).compile(dialect=conn.dialect)
    params: list[Any]
    if not compiled.positional:
        params = [dict(zip(columns, r)) for r in rows]
    elif tuple(compiled.positiontup or ()) == columns:
        params = rows
    else:
        where = [columns.index(c) for c in compiled.positiontup or ()]
        params = [tuple(r[i] for i in where) for r in rows]
    conn.exec_driver_sql(str(compiled), params)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", disable=not enabled)
