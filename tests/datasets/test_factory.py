"""The dataset factory: registration, errors, subsets, the cache, importers on real MNIST/CIFAR files, usage records."""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore.datasets import (
    DATASET_CACHE,
    DatasetConfig,
    DatasetLoader,
    DatasetMetadata,
    DatasetNotFoundError,
    create_dataset,
    dataset_usage_history,
    factory,
    get_dataset_config,
    import_cifar,
    import_mnist,
    list_available_datasets,
    register_dataset,
    register_loader,
    track_dataset_usage,
    write_classification_store,
)
from unistore.errors import CorruptDataError, NonFiniteMetricError, TruncatedDataError, UnsafePickleError

from .builders import write_cifar, write_mnist

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("UNISTORE_CATALOG_URL", raising=False)
    monkeypatch.delenv("DATA_DIR", raising=False)
    configs, loaders = dict(factory._CONFIGS), dict(factory._LOADERS)
    DATASET_CACHE.clear()
    yield
    factory._CONFIGS.clear()
    factory._CONFIGS.update(configs)
    factory._LOADERS.clear()
    factory._LOADERS.update(loaders)
    DATASET_CACHE.clear()


def test_builtin_configs() -> None:
    assert {"mnist", "cifar10", "cifar100", "imagenet", "synthetic"} <= set(list_available_datasets())
    assert get_dataset_config("cifar10").input_size == 3072
    assert get_dataset_config("mnist").input_shape == (1, 28, 28) and get_dataset_config("imagenet").num_classes == 1000


def test_unknown_dataset_lists_what_is_available(tmp_path: Any) -> None:
    with pytest.raises(DatasetNotFoundError, match="available: .*cifar10.*mnist") as e:
        create_dataset("unknown_dataset", data_dir=str(tmp_path))
    assert isinstance(e.value, ValueError)
    with pytest.raises(DatasetNotFoundError, match="nothing is downloaded"):
        create_dataset("cifar10", data_dir=str(tmp_path))


def test_synthetic_dataset_loaders_subset_cache_and_force_reload(tmp_path: Any) -> None:
    root = str(tmp_path / "data")
    data = create_dataset("synthetic", batch_size=32, data_dir=root)
    assert set(data) == {"train_loader", "test_loader", "config"}
    images, labels = next(iter(data["train_loader"]))
    assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert len(data["train_loader"].dataset) == 512 and len(data["test_loader"].dataset) == 128
    # the values are the stored bytes, scaled and normalised as the config says
    store = us.open_store(os.path.join(root, "synthetic"))
    first = next(iter(data["test_loader"]))  # test loader is not shuffled
    raw = store["test/images"][:32].astype(np.float32) / 255.0
    np.testing.assert_allclose(first[0].numpy(), (raw - 0.5) / 0.25, rtol=1e-6)
    np.testing.assert_array_equal(first[1].numpy(), store["test/labels"][:32])
    assert create_dataset("synthetic", batch_size=32, data_dir=root) is data  # cached
    reloaded = create_dataset("synthetic", batch_size=32, data_dir=root, force_reload=True)
    assert reloaded is not data and reloaded["train_loader"] is not data["train_loader"]
    small = create_dataset("synthetic", batch_size=16, subset_size=100, data_dir=root)
    assert len(small["train_loader"].dataset) == 100 and len(small["test_loader"].dataset) == 100
    seen = torch.cat([y for _, y in small["train_loader"]])
    assert len(seen) == 100
    tiny = create_dataset("synthetic", batch_size=16, subset_size=100, data_dir=root, seed=1)
    assert not np.array_equal(tiny["train_loader"].dataset.rows, small["train_loader"].dataset.rows)


def test_data_dir_from_environment(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISTORE_DATA_DIR", str(tmp_path / "env-root"))
    create_dataset("synthetic", batch_size=8)
    assert os.path.isdir(tmp_path / "env-root" / "synthetic")


def test_registered_dataset_with_custom_loader_in_any_format(tmp_path: Any) -> None:
    rng = np.random.default_rng(0)
    train = (rng.standard_normal((40, 6)).astype(np.float32), rng.integers(0, 3, 40))
    test = (rng.standard_normal((10, 6)).astype(np.float32), rng.integers(0, 3, 10))
    write_classification_store(str(tmp_path / "tab.zarr"), train, test, format="zarr", compression="zstd", chunks=8)
    register_dataset(DatasetConfig("tab", "Tabular", "six features", (6,), 3, 40, 10))
    calls = []

    class Doubling(DatasetLoader):
        def get_transform(self, train: bool = True) -> Any:
            calls.append(train)
            return lambda x: x * 2

    register_loader("tab", Doubling)
    data = create_dataset("tab", batch_size=10, data_dir=str(tmp_path))
    x, y = next(iter(data["test_loader"]))
    np.testing.assert_allclose(x.numpy(), test[0] * 2, rtol=1e-6)
    np.testing.assert_array_equal(y.numpy(), test[1])
    assert calls == [True, False]
    register_dataset(DatasetConfig("tab", "Tabular", "wrong shape", (7,), 3, 40, 10))
    with pytest.raises(us.errors.ShapeMismatchError, match="input_shape"):
        create_dataset("tab", batch_size=10, data_dir=str(tmp_path), force_reload=True)
    with pytest.raises(TypeError):
        register_loader("tab", object)  # type: ignore[arg-type]


def test_dataloader_workers_read_factory_stores(tmp_path: Any) -> None:
    data = create_dataset("synthetic", batch_size=64, data_dir=str(tmp_path), num_workers=2)
    serial = create_dataset("synthetic", batch_size=64, data_dir=str(tmp_path), num_workers=0)
    for (xa, ya), (xb, yb) in zip(data["train_loader"], serial["train_loader"]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ------------------------------------------------------------------ importers
@pytest.mark.parametrize("gz", [False, True])
def test_import_mnist_idx_files(tmp_path: Any, gz: bool) -> None:
    arrays = write_mnist(tmp_path / "raw", gz=gz)
    url = import_mnist(str(tmp_path / "raw"), str(tmp_path / "data"))
    store = us.open_store(url)
    np.testing.assert_array_equal(store["train/images"][:][:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(store["test/labels"][:], arrays["t10k-labels-idx1-ubyte"])
    data = create_dataset("mnist", batch_size=10, data_dir=str(tmp_path / "data"))
    x, y = next(iter(data["test_loader"]))
    want = (arrays["t10k-images-idx3-ubyte"][:10, None] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(x.numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(us.errors.StoreExistsError):
        import_mnist(str(tmp_path / "raw"), str(tmp_path / "data"))


def test_bad_mnist_files(tmp_path: Any) -> None:
    write_mnist(tmp_path / "raw")
    labels = tmp_path / "raw" / "train-labels-idx1-ubyte"
    good = labels.read_bytes()
    labels.write_bytes(b"\x00\x00\x08\x03" + good[4:])
    with pytest.raises(CorruptDataError, match="train-labels-idx1-ubyte has magic number"):
        import_mnist(str(tmp_path / "raw"), str(tmp_path / "data"))
    labels.write_bytes(good[:-5])
    with pytest.raises(TruncatedDataError, match="train-labels-idx1-ubyte is 33 bytes"):
        import_mnist(str(tmp_path / "raw"), str(tmp_path / "data"))
    assert not os.path.exists(tmp_path / "data" / "mnist")
    os.remove(labels)
    with pytest.raises(DatasetNotFoundError, match="train-labels-idx1-ubyte"):
        import_mnist(str(tmp_path / "raw"), str(tmp_path / "data"))


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_import_cifar_batches(tmp_path: Any, variant: str) -> None:
    images, labels = write_cifar(tmp_path / "raw", variant)
    url = import_cifar(str(tmp_path / "raw"), str(tmp_path / "data"), variant=variant)
    store = us.open_store(url)
    np.testing.assert_array_equal(store["train/images"][:], images.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(store["train/labels"][:], labels)
    data = create_dataset(variant, batch_size=4, data_dir=str(tmp_path / "data"))
    x, y = next(iter(data["test_loader"]))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64


class _Evil:
    def __reduce__(self) -> Any:
        return (os.system, ("touch pwned",))


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path / "raw")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw" / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(UnsafePickleError, match="data_batch_3.*posix.system|data_batch_3.*os.system"):
        import_cifar(str(tmp_path / "raw"), str(tmp_path / "data"))
    assert not os.path.exists(tmp_path / "pwned") and not os.path.exists(tmp_path / "data" / "cifar10")
    (tmp_path / "raw" / "data_batch_3").write_bytes(b"\x80\x02}q\x00")
    with pytest.raises(CorruptDataError, match="data_batch_3"):
        import_cifar(str(tmp_path / "raw"), str(tmp_path / "data"))


@pytest.mark.s3
def test_factory_reads_from_s3_root(tmp_path: Any, s3: dict[str, Any]) -> None:
    write_mnist(tmp_path / "raw", gz=True)
    s3["fs"].put(str(tmp_path / "raw") + "/", f"{s3['bucket']}/raw", recursive=True)
    root = f"s3://{s3['bucket']}/data"
    import_mnist(f"s3://{s3['bucket']}/raw", root, storage_options=s3["options"])
    remote = create_dataset("mnist", batch_size=10, data_dir=root, storage_options=s3["options"])
    import_mnist(str(tmp_path / "raw"), str(tmp_path / "data"))
    local = create_dataset("mnist", batch_size=10, data_dir=str(tmp_path / "data"))
    for (xa, ya), (xb, yb) in zip(remote["test_loader"], local["test_loader"]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ------------------------------------------------------------------ usage metadata
def test_usage_records_in_the_catalog(catalog_url: str, tmp_path: Any) -> None:
    metadata = DatasetMetadata(dataset_name="custom_dataset", version="1.2.0", source="local_files",
                               preprocessing_steps=["normalize", "augment"],
                               statistics={"mean": np.array([0.485, 0.456, 0.406]), "std": [0.229, 0.224, 0.225]})
    first = track_dataset_usage("exp_123", metadata, {"size": 5000, "split": "validation"}, catalog_url=catalog_url)
    track_dataset_usage("exp_124", metadata, catalog_url=catalog_url)
    create_dataset("synthetic", batch_size=8, subset_size=50, data_dir=str(tmp_path), experiment_id="exp_123",
                   catalog_url=catalog_url)
    rows = dataset_usage_history("custom_dataset", catalog_url=catalog_url)
    assert [r["experiment_id"] for r in rows] == ["exp_123", "exp_124"] and rows[0]["id"] == first
    assert rows[0]["version"] == "1.2.0" and rows[0]["details"]["subset_info"] == {"size": 5000, "split": "validation"}
    assert rows[0]["details"]["statistics"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert rows[0]["details"]["preprocessing_steps"] == ["normalize", "augment"]
    assert rows[0]["used_at"] is not None
    synth = dataset_usage_history("synthetic", catalog_url=catalog_url)
    assert len(synth) == 1 and synth[0]["experiment_id"] == "exp_123" and synth[0]["purpose"] == "create_dataset"
    assert synth[0]["details"]["subset_info"] == {"size": 50, "train_rows": 50, "test_rows": 50}
    assert [r["dataset"] for r in dataset_usage_history(experiment_id="exp_123", catalog_url=catalog_url)] == [
        "custom_dataset", "synthetic"]
    bad = DatasetMetadata(dataset_name="custom_dataset", statistics={"mean": float("nan")})
    with pytest.raises(NonFiniteMetricError):
        track_dataset_usage("exp_125", bad, catalog_url=catalog_url)
    assert len(dataset_usage_history("custom_dataset", catalog_url=catalog_url)) == 2


def test_create_dataset_records_in_the_default_catalog(tmp_path: Any) -> None:
    """create_dataset and dataset_usage_history agree on the default catalog; the data root gets none."""
    create_dataset("synthetic", batch_size=8, data_dir=str(tmp_path))
    create_dataset("synthetic", batch_size=8, data_dir=str(tmp_path))  # cached loaders, still a recorded use
    rows = dataset_usage_history("synthetic")
    assert len(rows) == 2 and rows[0]["experiment_id"] is None
    assert not os.path.exists(tmp_path / "catalog.db")


def test_cli_import_and_list(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from unistore.cli import main

    write_cifar(tmp_path / "raw")
    data = str(tmp_path / "data")
    assert main(["datasets", "import", "cifar10", str(tmp_path / "raw"), "--data-dir", data, "--format", "zarr"]) == 0
    assert us.open_store(os.path.join(data, "cifar10")).format == "zarr"
    assert main(["datasets", "list", "--data-dir", data]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("cifar10 "))
    assert "3x32x32" in line and os.path.join(data, "cifar10") in line
    assert main(["datasets", "import", "cifar10", str(tmp_path / "raw"), "--data-dir", data]) == 2
    assert "already exists" in capsys.readouterr().err
