"""Conformance: ``structure_net_data_system.md``, called as the document calls it (``data_factory`` is
``unistore.datasets``, ``data_factory.search`` / ``time_series_storage`` / ``nal_integration`` are
``unistore.experiments``).

| document section | test |
|---|---|
| Verify Installation (list_available_datasets, get_chroma_client().count()) | test_verify_installation |
| Basic Usage: Loading a Dataset (default mnist, cifar10 batch_size, cifar100 subset_size) | test_basic_usage |
| Using with the NAL (a dataset name in control parameters) | test_memory_efficient_nal |
| Dataset Configuration: Available Datasets, Configuration Structure, Accessing Configuration | test_dataset_configuration |
| ChromaDB Integration: Basic Search Operations, Advanced Search Queries | test_search_operations |
| Best Practices 4: index immediately, index_experiments_batch | test_search_operations |
| Automatic Integration (experiments indexed as the lab runs them) | test_memory_efficient_nal |
| Metadata Tracking: Automatic Tracking, Manual Metadata | test_metadata_tracking |
| Adding New Datasets: Steps 1-3 (plain torch datasets, subset_size) | test_adding_a_new_dataset |
| Advanced Features: Caching, force_reload, Subset Loading, Custom Transformations | test_caching_subsets_and_transforms |
| Best Practices 5: Error Handling | test_error_handling |
| Troubleshooting 1: DATA_DIR; 2: ChromaConfig, reset_chroma_client; Debugging (logger, DATASET_CACHE, count) | test_troubleshooting |
| NAL Integration: create_memory_efficient_nal, LabConfig, ChromaConfig, TimeSeriesConfig | test_memory_efficient_nal |
| Time Series Storage (store, retrieve epochs=slice(-10, None), summary statistics) | test_time_series_storage |
| Hybrid Storage Pattern | test_hybrid_storage |
| (remote data) a dataset whose store is on S3 | test_create_dataset_from_s3 |

External pieces: the Neural Architecture Lab is stood in for by ``ReferenceLab`` (any object with its methods
works); StandardizedLogger is not part of unistore (dataset uses are recorded in the catalog instead, where
``dataset_usage_history`` reads them).  Nothing is downloaded: MNIST and CIFAR are imported from the files the
datasets ship as, built here.  Differs on purpose: the logger is ``unistore``, not ``data_factory``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import numpy as np
import pytest
import torch

from unistore.datasets import (
    DATASET_CACHE,
    DatasetConfig,
    DatasetLoader,
    DatasetNotFoundError,
    create_dataset,
    dataset_usage_history,
    get_dataset_config,
    import_cifar,
    import_mnist,
    list_available_datasets,
    register_dataset,
    register_loader,
)
from unistore.datasets.metadata import DatasetMetadata, track_dataset_usage
from unistore.experiments import (
    ChromaConfig,
    ExperimentSearcher,
    HybridExperimentStorage,
    InvalidFilterError,
    LabConfig,
    TimeSeriesConfig,
    TimeSeriesStorage,
    create_memory_efficient_nal,
    get_chroma_client,
    reset_chroma_client,
)

from ..datasets.builders import write_cifar, write_mnist

pytestmark = pytest.mark.leaves_threads  # embedded Chroma keeps threads for the process's life


@pytest.fixture(autouse=True)
def project(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A working directory with MNIST, CIFAR-10 and CIFAR-100 imported under ./data (the default data root)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.delenv("UNISTORE_DATA_DIR", raising=False)
    write_mnist(tmp_path / "raw" / "mnist", n_train=40, n_test=12)
    write_cifar(tmp_path / "raw" / "cifar10", "cifar10", n=12)
    write_cifar(tmp_path / "raw" / "cifar100", "cifar100", n=30)
    import_mnist(str(tmp_path / "raw" / "mnist"))
    import_cifar(str(tmp_path / "raw" / "cifar10"), variant="cifar10")
    import_cifar(str(tmp_path / "raw" / "cifar100"), variant="cifar100")
    DATASET_CACHE.clear()
    reset_chroma_client()
    yield tmp_path
    DATASET_CACHE.clear()
    reset_chroma_client()


def test_verify_installation() -> None:
    assert {"mnist", "cifar10", "cifar100", "imagenet"} <= set(list_available_datasets())
    client = get_chroma_client()
    assert client.count() == 0
    ExperimentSearcher().index_experiment("exp_001", {"architecture": [784, 10]})
    assert get_chroma_client().count() == 1
    assert client.heartbeat() > 0  # still Chroma's client underneath


def test_basic_usage() -> None:
    dataset = create_dataset()
    train_loader, test_loader, config = dataset["train_loader"], dataset["test_loader"], dataset["config"]
    assert (config.name, config.input_shape, config.num_classes) == ("mnist", (1, 28, 28), 10)
    images, labels = next(iter(train_loader))
    assert images.shape[1:] == (1, 28, 28) and labels.dtype == torch.int64
    assert sum(len(y) for _, y in test_loader) == 12
    cifar10 = create_dataset("cifar10", batch_size=128)
    assert next(iter(cifar10["train_loader"]))[0].shape == (60, 3, 32, 32)  # 5 batches of 12, fewer than 128
    small_dataset = create_dataset("cifar100", subset_size=20)
    assert sum(len(y) for _, y in small_dataset["train_loader"]) == 20
    assert sum(len(y) for _, y in small_dataset["test_loader"]) == 20


def test_dataset_configuration() -> None:
    config = get_dataset_config("cifar10")
    assert config.input_size == 3072 and config.num_classes == 10
    assert (config.full_name, config.num_train_samples, config.num_test_samples) == ("CIFAR-10", 50000, 10000)
    assert get_dataset_config("imagenet").input_shape == (3, 224, 224)
    fields = set(DatasetConfig.__dataclass_fields__)
    assert {"name", "full_name", "description", "input_shape", "num_classes", "num_train_samples",
            "num_test_samples"} <= fields


def test_search_operations() -> None:
    searcher = ExperimentSearcher()
    searcher.index_experiment(experiment_id="exp_001", experiment_data={
        "architecture": [784, 512, 256, 10], "final_performance": {"accuracy": 0.95},
        "config": {"dataset": "mnist", "epochs": 20}})
    experiments = [("exp_002", {"architecture": [784, 64, 10], "final_performance": {"accuracy": 0.80},
                                "config": {"dataset": "mnist"}, "hypothesis_id": "canonical_operators"}),
                   ("exp_003", {"architecture": [3072, 1024, 512, 10], "final_performance": {"accuracy": 0.88},
                                "config": {"dataset": "cifar10"}, "hypothesis_id": "canonical_operators"})]
    assert searcher.index_experiments_batch([(exp_id, data) for exp_id, data in experiments]) == 2
    results = searcher.search_similar_experiments(query_experiment={"architecture": [784, 500, 250, 10]},
                                                  n_results=5)
    assert results[0]["experiment_id"] == "exp_001" and len(results) == 3
    high_performers = searcher.search_by_performance(min_accuracy=0.90, max_parameters=1_000_000, dataset="mnist")
    assert [r["experiment_id"] for r in high_performers] == ["exp_001"]
    similar_archs = searcher.search_by_architecture(architecture=[784, 512, 256, 128, 10], n_results=10)
    assert similar_archs[0]["experiment_id"] == "exp_001"
    hypothesis_results = searcher.search_by_hypothesis(hypothesis_id="canonical_operators", n_results=20)
    assert [r["experiment_id"] for r in hypothesis_results] == ["exp_003", "exp_002"]
    filtered_results = searcher.search_similar_experiments(
        query_experiment={"architecture": [3072, 1000, 10]},
        filters={"dataset": "cifar10", "accuracy": {"$gte": 0.85}, "parameters": {"$lte": 5_000_000}})
    assert [r["experiment_id"] for r in filtered_results] == ["exp_003"]
    with pytest.raises(InvalidFilterError, match="compares numbers"):
        searcher.search_similar_experiments({"architecture": [784, 10]}, filters={"accuracy": {"$gte": "high"}})


def test_metadata_tracking(doc_catalog: str) -> None:
    create_dataset("cifar10")  # every creation is recorded
    rows = dataset_usage_history("cifar10")
    assert len(rows) == 1 and rows[0]["purpose"] == "create_dataset"
    metadata = DatasetMetadata(dataset_name="custom_dataset", version="1.0.0", source="local_files",
                               preprocessing_steps=["normalize", "augment"],
                               statistics={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    track_dataset_usage(experiment_id="exp_123", dataset_metadata=metadata,
                        subset_info={"size": 5000, "split": "validation"})
    (use,) = dataset_usage_history("custom_dataset")
    details = use["details"]
    assert use["experiment_id"] == "exp_123" and details["subset_info"] == {"size": 5000, "split": "validation"}
    assert details["statistics"]["std"] == [0.229, 0.224, 0.225]
    assert details["preprocessing_steps"] == ["normalize", "augment"]


class _Squares(torch.utils.data.Dataset):
    def __init__(self, n: int, offset: int):
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return torch.full((3, 64, 64), float(i + self.offset)), (i + self.offset) % 50


def test_adding_a_new_dataset() -> None:
    MY_DATASET = DatasetConfig(name="mydataset", full_name="My Custom Dataset",  # noqa: N806 - the document's
                               description="Description of my dataset", input_shape=(3, 64, 64), num_classes=50,
                               num_train_samples=100, num_test_samples=20)
    register_dataset(MY_DATASET)

    class MyDatasetLoader(DatasetLoader):
        def load_data(self) -> tuple[Any, Any]:
            return 100, 20

        def get_transform(self, train: bool = True) -> Any:
            return None

        def create_datasets(self, train_data: Any, test_data: Any) -> tuple[Any, Any]:
            return _Squares(train_data, 0), _Squares(test_data, 1000)  # plain torch datasets

    register_loader("mydataset", MyDatasetLoader)
    assert "mydataset" in list_available_datasets()
    dataset = create_dataset("mydataset")
    assert sum(len(y) for _, y in dataset["train_loader"]) == 100
    small = create_dataset("mydataset", subset_size=10, batch_size=4)
    seen = torch.cat([x[:, 0, 0, 0] for x, _ in small["train_loader"]])
    assert len(seen) == 10 and len(set(seen.tolist())) == 10 and seen.max() < 100
    assert sum(len(y) for _, y in small["test_loader"]) == 10


def test_caching_subsets_and_transforms() -> None:
    dataset1 = create_dataset("cifar10")
    dataset2 = create_dataset("cifar10")
    assert dataset2["train_loader"] is dataset1["train_loader"]
    dataset3 = create_dataset("cifar10", force_reload=True)
    assert dataset3["train_loader"] is not dataset1["train_loader"]
    dev_dataset = create_dataset("cifar100", subset_size=7, batch_size=32)
    assert sum(len(y) for _, y in dev_dataset["train_loader"]) == 7

    def flip(image: Any) -> Any:  # stands in for a torchvision transform (any callable on an image tensor)
        return image.flip(-1)

    class CustomLoader(DatasetLoader):
        def get_transform(self, train: bool = True) -> Any:
            return flip if train else None

    register_loader("cifar10", CustomLoader)
    try:
        custom = create_dataset("cifar10", force_reload=True, batch_size=60)
        plain = create_dataset("cifar100", batch_size=60)  # untouched
        flipped = next(iter(custom["train_loader"]))[0]
        register_loader("cifar10", DatasetLoader)
        original = next(iter(create_dataset("cifar10", force_reload=True, batch_size=60)["train_loader"]))[0]
        assert torch.equal(flipped, original.flip(-1)) and plain["config"].name == "cifar100"
    finally:
        register_loader("cifar10", DatasetLoader)


def test_error_handling() -> None:
    with pytest.raises(DatasetNotFoundError, match="unknown_dataset") as info:
        create_dataset("unknown_dataset")
    assert "mnist" in str(info.value) and "mnist" in list_available_datasets()


def test_troubleshooting(project: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    os.rename("data", "elsewhere")
    os.environ["DATA_DIR"] = str(project / "elsewhere")
    monkeypatch.setenv("DATA_DIR", str(project / "elsewhere"))  # (restored after the test)
    assert create_dataset("cifar10")["config"].name == "cifar10"
    reset_chroma_client()
    config = ChromaConfig(persist_directory=str(project / "custom" / "chroma"), collection_name="my_experiments")
    searcher = ExperimentSearcher(config)
    searcher.index_experiment("exp_9", {"architecture": [10, 2]})
    assert get_chroma_client(config).count() == 1 and get_chroma_client().count() == 0
    logging.getLogger("unistore").setLevel(logging.DEBUG)
    assert len(DATASET_CACHE) >= 1 and all(isinstance(k, tuple) for k in DATASET_CACHE)


def test_memory_efficient_nal(project: Any) -> None:
    nal_config = LabConfig(max_parallel_experiments=8, save_best_models=False, results_dir=str(project / "nal"))
    chroma_config = ChromaConfig(persist_directory=str(project / "chroma_nal"), collection_name="nal_experiments")
    timeseries_config = TimeSeriesConfig(storage_dir=str(project / "timeseries"), use_hdf5=True, compression="gzip")
    nal, chroma_integration = create_memory_efficient_nal(nal_config, chroma_config, timeseries_config)
    ids = asyncio.run(nal.test_hypothesis("optimal_seeds", architectures=[(784, 128, 10), (784, 32, 10)],
                                          dataset="cifar10"))
    assert nal.results == {}  # offloaded as they completed
    searcher = chroma_integration.searcher
    assert searcher.count() == 2 and sorted(r["experiment_id"] for r in
                                            searcher.search_by_hypothesis("optimal_seeds")) == sorted(ids)
    record = chroma_integration.storage.retrieve_experiment(ids[0], include_training_history=True)
    assert len(record["training_history"]) == nal_config.epochs


def test_time_series_storage() -> None:
    storage = TimeSeriesStorage()
    epoch_data = [{"epoch": e, "loss": 2.3 / (e + 1), "accuracy": min(0.1 + 0.01 * e, 1.0)} for e in range(300)]
    storage_key = storage.store_training_history(experiment_id="exp_001", epoch_data=epoch_data,
                                                 metadata={"model": "resnet50", "dataset": "imagenet"})
    recent_epochs, metadata = storage.retrieve_training_history(storage_key, epochs=slice(-10, None))
    assert [r["epoch"] for r in recent_epochs] == list(range(290, 300))
    assert metadata["model"] == "resnet50"
    stats = storage.get_summary_statistics(storage_key)
    assert stats["loss"]["min"] == pytest.approx(2.3 / 300) and stats["n_epochs"] == 300
    assert stats["accuracy"]["max"] == pytest.approx(min(0.1 + 0.01 * 299, 1.0))


def test_hybrid_storage() -> None:
    hybrid = HybridExperimentStorage()
    history = [{"epoch": e, "loss": 1.0 / (e + 1)} for e in range(5000)]
    hybrid.store_experiment(experiment_id="exp_001", experiment_data={"architecture": [784, 512, 256, 10],
                                                                      "accuracy": 0.95, "parameters": 1.2e6},
                            training_history=history)
    exp_data = hybrid.retrieve_experiment("exp_001", include_training_history=True)
    assert len(exp_data["training_history"]) == 5000 and exp_data["training_history"][-1]["epoch"] == 4999
    assert hybrid.searcher.search_by_performance(min_accuracy=0.9)[0]["experiment_id"] == "exp_001"


@pytest.mark.s3
def test_create_dataset_from_s3(project: Any, s3: dict[str, Any]) -> None:
    root = f"s3://{s3['bucket']}/data"
    import_cifar(str(project / "raw" / "cifar10"), root, variant="cifar10", storage_options=s3["options"])
    remote = create_dataset("cifar10", batch_size=16, data_dir=root, storage_options=s3["options"])
    local = create_dataset("cifar10", batch_size=16)
    x_remote = torch.cat([x for x, _ in remote["test_loader"]])
    x_local = torch.cat([x for x, _ in local["test_loader"]])
    np.testing.assert_array_equal(x_remote.numpy(), x_local.numpy())
    assert len(dataset_usage_history("cifar10")) == 2  # both uses recorded in the one default catalog
