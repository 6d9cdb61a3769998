"""Experiment search against the embedded index and a real Chroma server, on SQLite and PostgreSQL catalogs."""

from __future__ import annotations

import shutil
import socket
from typing import Any

import pytest

from unistore.experiments import (
    ChromaConfig,
    ExperimentNotFoundError,
    ExperimentSearcher,
    InvalidFilterError,
    NonFiniteMetricError,
    SearchIndexUnavailableError,
)
from unistore.experiments.search import parameter_count

pytestmark = pytest.mark.leaves_threads

EXPERIMENTS = {
    "mlp-a": {"architecture": [784, 512, 256, 10], "final_performance": {"accuracy": 0.95, "loss": 0.2},
              "config": {"dataset": "mnist", "epochs": 20}, "hypothesis_id": "width"},
    "mlp-deeper": {"architecture": [784, 512, 256, 128, 10], "final_performance": {"accuracy": 0.97},
                   "config": {"dataset": "mnist", "epochs": 20}, "hypothesis_id": "depth"},
    "mlp-shallow": {"architecture": [784, 256, 10], "final_performance": {"accuracy": 0.91},
                    "config": {"dataset": "mnist"}, "hypothesis_id": "depth"},
    "cifar-wide": {"architecture": [3072, 2048, 1024, 10], "final_performance": {"accuracy": 0.62},
                   "config": {"dataset": "cifar10"}, "hypothesis_id": "width"},
    "cifar-small": {"architecture": [3072, 128, 10], "final_performance": {"accuracy": 0.45},
                    "config": {"dataset": "cifar10"}, "parameters": 400_000},
}


@pytest.fixture
def searcher(chroma_config: ChromaConfig, catalog_url: str) -> Any:
    s = ExperimentSearcher(chroma_config, catalog_url=catalog_url)
    assert s.index_experiments(EXPERIMENTS) == 5
    yield s
    s.close()


def ids(results: list[dict[str, Any]]) -> list[str]:
    return [r["experiment_id"] for r in results]


def test_similar_architectures_rank_first(searcher: ExperimentSearcher) -> None:
    got = searcher.search_similar_experiments({"architecture": [784, 500, 250, 10]}, n_results=3)
    assert ids(got)[0] == "mlp-a"  # a few units away beats another depth
    assert got[0]["distance"] < got[1]["distance"]
    assert got[0]["experiment_data"] == EXPERIMENTS["mlp-a"]
    assert got[0]["metadata"]["parameters"] == parameter_count([784, 512, 256, 10]) == 535_818
    deeper = searcher.search_by_architecture([784, 512, 256, 120, 10], n_results=2)
    assert ids(deeper)[0] == "mlp-deeper"
    assert searcher.count() == 5


def test_filters(searcher: ExperimentSearcher) -> None:
    query = {"architecture": [784, 500, 250, 10]}
    got = searcher.search_similar_experiments(query, n_results=5, filters={
        "dataset": "cifar10", "accuracy": {"$gte": 0.5}, "parameters": {"$lte": 10_000_000}})
    assert ids(got) == ["cifar-wide"]
    got = searcher.search_similar_experiments(query, n_results=5, filters={"hypothesis_id": {"$in": ["depth"]}})
    assert sorted(ids(got)) == ["mlp-deeper", "mlp-shallow"]
    got = searcher.search_similar_experiments(query, n_results=5, filters={"depth": {"$lte": 3}})
    assert sorted(ids(got)) == ["cifar-small", "mlp-shallow"]
    for bad in ({"accuracy": {"$approx": 1}}, {"$or": []}, {"dataset": None}, {"accuracy": {"$in": []}},
                {"accuracy": {"$gte": float("nan")}}, "dataset=mnist"):
        with pytest.raises(InvalidFilterError):
            searcher.search_similar_experiments(query, filters=bad)  # type: ignore[arg-type]


def test_search_by_performance_and_hypothesis(searcher: ExperimentSearcher) -> None:
    got = searcher.search_by_performance(min_accuracy=0.9, max_parameters=1_000_000, dataset="mnist")
    assert ids(got) == ["mlp-deeper", "mlp-a", "mlp-shallow"]
    assert ids(searcher.search_by_performance(min_accuracy=0.5)) == ["mlp-deeper", "mlp-a", "mlp-shallow",
                                                                      "cifar-wide"]
    assert ids(searcher.search_by_performance(max_parameters=450_000, dataset="cifar10")) == ["cifar-small"]
    assert ids(searcher.search_by_hypothesis("width")) == ["mlp-a", "cifar-wide"]
    assert searcher.search_by_hypothesis("nobody") == []


def test_catalog_is_the_record_and_reindex_rebuilds(searcher: ExperimentSearcher) -> None:
    from sqlalchemy import select

    from unistore.schemas import Experiment, ExperimentMetric

    with searcher.catalog.session() as s:
        assert sorted(s.scalars(select(Experiment.name))) == sorted(EXPERIMENTS)
        metrics = sorted((n, v) for n, v in s.execute(select(ExperimentMetric.name, ExperimentMetric.value)))
    assert ("loss", 0.2) in metrics and len(metrics) == 6
    assert searcher.get_experiment("mlp-a") == EXPERIMENTS["mlp-a"]
    query = {"architecture": [784, 500, 250, 10], "config": {"dataset": "mnist"}}
    before = searcher.search_similar_experiments(query, n_results=5)
    # the index is lost
    if searcher.config.host:
        from unistore.experiments import get_chroma_client

        get_chroma_client(searcher.config).delete_collection(searcher.config.collection_name)
    else:
        searcher.close()
        from unistore.experiments import reset_chroma_client

        reset_chroma_client()
        shutil.rmtree(searcher.config.persist_directory)
    fresh = ExperimentSearcher(searcher.config, catalog_url=searcher.catalog_url)
    assert fresh.reindex() == 5
    after = fresh.search_similar_experiments(query, n_results=5)
    assert ids(after) == ids(before)
    assert [round(r["distance"], 4) for r in after] == [round(r["distance"], 4) for r in before]
    # re-indexing an experiment replaces it; deleting removes it from both
    fresh.index_experiment("mlp-a", {**EXPERIMENTS["mlp-a"], "final_performance": {"accuracy": 0.5}})
    assert ids(fresh.search_by_performance(min_accuracy=0.9, dataset="mnist")) == ["mlp-deeper", "mlp-shallow"]
    fresh.delete_experiment("mlp-a")
    assert fresh.count() == 4
    with pytest.raises(ExperimentNotFoundError):
        fresh.delete_experiment("mlp-a")
    with pytest.raises(KeyError):
        fresh.get_experiment("mlp-a")
    fresh.close()


def test_non_finite_metrics_write_nothing(chroma_config: ChromaConfig, catalog_url: str) -> None:
    s = ExperimentSearcher(chroma_config, catalog_url=catalog_url)
    with pytest.raises(NonFiniteMetricError, match="final_performance.accuracy"):
        s.index_experiments({"ok": EXPERIMENTS["mlp-a"],
                             "bad": {"architecture": [2, 2], "final_performance": {"accuracy": float("nan")}}})
    assert s.count() == 0
    with pytest.raises(KeyError):
        s.get_experiment("ok")


def test_server_down_names_the_host_and_keeps_the_catalog_row(catalog_url: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    s = ExperimentSearcher(ChromaConfig(host="127.0.0.1", port=port), catalog_url=catalog_url)
    with pytest.raises(SearchIndexUnavailableError, match=f"127.0.0.1:{port}") as info:
        s.index_experiment("exp", EXPERIMENTS["mlp-a"])
    assert isinstance(info.value, ConnectionError) and "reindex" in str(info.value)
    assert s.get_experiment("exp") == EXPERIMENTS["mlp-a"]  # the record was committed first


class WidestLayer:
    """A user's own embedding function: experiments are close when their widest layers are."""

    def __call__(self, input: list[str]) -> list[Any]:
        import json

        import numpy as np

        return [np.array([max(json.loads(doc).get("architecture") or [0]), 0.0], dtype=np.float32) for doc in input]


def test_own_embedding_function(chroma_config: ChromaConfig, tmp_path: Any) -> None:
    from dataclasses import replace

    s = ExperimentSearcher(replace(chroma_config, embedding_function=WidestLayer()), catalog_url=str(tmp_path / "c.db"))
    s.index_experiments(EXPERIMENTS)
    got = s.search_similar_experiments({"architecture": [3000, 10]}, n_results=2)
    assert sorted(ids(got)) == ["cifar-small", "cifar-wide"]  # widest layer 3072 in both, 784 elsewhere
    assert got[0]["distance"] == pytest.approx(72.0 ** 2)
    s.close()
