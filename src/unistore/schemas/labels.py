"""Reading and correcting labels in the catalog, one batch at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy import Connection, bindparam, select, text, update

from unistore.errors import ArrayNotFoundError, ShapeMismatchError
from unistore.schemas.engine import Catalog
from unistore.schemas.models import LABEL_KINDS, Dataset, Label, Sample
from unistore.schemas.types import decode_stack

__all__ = ["dataset_id", "read_labels", "update_labels", "labels_by_pk", "samples_by_pk", "SAMPLE_FIELDS",
           "export_labels", "drop_dataset"]

#: The sample columns :func:`samples_by_pk` returns, in order.
SAMPLE_FIELDS = ("sample_id", "embedding_idx", "sample_type", "text", "chroma_id", "suggestions", "steering_mode")

_PLACEHOLDER = {"qmark": "?", "format": "%s", "pyformat": "%s"}
_SAMPLES_BY_PK = text(
    "SELECT s.id, " + ", ".join(f"s.{c}" for c in SAMPLE_FIELDS) + ", l.kind, l.vector "
    "FROM samples s JOIN labels l ON l.sample_pk = s.id WHERE s.id IN :pks"
).bindparams(bindparam("pks", expanding=True))


def dataset_id(catalog: Catalog, name: str) -> int:
    """The id of the dataset called ``name``.

    Raises:
        ArrayNotFoundError: no such dataset (a ``KeyError``).
    """
    with catalog.session() as session:
        found = session.scalar(select(Dataset.id).where(Dataset.name == name))
    if found is None:
        raise ArrayNotFoundError(f"no dataset {name!r} in the catalog at {catalog.url}")
    return int(found)


def _check_kind(kind: str) -> None:
    if kind not in LABEL_KINDS:
        raise ShapeMismatchError(f"label kind must be one of {LABEL_KINDS}, got {kind!r}")


def read_labels(catalog: Catalog, dataset: int, sample_ids: Sequence[int], kind: str = "combined") -> np.ndarray:
    """Labels of ``kind`` for ``sample_ids`` (legacy ids), stacked in the order asked.

    Raises:
        ArrayNotFoundError: a sample has no such label.
    """
    _check_kind(kind)
    wanted = [int(i) for i in sample_ids]
    stmt = (select(Sample.sample_id, Label.vector).join(Label, Label.sample_pk == Sample.id)
            .where(Sample.dataset_id == dataset, Label.kind == kind, Sample.sample_id.in_(set(wanted))))
    with catalog.session() as session:
        found: dict[int, np.ndarray] = {int(sid): vec for sid, vec in session.execute(stmt)}
    missing = [i for i in wanted if i not in found]
    if missing:
        raise ArrayNotFoundError(f"no {kind} label for sample_id(s) {missing[:10]} in dataset {dataset}")
    return np.stack([found[i] for i in wanted]) if wanted else np.empty((0, 0), np.float32)


def update_labels(catalog: Catalog, dataset: int, sample_id: int, labels: Mapping[str, Any],
                  provenance: str = "manual") -> None:
    """Replace some labels of one sample atomically; each replaced label's version goes up by one.

    ``labels`` maps kind (source, steering, combined) to the new vector; its
    shape must match the stored one.

    Raises:
        ArrayNotFoundError: unknown sample or label kind for it.
        ShapeMismatchError: a vector of another shape than the stored one.
    """
    with catalog.session() as session:
        sample_pk = session.scalar(select(Sample.id).where(Sample.dataset_id == dataset,
                                                           Sample.sample_id == int(sample_id)))
        if sample_pk is None:
            raise ArrayNotFoundError(f"no sample_id {sample_id} in dataset {dataset}")
        for kind, vector in labels.items():
            _check_kind(kind)
            if vector is None:
                continue
            current = session.scalar(select(Label.vector).where(Label.sample_pk == sample_pk, Label.kind == kind))
            if current is None:
                raise ArrayNotFoundError(f"sample_id {sample_id} has no {kind} label")
            vec = np.asarray(vector, dtype=current.dtype)
            if vec.shape != current.shape:
                raise ShapeMismatchError(f"{kind} label of sample_id {sample_id} has shape {current.shape}, "
                                         f"got {vec.shape}")
            session.execute(
                update(Label).where(Label.sample_pk == sample_pk, Label.kind == kind)
                .values(vector=vec, provenance=provenance, version=Label.version + 1)
            )


def _gather_order(uniq: np.ndarray, got: np.ndarray, what: str) -> np.ndarray:
    """Positions in ``got`` of each of ``uniq`` (both unique), or ArrayNotFoundError naming what is missing."""
    order = np.argsort(got, kind="stable")
    found = got[order]
    pos = np.searchsorted(found, uniq)
    pos = np.minimum(pos, max(len(found) - 1, 0))
    ok = found[pos] == uniq if len(found) else np.zeros(len(uniq), dtype=bool)
    if not ok.all():
        raise ArrayNotFoundError(f"no {what} for sample row(s) {uniq[~ok][:10].tolist()} in the catalog")
    return order[pos]


def labels_by_pk(conn: Connection, sample_pks: Any, kind: str = "combined", dtype: Any = np.float32) -> np.ndarray:
    """Label vectors of ``kind`` for catalog sample rows ``sample_pks`` (any order, repeats allowed), in that order.

    One query for the whole batch; the vectors come back stacked as
    ``(len(sample_pks), n_clusters)`` in ``dtype``.

    Raises:
        ArrayNotFoundError: a sample has no label of ``kind``.
    """
    _check_kind(kind)
    uniq, inverse = np.unique(np.asarray(sample_pks, dtype=np.int64), return_inverse=True)
    # the hot path of every DataLoader batch: SQL straight to the driver, no statement compilation per call
    mark = _PLACEHOLDER.get(conn.dialect.paramstyle)
    if mark is None:  # a driver with named parameters: let SQLAlchemy render the IN list
        stmt = text("SELECT sample_pk, vector FROM labels WHERE kind = :kind AND sample_pk IN :pks").bindparams(
            bindparam("pks", expanding=True))
        rows = conn.execute(stmt, {"kind": kind, "pks": uniq.tolist()}).all()
    else:
        marks = ", ".join([mark] * len(uniq))
        sql = f"SELECT sample_pk, vector FROM labels WHERE kind = {mark} AND sample_pk IN ({marks})"
        rows = conn.exec_driver_sql(sql, (kind, *uniq.tolist())).fetchall()
    got = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    where = _gather_order(uniq, got, f"{kind} label")
    return decode_stack([rows[i][1] for i in where], dtype)[inverse.reshape(-1)]


def samples_by_pk(conn: Connection, sample_pks: Any,
                  dtype: Any = np.float32) -> tuple[list[tuple[Any, ...]], dict[str, np.ndarray]]:
    """Sample columns (:data:`SAMPLE_FIELDS`) and every kind of label for ``sample_pks``, in that order.

    One query.  Returns ``(rows, {kind: (n, n_clusters) array})``.

    Raises:
        ArrayNotFoundError: a sample row or one of its labels is missing.
    """
    uniq, inverse = np.unique(np.asarray(sample_pks, dtype=np.int64), return_inverse=True)
    inverse = inverse.reshape(-1)
    fields: dict[int, tuple[Any, ...]] = {}
    blobs: dict[str, dict[int, bytes]] = {kind: {} for kind in LABEL_KINDS}
    for row in conn.execute(_SAMPLES_BY_PK, {"pks": uniq.tolist()}):
        pk = int(row[0])
        fields[pk] = tuple(row[1:1 + len(SAMPLE_FIELDS)])
        blobs[row[-2]][pk] = row[-1]
    labels = {}
    for kind, by_pk in blobs.items():
        got = np.fromiter(by_pk, dtype=np.int64, count=len(by_pk))
        where = _gather_order(uniq, got, f"{kind} label")
        values = list(by_pk.values())
        labels[kind] = decode_stack([values[i] for i in where], dtype)[inverse]
    ordered = [fields[int(uniq[i])] for i in inverse]
    return ordered, labels


def export_labels(catalog: Catalog, name: str, manual_only: bool = False) -> list[dict[str, Any]]:
    """Every label of dataset ``name`` (or only those corrected by hand) as JSON-ready records.

    Each record is ``{"sample_id", "kind", "label": [...], "provenance",
    "version"}``, ordered by sample id and kind: the corrections kept in the
    catalog, in a form any tool can read back.

    Raises:
        ArrayNotFoundError: no such dataset.
    """
    ds = dataset_id(catalog, name)
    stmt = (select(Sample.sample_id, Label.kind, Label.vector, Label.provenance, Label.version)
            .join(Label, Label.sample_pk == Sample.id).where(Sample.dataset_id == ds)
            .order_by(Sample.sample_id, Label.kind))
    if manual_only:
        stmt = stmt.where(Label.provenance == "manual")
    with catalog.session() as session:
        return [{"sample_id": int(sid), "kind": kind, "label": np.asarray(vec).tolist(), "provenance": prov,
                 "version": int(version)} for sid, kind, vec, prov, version in session.execute(stmt)]


def drop_dataset(catalog: Catalog, name: str) -> int:
    """Delete dataset ``name`` with its samples and labels from the catalog (its store is not touched);
    returns the number of samples it held.

    Raises:
        ArrayNotFoundError: no such dataset.
    """
    from sqlalchemy import delete, func

    ds = dataset_id(catalog, name)
    with catalog.session() as session:
        n = int(session.scalar(select(func.count()).select_from(Sample).where(Sample.dataset_id == ds)) or 0)
        session.execute(delete(Dataset).where(Dataset.id == ds))
    return n
