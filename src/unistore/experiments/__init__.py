"""Experiments: search over the catalog's experiments (ChromaDB), training-history time series, and both together.

>>> from unistore.experiments import ChromaConfig, ExperimentSearcher, TimeSeriesConfig, TimeSeriesStorage

chromadb is imported only when a search index is first used (``pip install 'unistore[experiments]'``).
"""

from unistore.errors import NonFiniteMetricError
from unistore.experiments.hybrid import (
    HybridExperimentStorage,
    LabConfig,
    NALChromaIntegration,
    ReferenceLab,
    create_memory_efficient_nal,
)
from unistore.experiments.search import (
    ChromaConfig,
    ExperimentFeaturizer,
    ExperimentNotFoundError,
    ExperimentSearcher,
    InvalidFilterError,
    SearchIndexUnavailableError,
    get_chroma_client,
    reset_chroma_client,
)
from unistore.experiments.timeseries import HistoryNotFoundError, TimeSeriesConfig, TimeSeriesStorage

__all__ = [
    "ChromaConfig",
    "ExperimentSearcher",
    "ExperimentFeaturizer",
    "ExperimentNotFoundError",
    "InvalidFilterError",
    "SearchIndexUnavailableError",
    "NonFiniteMetricError",
    "get_chroma_client",
    "reset_chroma_client",
    "TimeSeriesConfig",
    "TimeSeriesStorage",
    "HistoryNotFoundError",
    "HybridExperimentStorage",
    "LabConfig",
    "ReferenceLab",
    "NALChromaIntegration",
    "create_memory_efficient_nal",
]
