"""The hybrid store routes histories by size; a lab's results leave its memory as they are stored."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from unistore.experiments import (
    ChromaConfig,
    HybridExperimentStorage,
    LabConfig,
    ReferenceLab,
    TimeSeriesConfig,
    create_memory_efficient_nal,
)

pytestmark = pytest.mark.leaves_threads


def curve(n: int) -> list[dict[str, Any]]:
    return [{"epoch": e, "loss": 1.0 / (e + 1), "accuracy": e / n} for e in range(n)]


@pytest.fixture
def hybrid(chroma_config: ChromaConfig, catalog_url: str, tmp_path: Any) -> Any:
    h = HybridExperimentStorage(chroma_config, TimeSeriesConfig(storage_dir=str(tmp_path / "ts")),
                                catalog_url=catalog_url, history_inline_bytes=10_000)
    yield h
    h.close()


def test_routing_by_size_and_reassembly(hybrid: HybridExperimentStorage) -> None:
    data = {"architecture": [784, 512, 256, 10], "accuracy": 0.95, "parameters": 1.2e6, "config": {"dataset": "mnist"}}
    small = hybrid.store_experiment("small", data, training_history=curve(20))   # 20 x 3 x 8 = 480 bytes
    large = hybrid.store_experiment("large", data, training_history=curve(5000))  # 120 kB
    none = hybrid.store_experiment("none", data)
    assert small["history"] == "inline" and large["history"] == "timeseries" and none["history"] == "none"
    assert hybrid.timeseries.list_histories() == ["large"]
    got = hybrid.retrieve_experiment("large", include_training_history=True)
    assert got["training_history"] == curve(5000) and got["accuracy"] == 0.95
    assert got["training_summary"]["loss"]["min"] == 1.0 / 5000
    tail = hybrid.retrieve_experiment("large", include_training_history=True, epochs=slice(-3, None))
    assert tail["training_history"] == curve(5000)[-3:]
    assert "training_history" not in hybrid.retrieve_experiment("large")
    assert hybrid.retrieve_experiment("small", include_training_history=True)["training_history"] == curve(20)
    assert "training_history" not in hybrid.retrieve_experiment("small")
    found = hybrid.searcher.search_by_performance(min_accuracy=0.9, dataset="mnist")
    assert sorted(r["experiment_id"] for r in found) == ["large", "none", "small"]
    with pytest.raises(KeyError):
        hybrid.retrieve_experiment("missing")
    with pytest.raises(ValueError, match="accuracy"):
        hybrid.store_experiment("bad", {**data, "accuracy": float("inf")}, training_history=curve(5000))
    assert hybrid.timeseries.list_histories() == ["large"]  # nothing was written for it


def test_memory_efficient_lab_offloads_results(chroma_config: ChromaConfig, catalog_url: str, tmp_path: Any) -> None:
    lab, integration = create_memory_efficient_nal(
        LabConfig(epochs=3000, results_dir=str(tmp_path / "nal")), chroma_config,
        TimeSeriesConfig(storage_dir=str(tmp_path / "ts"), use_hdf5=True, compression="gzip"),
        catalog_url=catalog_url)
    assert isinstance(lab, ReferenceLab)
    ids = asyncio.run(lab.test_hypothesis("width", architectures=[(784, 32, 10), (784, 512, 10), (784, 64, 64, 10)]))
    assert integration.offloaded == 3 and lab.results == {}  # nothing accumulates in the lab
    best = integration.searcher.search_by_hypothesis("width")
    assert [r["experiment_id"] for r in best][0] == ids[1]  # the widest net learned most
    stored = integration.storage.retrieve_experiment(ids[0], include_training_history=True)
    assert len(stored["training_history"]) == 3000
    with pytest.raises(TypeError, match="not a lab"):
        create_memory_efficient_nal(None, chroma_config, lab=object(), catalog_url=str(tmp_path / "c2.db"))  # type: ignore[arg-type]
