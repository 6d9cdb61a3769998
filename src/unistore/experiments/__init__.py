"""Experiments: training-history time series (and, next, search over the catalog's experiments).

>>> from unistore.experiments import TimeSeriesConfig, TimeSeriesStorage
"""

from unistore.experiments.timeseries import (
    HistoryNotFoundError,
    NonFiniteMetricError,
    TimeSeriesConfig,
    TimeSeriesStorage,
)

__all__ = ["TimeSeriesConfig", "TimeSeriesStorage", "HistoryNotFoundError", "NonFiniteMetricError"]
