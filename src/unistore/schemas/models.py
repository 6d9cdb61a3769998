"""The catalog's SQLAlchemy 2.0 models (the schema at the head migration).

Labels are stored one row per (sample, kind) rather than three columns on
``samples``: a correction touches one small row, a new kind of label needs no
schema change, and each row carries its own provenance and version (added by
migration ``0002``), which three columns could not do without tripling them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from unistore.schemas.types import NDArray

__all__ = [
    "Base",
    "Dataset",
    "DatasetArray",
    "Sample",
    "Label",
    "LABEL_KINDS",
    "DatasetInfo",
    "Split",
    "Experiment",
    "ExperimentMetric",
    "DatasetUsage",
    "TrainingHistoryRef",
    "TrainingHistorySegment",
    "DeltaEmbeddingCache",
]

#: Constraint and index names follow one convention so migrations can address them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

LABEL_KINDS = ("source", "steering", "combined")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, np.ndarray: NDArray}


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Dataset(Base):
    """One dataset: where its arrays live (URL without secrets) and what it is."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(64), default="generic")
    store_url: Mapped[str | None] = mapped_column(Text)
    format: Mapped[str | None] = mapped_column(String(32))
    attrs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                                 onupdate=func.now(), nullable=False)

    arrays: Mapped[list[DatasetArray]] = relationship(back_populates="dataset", cascade="all, delete-orphan")
    info: Mapped[list[DatasetInfo]] = relationship(cascade="all, delete-orphan")


class DatasetArray(Base):
    """One array of a dataset's store: key, shape, dtype, format, size, checksum."""

    __tablename__ = "dataset_arrays"
    __table_args__ = (UniqueConstraint("dataset_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(512))
    shape: Mapped[list[int]] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(32))
    nbytes: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str | None] = mapped_column(String(80))

    dataset: Mapped[Dataset] = relationship(back_populates="arrays")


class Sample(Base):
    """A sample of a labelled dataset; ``sample_id`` is the legacy id, kept as is."""

    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("dataset_id", "sample_id"),
        Index(None, "dataset_id", "embedding_idx"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    sample_id: Mapped[int] = mapped_column(Integer)
    embedding_idx: Mapped[int] = mapped_column(Integer)
    sample_type: Mapped[str] = mapped_column(String(32))
    text: Mapped[str] = mapped_column(Text)
    chroma_id: Mapped[str] = mapped_column(String(255))
    suggestions: Mapped[str | None] = mapped_column(Text)
    steering_mode: Mapped[str] = mapped_column(String(64))

    labels: Mapped[list[Label]] = relationship(back_populates="sample", cascade="all, delete-orphan")


class Label(Base):
    """One label vector of one sample: ``kind`` is source, steering or combined."""

    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("sample_pk", "kind"),
        CheckConstraint("kind IN ('source', 'steering', 'combined')", name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_pk: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    vector: Mapped[np.ndarray] = mapped_column(NDArray)
    #: where the label came from: "legacy-import", "model", "manual", ... (migration 0002)
    provenance: Mapped[str] = mapped_column(String(64), server_default="unknown")
    #: incremented by every update (migration 0002)
    version: Mapped[int] = mapped_column(Integer, server_default="1")

    sample: Mapped[Sample] = relationship(back_populates="labels")


class DatasetInfo(Base):
    """Key/value facts about a dataset (``n_clusters``, ``embedding_dim``, ...)."""

    __tablename__ = "dataset_info"

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Split(Base):
    """A named split (train/val/test) as an index array."""

    __tablename__ = "splits"
    __table_args__ = (UniqueConstraint("dataset_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    indices: Mapped[np.ndarray] = mapped_column(NDArray)
    created_at: Mapped[datetime] = _created()


class Experiment(Base):
    """A training run or search experiment."""

    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(32), default="created")
    created_at: Mapped[datetime] = _created()

    metrics: Mapped[list[ExperimentMetric]] = relationship(cascade="all, delete-orphan")


class ExperimentMetric(Base):
    """One metric value of an experiment, optionally at a step/epoch."""

    __tablename__ = "experiment_metrics"
    __table_args__ = (Index(None, "experiment_id", "name", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    step: Mapped[int | None] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)


class DatasetUsage(Base):
    """A record that a dataset was used (by an experiment, for a purpose)."""

    __tablename__ = "dataset_usage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"))
    purpose: Mapped[str] = mapped_column(String(64), default="training")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: the dataset version used (migration 0004)
    version: Mapped[str | None] = mapped_column(String(64))
    used_at: Mapped[datetime] = _created()


class TrainingHistoryRef(Base):
    """Where an experiment's (large) training history lives: a store URL and key.

    ``summary`` holds per-metric statistics kept up to date at write time;
    ``meta`` the user's metadata (migration 0003); the rows themselves are in
    the segment stores listed by :class:`TrainingHistorySegment`.
    """

    __tablename__ = "training_history_refs"
    __table_args__ = (UniqueConstraint("key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), index=True)
    store_url: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(String(512))
    n_epochs: Mapped[int] = mapped_column(Integer, default=0)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = _created()

    segments: Mapped[list[TrainingHistorySegment]] = relationship(
        cascade="all, delete-orphan", order_by="TrainingHistorySegment.first_row")


class TrainingHistorySegment(Base):
    """One immutable store holding rows ``[first_row, first_row + n_rows)`` of a training history (0003)."""

    __tablename__ = "training_history_segments"
    __table_args__ = (UniqueConstraint("ref_id", "first_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ref_id: Mapped[int] = mapped_column(ForeignKey("training_history_refs.id", ondelete="CASCADE"))
    store_url: Mapped[str] = mapped_column(Text)
    first_row: Mapped[int] = mapped_column(BigInteger)
    n_rows: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()


class DeltaEmbeddingCache(Base):
    """A cached delta embedding of a LoRA adapter, inline or in a store.

    Stored deltas are row ``row_index`` (migration 0004) of array ``array_key``
    of the store at ``store_url``; ``dataset_id`` names the cache they belong to.
    """

    __tablename__ = "delta_embedding_cache"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cache_key: Mapped[str] = mapped_column(String(128), unique=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    adapter_path: Mapped[str] = mapped_column(Text)
    store_url: Mapped[str | None] = mapped_column(Text)
    array_key: Mapped[str | None] = mapped_column(String(512))
    embedding: Mapped[np.ndarray | None] = mapped_column(NDArray)
    row_index: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()
