"""The hybrid experiment store, and offloading a lab's results as they complete.

:class:`HybridExperimentStorage` routes an experiment's searchable metadata to
the catalog + Chroma (:class:`~unistore.experiments.ExperimentSearcher`) and a
large training history to the time series
(:class:`~unistore.experiments.TimeSeriesStorage`); small histories stay inline
in the experiment record.  :func:`create_memory_efficient_nal` wires any lab
object to it, so each result leaves the lab's memory as soon as it is stored.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from unistore.experiments.search import ChromaConfig, ExperimentSearcher, finite_json
from unistore.experiments.timeseries import TimeSeriesConfig, TimeSeriesStorage

__all__ = ["HybridExperimentStorage", "HISTORY_INLINE_BYTES", "LabConfig", "ReferenceLab", "Lab",
           "NALChromaIntegration", "create_memory_efficient_nal"]

#: Histories larger than this (rows x columns x 8 bytes) go to the time series; smaller ones stay inline.
HISTORY_INLINE_BYTES = 64 * 1024
_REF = "training_history_ref"
_INLINE = "training_history"


def _history_bytes(rows: Sequence[Mapping[str, Any]]) -> int:
    columns = {k for row in rows for k in row}
    return len(rows) * max(len(columns), 1) * 8


class HybridExperimentStorage:
    """Searchable metadata in Chroma + the catalog, large training histories in the time series.

    Args:
        chroma_config: the search index (default: embedded in ``./chroma``).
        timeseries_config: where histories go (default: ``./timeseries``, HDF5).
        catalog_url: one catalog for both (default:
            :func:`unistore.schemas.engine.default_catalog_url`).
        history_inline_bytes: histories up to this size (rows x columns x 8 bytes)
            stay inline in the experiment record; larger ones go to the time series.

    >>> hybrid = HybridExperimentStorage()
    >>> hybrid.store_experiment("exp_001", {"architecture": [784, 512, 256, 10], "accuracy": 0.95},
    ...                         training_history=[{"epoch": e, "loss": 1 / (e + 1)} for e in range(5000)])
    >>> hybrid.retrieve_experiment("exp_001", include_training_history=True)["training_history"][-1]
    """

    def __init__(self, chroma_config: ChromaConfig | None = None, timeseries_config: TimeSeriesConfig | None = None,
                 catalog_url: str | None = None, history_inline_bytes: int = HISTORY_INLINE_BYTES):
        self.searcher = ExperimentSearcher(chroma_config, catalog_url=catalog_url)
        ts_config = timeseries_config or TimeSeriesConfig()
        if ts_config.catalog_url is None:
            ts_config = replace(ts_config, catalog_url=self.searcher.catalog_url)
        self.timeseries = TimeSeriesStorage(ts_config)
        self.history_inline_bytes = history_inline_bytes

    def store_experiment(self, experiment_id: str, experiment_data: Mapping[str, Any],
                         training_history: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Store one experiment; returns where its history went (``{"history": "none"|"inline"|"timeseries", ...}``).

        The history is written first, then the record that points at it, so a
        record never refers to a history that is not there.

        Raises:
            NonFiniteMetricError: NaN/inf in the experiment's metrics or an infinite history value.
            SearchIndexUnavailableError: the Chroma server is down (catalog record and history are stored).
        """
        data = finite_json({k: v for k, v in experiment_data.items() if k not in (_REF, _INLINE)},
                       f"experiment {experiment_id!r}")  # refuse bad data before anything is written
        placed: dict[str, Any] = {"experiment_id": str(experiment_id), "history": "none"}
        rows = list(training_history or [])
        if rows and _history_bytes(rows) > self.history_inline_bytes:
            key = self.timeseries.store_training_history(str(experiment_id), rows,
                                                         metadata={"experiment_id": str(experiment_id)},
                                                         overwrite=True)
            data[_REF] = {"key": key, "n_epochs": len(rows)}
            placed.update(history="timeseries", key=key, n_epochs=len(rows))
        elif rows:
            data[_INLINE] = [{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
                             for row in rows]
            placed.update(history="inline", n_epochs=len(rows))
        self.searcher.index_experiment(str(experiment_id), data)
        return placed

    def retrieve_experiment(self, experiment_id: str, include_training_history: bool = False,
                            epochs: slice | Sequence[int] | None = None) -> dict[str, Any]:
        """The experiment's record; with ``include_training_history`` its history (``epochs`` to select rows),
        wherever it was stored.

        Raises:
            ExperimentNotFoundError: no such experiment.
        """
        data = self.searcher.get_experiment(str(experiment_id))
        ref = data.pop(_REF, None)
        inline = data.pop(_INLINE, None)
        if include_training_history:
            if ref is not None:
                data[_INLINE], _ = self.timeseries.retrieve_training_history(ref["key"], epochs=epochs)
            elif inline is not None:
                data[_INLINE] = inline[epochs] if isinstance(epochs, slice) else (
                    [inline[i] for i in epochs] if epochs is not None else inline)
        if ref is not None:
            data["training_summary"] = self.timeseries.get_summary_statistics(ref["key"])
        return data

    def close(self) -> None:
        self.searcher.close()
        self.timeseries.close()


# ----------------------------------------------------------------- labs
@runtime_checkable
class Lab(Protocol):
    """What a lab must offer to be made memory-efficient.

    - ``add_result_handler(handler)``: call ``handler(result)`` each time an
      experiment completes, ``result`` being a mapping with ``experiment_id``,
      ``experiment_data`` (architecture, final_performance, config, ...) and
      optionally ``training_history`` (a list of per-epoch dicts);
    - ``results``: a mutable mapping ``experiment_id -> result`` the lab keeps;
      offloaded results are removed from it.
    """

    results: MutableMapping[str, Any]

    def add_result_handler(self, handler: Callable[[Mapping[str, Any]], Any]) -> None: ...


@dataclass
class LabConfig:
    """Settings of :class:`ReferenceLab` (named as the lab's own config)."""

    max_parallel_experiments: int = 1
    save_best_models: bool = False
    results_dir: str = "nal_results"
    epochs: int = 20
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ReferenceLab:
    """A tiny lab for tests and the demo: "trains" dense architectures with a deterministic learning curve.

    Each hypothesis runs one experiment per architecture; results reach every
    registered handler as they complete and are kept in ``results`` otherwise.
    """

    def __init__(self, config: LabConfig | None = None):
        self.config = config or LabConfig()
        self.results: dict[str, Any] = {}
        self._handlers: list[Callable[[Mapping[str, Any]], Any]] = []

    def add_result_handler(self, handler: Callable[[Mapping[str, Any]], Any]) -> None:
        self._handlers.append(handler)

    def run_experiment(self, experiment_id: str, architecture: Sequence[int], dataset: str = "mnist",
                       hypothesis_id: str | None = None) -> dict[str, Any]:
        from unistore.experiments.search import parameter_count

        params = parameter_count(architecture)
        capacity = 1 - math.exp(-params / 2e5)  # bigger nets learn more, with diminishing returns
        history = []
        for epoch in range(self.config.epochs):
            progress = 1 - math.exp(-(epoch + 1) / 5)
            history.append({"epoch": epoch, "loss": 2.3 * (1 - 0.9 * capacity * progress),
                            "accuracy": 0.1 + 0.85 * capacity * progress})
        result = {"experiment_id": experiment_id, "training_history": history, "experiment_data": {
            "architecture": list(architecture), "parameters": params, "hypothesis_id": hypothesis_id,
            "final_performance": {"accuracy": history[-1]["accuracy"], "loss": history[-1]["loss"]},
            "config": {"dataset": dataset, "epochs": self.config.epochs}}}
        self.results[experiment_id] = result
        for handler in self._handlers:
            handler(result)
        return result

    async def test_hypothesis(self, hypothesis_id: str, architectures: Sequence[Sequence[int]] = ((784, 128, 10),),
                              dataset: str = "mnist") -> list[str]:
        """Run one experiment per architecture; returns their ids."""
        done = []
        for i, arch in enumerate(architectures):
            done.append(self.run_experiment(f"{hypothesis_id}-{i}", arch, dataset, hypothesis_id)["experiment_id"])
            await asyncio.sleep(0)
        return done


class NALChromaIntegration:
    """Stores each lab result in a :class:`HybridExperimentStorage` as it completes, then drops it from the lab."""

    def __init__(self, lab: Lab, storage: HybridExperimentStorage, keep_in_memory: bool = False):
        if not isinstance(lab, Lab):
            raise TypeError(f"{type(lab).__name__} is not a lab: it needs add_result_handler(handler) and a results "
                            "mapping (see unistore.experiments.hybrid.Lab)")
        self.lab = lab
        self.storage = storage
        self.keep_in_memory = keep_in_memory
        self.offloaded = 0
        lab.add_result_handler(self.on_result)

    def on_result(self, result: Mapping[str, Any]) -> None:
        experiment_id = str(result["experiment_id"])
        self.storage.store_experiment(experiment_id, result.get("experiment_data") or {},
                                      training_history=result.get("training_history"))
        self.offloaded += 1
        if not self.keep_in_memory:
            self.lab.results.pop(experiment_id, None)

    @property
    def searcher(self) -> ExperimentSearcher:
        return self.storage.searcher


def create_memory_efficient_nal(nal_config: Any = None, chroma_config: ChromaConfig | None = None,
                                timeseries_config: TimeSeriesConfig | None = None, lab: Lab | None = None,
                                catalog_url: str | None = None) -> tuple[Any, NALChromaIntegration]:
    """A lab whose results are offloaded (search index + catalog + time series) as they complete.

    ``lab`` is any object with the :class:`Lab` methods; without one a
    :class:`ReferenceLab` is built from ``nal_config`` (a :class:`LabConfig`).
    Returns ``(lab, integration)``.
    """
    the_lab: Any = lab if lab is not None else ReferenceLab(nal_config if isinstance(nal_config, LabConfig) else None)
    storage = HybridExperimentStorage(chroma_config, timeseries_config, catalog_url=catalog_url)
    return the_lab, NALChromaIntegration(the_lab, storage)
