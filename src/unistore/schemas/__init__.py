"""The catalog's schema: SQLAlchemy models, the NDArray column type, engines (connecting: unistore.catalog)."""

from unistore._optional import require

require("sqlalchemy")

from unistore.schemas.engine import Catalog, CatalogOutdatedError, make_engine, resolve_url, safe_url
from unistore.schemas.models import (
    LABEL_KINDS,
    Base,
    Dataset,
    DatasetArray,
    DatasetInfo,
    DatasetUsage,
    DeltaEmbeddingCache,
    Experiment,
    ExperimentMetric,
    Label,
    Sample,
    Split,
    TrainingHistoryRef,
    TrainingHistorySegment,
)
from unistore.schemas.types import NDArray, decode_array, encode_array

__all__ = [
    "Catalog",
    "CatalogOutdatedError",
    "make_engine",
    "resolve_url",
    "safe_url",
    "Base",
    "Dataset",
    "DatasetArray",
    "DatasetInfo",
    "DatasetUsage",
    "DeltaEmbeddingCache",
    "Experiment",
    "ExperimentMetric",
    "Label",
    "LABEL_KINDS",
    "Sample",
    "Split",
    "TrainingHistoryRef",
    "TrainingHistorySegment",
    "NDArray",
    "encode_array",
    "decode_array",
]
