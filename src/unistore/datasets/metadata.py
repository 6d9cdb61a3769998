"""Dataset-usage metadata: which experiment used which dataset, version, preprocessing and subset, and when.

Records go to the catalog's ``dataset_usage`` table (one row per use, with
the dataset and experiment as catalog rows, created on first mention), so
they are queryable with SQL on SQLite or PostgreSQL alike.

>>> metadata = DatasetMetadata(dataset_name="custom_dataset", version="1.0.0", source="local_files",
...                            preprocessing_steps=["normalize", "augment"],
...                            statistics={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
>>> track_dataset_usage(experiment_id="exp_123", dataset_metadata=metadata,
...                     subset_info={"size": 5000, "split": "validation"})
>>> dataset_usage_history("custom_dataset")[-1]["experiment_id"]
'exp_123'
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DatasetMetadata", "track_dataset_usage", "dataset_usage_history"]

#: ``datasets.kind`` of datasets first mentioned by a usage record
KIND = "tracked"


@dataclass
class DatasetMetadata:
    """What is known about a dataset as used: version, source, preprocessing and statistics."""

    dataset_name: str
    version: str = "1.0.0"
    source: str = "local_files"
    preprocessing_steps: list[str] = field(default_factory=list)
    statistics: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    store_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON (numpy numbers and arrays become numbers and lists); NaN/inf refused."""
    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        raise TypeError(f"{where} holds a {type(o).__name__}, which is not JSON data")

    try:
        text = json.dumps(value, default=default, allow_nan=False)
    except ValueError as e:
        from unistore.errors import NonFiniteMetricError

        raise NonFiniteMetricError(f"{where} holds NaN or inf ({e}); record finite statistics") from e
    return json.loads(text)


def _catalog_url(catalog_url: str | None) -> str:
    from unistore.schemas.engine import default_catalog_url

    return catalog_url or default_catalog_url()


def track_dataset_usage(experiment_id: str | None, dataset_metadata: DatasetMetadata,
                        subset_info: dict[str, Any] | None = None, *, catalog_url: str | None = None,
                        purpose: str = "training") -> int:
    """Record one use of a dataset; returns the ``dataset_usage`` row id.

    ``experiment_id`` is the experiment's name (a catalog ``experiments``
    row, created when new); the dataset is found by name (created, kind
    ``tracked``, when new).  The catalog is ``catalog_url``, else
    :func:`unistore.schemas.engine.default_catalog_url`.

    Raises:
        NonFiniteMetricError: a statistic is NaN or inf.
        TypeError: statistics or subset info hold something that is not JSON data.
    """
    from sqlalchemy import select

    from unistore.catalog import connect
    from unistore.schemas import Dataset, DatasetUsage, Experiment

    details = {
        "version": dataset_metadata.version,
        "source": dataset_metadata.source,
        "preprocessing_steps": _jsonable(list(dataset_metadata.preprocessing_steps), "preprocessing_steps"),
        "statistics": _jsonable(dataset_metadata.statistics, "statistics"),
        "subset_info": _jsonable(subset_info or {}, "subset_info"),
        "experiment_id": experiment_id,
    }
    catalog = connect(_catalog_url(catalog_url))
    try:
        with catalog.session() as session:
            ds = session.scalars(select(Dataset).where(Dataset.name == dataset_metadata.dataset_name)).one_or_none()
            if ds is None:
                ds = Dataset(name=dataset_metadata.dataset_name, kind=KIND, store_url=dataset_metadata.store_url,
                             attrs={"description": dataset_metadata.description} if dataset_metadata.description
                             else {})
                session.add(ds)
                session.flush()
            exp = None
            if experiment_id is not None:
                exp = session.scalars(select(Experiment).where(Experiment.name == str(experiment_id))).one_or_none()
                if exp is None:
                    exp = Experiment(name=str(experiment_id), dataset_id=ds.id, config={}, status="created")
                    session.add(exp)
                    session.flush()
            row = DatasetUsage(dataset_id=ds.id, experiment_id=exp.id if exp is not None else None, purpose=purpose,
                               details=details, version=dataset_metadata.version)
            session.add(row)
            session.flush()
            return int(row.id)
    finally:
        catalog.close()


def dataset_usage_history(dataset_name: str | None = None, *, catalog_url: str | None = None,
                          experiment_id: str | None = None) -> list[dict[str, Any]]:
    """Usage records, oldest first: dataset, experiment, version, purpose, details and ``used_at``."""
    from sqlalchemy import select

    from unistore.catalog import connect
    from unistore.schemas import Dataset, DatasetUsage, Experiment

    catalog = connect(_catalog_url(catalog_url), write_lock=False)
    try:
        with catalog.session() as session:
            q = (select(DatasetUsage, Dataset.name, Experiment.name)
                 .join(Dataset, Dataset.id == DatasetUsage.dataset_id)
                 .outerjoin(Experiment, Experiment.id == DatasetUsage.experiment_id)
                 .order_by(DatasetUsage.id))
            if dataset_name is not None:
                q = q.where(Dataset.name == dataset_name)
            if experiment_id is not None:
                q = q.where(Experiment.name == experiment_id)
            return [{"id": u.id, "dataset": d, "experiment_id": e, "version": u.version, "purpose": u.purpose,
                     "details": dict(u.details or {}), "used_at": u.used_at} for u, d, e in session.execute(q)]
    finally:
        catalog.close()


