"""Reading and correcting labels in the catalog, one batch at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy import select, update

from unistore.errors import ArrayNotFoundError, ShapeMismatchError
from unistore.schemas.engine import Catalog
from unistore.schemas.models import LABEL_KINDS, Dataset, Label, Sample

__all__ = ["dataset_id", "read_labels", "update_labels"]


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
