"""Conformance: ``cluster_labeled_dataset.md``, called as the document calls it.

| document section | test |
|---|---|
| Storage Design, Storage Format (SQLite schema, raw memmaps, dataset_info) | test_storage_format_is_read_as_documented |
| Constructor (arguments, defaults) | test_constructor_signature |
| Constructor: Raises | test_documented_errors |
| Output Formats: Without / With Metadata | test_output_formats |
| Methods: get_sample_by_id | test_get_sample_by_id |
| Methods: update_labels, Label Correction, Label Update Not Reflected | test_label_correction_workflow |
| Methods: get_cache_stats, prefill_cache, clear_cache; Troubleshooting (`_sample_cache`) | test_cache_methods |
| Debugging with Cache Stats, Slow Random Access, Multi-Worker DataLoader | test_cache_stats_describe_dataloader_reads |
| Label Types Explained | test_label_types |
| Example Usage: Basic Training Loop | test_basic_training_loop |
| Example Usage: With Metadata | test_metadata_loader_with_custom_collate |
| Performance: Cache Size Tuning, Prefilling Cache | test_cache_size_tuning_and_prefill |
| Performance: Memmap Mode | test_memmap_modes |
| Thread Safety | test_threads_share_the_cache_safely |
| (beyond the document) corrections survive a regenerated dataset.db | test_corrections_keep_applying_after_dataset_db_changes |
| (beyond the document) corrections that no longer fit stop with the commands that resolve it | test_stale_corrections_stop_with_the_fix |

Differs on purpose (README, "Seed documents"): ``mmap_mode="r+"``/``"w+"`` are refused (the embedding files are
never written through a dataset); label blobs are read by a restricted unpickler, never ``pickle.loads``;
corrections from ``update_labels`` live in the catalog (``unistore db export-labels`` writes them out), not in
``dataset.db``, which is only ever read.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
import random
import sqlite3
import threading
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from unistore.datasets import ClusterLabeledDataset
from unistore.errors import LabelCorrectionsError, UnistoreError, UnsupportedError

from ..datasets.builders import write_cluster_seed


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def clusters(tmp_path: Any) -> tuple[str, dict[str, Any]]:
    path = str(tmp_path / "output" / "clusters")
    return path, write_cluster_seed(path, n=40, dim=6, n_clusters=3)


def test_storage_format_is_read_as_documented(clusters: tuple[str, dict[str, Any]]) -> None:
    path, src = clusters
    before = {f: _sha(os.path.join(path, f)) for f in os.listdir(path)}
    ds = ClusterLabeledDataset(path)
    # shape from dataset_info, rows through embedding_idx, labels from the pickled blobs
    assert (len(ds), ds.embedding_dim, ds.n_clusters) == (40, 6, 3)
    base, steering, label = ds[9]
    np.testing.assert_array_equal(base.numpy(), src["base"][src["rows"][9]])
    np.testing.assert_array_equal(steering.numpy(), src["steering"][src["rows"][9]])
    np.testing.assert_array_equal(label.numpy(), src["labels"]["combined"][9])
    assert {f: _sha(os.path.join(path, f)) for f in os.listdir(path)} == before  # nothing written beside them


def test_constructor_signature() -> None:
    params = inspect.signature(ClusterLabeledDataset).parameters
    assert list(params)[:5] == ["dataset_dir", "label_type", "return_metadata", "mmap_mode", "cache_size"]
    assert [params[k].default for k in ("label_type", "return_metadata", "mmap_mode", "cache_size")] == \
        ["combined", False, "r", 1000]


def test_documented_errors(clusters: tuple[str, dict[str, Any]], tmp_path: Any) -> None:
    path, _ = clusters
    with pytest.raises(ValueError, match="label_type"):
        ClusterLabeledDataset(path, label_type="domain")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="dataset.db not found"):
        ClusterLabeledDataset(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClusterLabeledDataset(str(tmp_path / "missing"))
    assert not os.path.exists(tmp_path / "missing")
    short = str(tmp_path / "short")
    write_cluster_seed(short, n=40, dim=6, n_clusters=3)
    with open(os.path.join(short, "base_embeddings.npy"), "r+b") as f:
        f.truncate(6 * 4 * 39)  # one row short of dataset_size
    with pytest.raises(ValueError, match="base_embeddings"):
        ClusterLabeledDataset(short)


def test_output_formats(clusters: tuple[str, dict[str, Any]]) -> None:
    path, src = clusters
    base_emb, steering_emb, label = ClusterLabeledDataset(path)[3]
    assert base_emb.shape == steering_emb.shape == (6,) and label.shape == (3,)
    assert all(isinstance(t, torch.Tensor) for t in (base_emb, steering_emb, label))
    base_emb, steering_emb, label, metadata = ClusterLabeledDataset(path, return_metadata=True)[3]
    assert set(metadata) == {"sample_id", "sample_type", "text", "chroma_id", "suggestions", "steering_mode",
                             "source_label", "steering_label", "combined_label"}
    assert isinstance(metadata["sample_id"], int) and metadata["sample_id"] == 103
    assert metadata["text"] == "text of 103" and metadata["sample_type"] == "question"
    for kind in ("source", "steering", "combined"):
        assert isinstance(metadata[f"{kind}_label"], torch.Tensor)
        np.testing.assert_array_equal(metadata[f"{kind}_label"].numpy(), src["labels"][kind][3])


def test_get_sample_by_id(clusters: tuple[str, dict[str, Any]]) -> None:
    path, src = clusters
    dataset = ClusterLabeledDataset(path)
    sample = dataset.get_sample_by_id(112)
    if sample:
        print(sample["text"], sample["steering_mode"])
    assert sample is not None and sample["text"] == "text of 112" and sample["steering_mode"] == "residual"
    np.testing.assert_array_equal(sample["source_label"], src["labels"]["source"][12])
    assert dataset.get_sample_by_id(42) is None  # "Optional": an unknown id is None, not an error


def test_label_correction_workflow(clusters: tuple[str, dict[str, Any]]) -> None:
    path, src = clusters
    dataset = ClusterLabeledDataset(path, label_type="source")
    before = dataset[5][2].clone()
    dataset.update_labels(sample_id=105, source_label=np.array([1.0, 0.0, 0.0]), combined_label=None)
    np.testing.assert_array_equal(dataset[5][2].numpy(), [1, 0, 0])  # the cached sample was invalidated
    assert not torch.equal(before, dataset[5][2])
    sample = dataset.get_sample_by_id(105)
    assert sample is not None
    np.testing.assert_array_equal(sample["source_label"], [1, 0, 0])
    np.testing.assert_array_equal(sample["combined_label"], src["labels"]["combined"][5])  # kept
    for sample_id in (106, 107):  # the document's loop: positional sample_id, keyword label
        dataset.update_labels(sample_id, source_label=np.array([0.0, 0.0, 1.0]))
    dataset.clear_cache()
    fresh = ClusterLabeledDataset(path, label_type="source")  # a new process would see the same
    np.testing.assert_array_equal(fresh.__getitems__([5, 6, 7]).collated[2].numpy(), [[1, 0, 0], [0, 0, 1],
                                                                                       [0, 0, 1]])
    with pytest.raises(ValueError, match="shape"):
        dataset.update_labels(105, source_label=np.ones(4))


def test_cache_methods(clusters: tuple[str, dict[str, Any]]) -> None:
    path, src = clusters
    dataset = ClusterLabeledDataset(path, cache_size=10)
    assert dataset.get_cache_stats() == {"hits": 0, "misses": 0, "hit_rate": 0.0, "size": 0}
    dataset.prefill_cache(list(range(5)))
    assert len(dataset._sample_cache) == 5
    for i in range(8):
        dataset[i]
    stats = dataset.get_cache_stats()
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (5, 3, 5 / 8)
    for i in range(20):
        dataset[i]
    assert len(dataset._sample_cache) == 10  # never more than cache_size
    dataset.clear_cache()
    assert dataset.get_cache_stats()["hits"] == 0 and len(dataset._sample_cache) == 0
    # a batch part cached, part read: assembled in order, metadata and all
    with_meta = ClusterLabeledDataset(path, return_metadata=True, cache_size=10)
    with_meta.prefill_cache([1, 3, 5])
    base, steering, label, metadata = with_meta.__getitems__([5, 0, 3, 3, 9, 1]).collated
    assert [m["sample_id"] for m in metadata] == [105, 100, 103, 103, 109, 101]
    rows = [5, 0, 3, 3, 9, 1]
    np.testing.assert_array_equal(base.numpy(), src["base"][src["rows"][rows]])
    np.testing.assert_array_equal(label.numpy(), src["labels"]["combined"][rows])
    np.testing.assert_array_equal(metadata[2]["source_label"].numpy(), src["labels"]["source"][3])
    assert with_meta.get_cache_stats()["hits"] == 4


@pytest.mark.parametrize("workers,persistent", [(0, False), (2, False), (2, True)])
def test_cache_stats_describe_dataloader_reads(clusters: tuple[str, dict[str, Any]], workers: int,
                                               persistent: bool) -> None:
    path, src = clusters
    dataset = ClusterLabeledDataset(path, cache_size=500)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers, persistent_workers=persistent)
    for _ in range(2):  # the first epoch misses; the second hits where the reading process cached the sample
        for batch in loader:
            pass
    stats = dataset.get_cache_stats()
    assert stats["hits"] + stats["misses"] == 80  # every read is counted, in workers too
    if workers == 0:
        assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (40, 40, 0.5)
    elif not persistent:  # workers start afresh each epoch, each with an empty cache of its own
        assert (stats["hits"], stats["misses"]) == (0, 80)
    else:  # each worker kept what it read in the first epoch and reads about half of it again
        assert 0 < stats["hits"] < 40
    # and what the cache serves is the right samples
    order = list(range(40))
    random.Random(1).shuffle(order)
    got = dataset.__getitems__(order).collated
    np.testing.assert_array_equal(got[0].numpy(), src["base"][src["rows"][order]])
    np.testing.assert_array_equal(got[2].numpy(), src["labels"]["combined"][order])


def test_label_types(clusters: tuple[str, dict[str, Any]]) -> None:
    path, src = clusters
    for kind in ("source", "steering", "combined"):
        dataset = ClusterLabeledDataset(path, label_type=kind)
        base_emb, steering_emb, label = dataset[0]
        np.testing.assert_array_equal(label.numpy(), src["labels"][kind][0])


def test_basic_training_loop(clusters: tuple[str, dict[str, Any]]) -> None:
    path, _ = clusters
    torch.manual_seed(0)
    dataset = ClusterLabeledDataset(dataset_dir=path, label_type="combined", cache_size=1000)
    loader = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=0)
    model = nn.Sequential(nn.Linear(dataset.embedding_dim * 2, 512), nn.ReLU(), nn.Linear(512, dataset.n_clusters),
                          nn.Softmax(dim=-1))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    losses = []
    for _epoch in range(10):
        for base_emb, steering_emb, label in loader:
            combined = torch.cat([base_emb, steering_emb], dim=-1)
            output = model(combined)
            loss = criterion(output, label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    assert len(losses) == 20 and np.isfinite(losses).all() and losses[-1] < losses[0]


def test_metadata_loader_with_custom_collate(clusters: tuple[str, dict[str, Any]]) -> None:
    path, _ = clusters
    dataset = ClusterLabeledDataset(dataset_dir=path, label_type="combined", return_metadata=True)

    def custom_collate(samples: list[Any]) -> Any:
        base, steering, label, metadata = zip(*samples)
        return torch.stack(base), torch.stack(steering), torch.stack(label), list(metadata)

    loader = DataLoader(dataset, batch_size=16, collate_fn=custom_collate)
    seen = []
    for base_emb, steering_emb, label, metadata in loader:
        texts = [m["text"] for m in metadata]
        steering_modes = [m["steering_mode"] for m in metadata]
        assert len(texts) == len(steering_modes) == base_emb.shape[0] == label.shape[0]
        seen += [m["sample_id"] for m in metadata]
    assert seen == list(range(100, 140))


def test_cache_size_tuning_and_prefill(clusters: tuple[str, dict[str, Any]]) -> None:
    path, _ = clusters
    dataset_size = len(ClusterLabeledDataset(path))
    optimal_cache = max(100, dataset_size // 10)
    dataset = ClusterLabeledDataset(path, cache_size=optimal_cache)
    train_indices = list(range(len(dataset)))
    random.Random(0).shuffle(train_indices)
    dataset.prefill_cache(train_indices[:dataset._cache_size])
    for idx in train_indices:
        dataset[idx]
    assert dataset.get_cache_stats()["hit_rate"] == 1.0  # the first epoch has a warm cache


def test_memmap_modes(clusters: tuple[str, dict[str, Any]]) -> None:
    path, src = clusters
    for mode in ("r", "c"):
        np.testing.assert_array_equal(ClusterLabeledDataset(path, mmap_mode=mode)[1][0].numpy(),
                                      src["base"][src["rows"][1]])
    for mode in ("r+", "w+"):
        with pytest.raises(UnsupportedError, match="read-only"):
            ClusterLabeledDataset(path, mmap_mode=mode)


def test_threads_share_the_cache_safely(clusters: tuple[str, dict[str, Any]]) -> None:
    path, src = clusters
    dataset = ClusterLabeledDataset(path, label_type="steering", cache_size=16)
    errors: list[BaseException] = []

    def read(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                i = rng.randrange(40)
                np.testing.assert_array_equal(dataset[i][0].numpy(), src["base"][src["rows"][i]])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=read, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    dataset.update_labels(sample_id=102, steering_label=np.array([0.0, 1.0, 0.0]))
    for t in threads:
        t.join()
    assert not errors and len(dataset._sample_cache) <= 16
    np.testing.assert_array_equal(dataset[2][2].numpy(), [0, 1, 0])
    assert dataset.get_cache_stats()["hits"] + dataset.get_cache_stats()["misses"] == 801


def _rewrite_db(path: str, sql: str, *args: Any) -> None:
    conn = sqlite3.connect(os.path.join(path, "dataset.db"))
    conn.execute(sql, args)
    conn.commit()
    conn.close()


def test_corrections_keep_applying_after_dataset_db_changes(clusters: tuple[str, dict[str, Any]]) -> None:
    path, src = clusters
    ClusterLabeledDataset(path).update_labels(110, combined_label=np.array([0.0, 0.0, 1.0]))
    _rewrite_db(path, "UPDATE samples SET steering_mode = 'keyword' WHERE sample_id = 111")  # regenerated upstream
    again = ClusterLabeledDataset(path, return_metadata=True)
    assert again[11][3]["steering_mode"] == "keyword"  # the new dataset.db is what is read...
    np.testing.assert_array_equal(again[10][2].numpy(), [0, 0, 1])  # ...with the correction still applied
    np.testing.assert_array_equal(again[12][2].numpy(), src["labels"]["combined"][12])


def test_stale_corrections_stop_with_the_fix(clusters: tuple[str, dict[str, Any]], doc_catalog: str,
                                             tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from unistore.cli import main

    path, _ = clusters
    ClusterLabeledDataset(path).update_labels(115, source_label=np.array([1.0, 0.0, 0.0]))
    _rewrite_db(path, "DELETE FROM samples WHERE sample_id = 115")
    for _ in range(2):  # every open stops until the user decides
        with pytest.raises(LabelCorrectionsError, match="export-labels") as info:
            ClusterLabeledDataset(path)
    message = str(info.value)
    kept = message.split("kept in dataset '")[1].split("'")[0]
    out = str(tmp_path / "corrections.json")
    assert main(["db", "export-labels", kept, "--manual", "-o", out, "--url", doc_catalog]) == 0
    saved = json.load(open(out))
    assert [(r["sample_id"], r["kind"], r["label"]) for r in saved] == [(115, "source", [1.0, 0.0, 0.0])]
    assert main(["db", "drop-dataset", kept, "--url", doc_catalog]) == 0
    assert "dropped" in capsys.readouterr().out
    dataset = ClusterLabeledDataset(path)  # resolved: opens as dataset.db now is
    assert len(dataset) == 39 and dataset.get_sample_by_id(115) is None


def test_malicious_blob_is_refused_not_run(tmp_path: Any) -> None:
    """Differs on purpose: the document unpickles label blobs; unistore refuses what is not a numpy array."""
    path = str(tmp_path / "evil")
    write_cluster_seed(path, n=10, dim=4, n_clusters=3,
                       overrides={104: {"source_label": pickle.dumps(os.system)}})
    with pytest.raises(UnistoreError, match="sample_id 104"):
        ClusterLabeledDataset(path)


@pytest.mark.s3
def test_embeddings_on_s3(clusters: tuple[str, dict[str, Any]], s3: dict[str, Any]) -> None:
    """The same dataset with its embeddings in a bucket: the document's calls, plus ``storage_options``."""
    path, src = clusters
    local = ClusterLabeledDataset(path)
    url = f"s3://{s3['bucket']}/clusters.zarr"
    name = local.export(url, "zarr", compression="zstd", chunks=(8,), storage_options=s3["options"])
    dataset = ClusterLabeledDataset(url, label_type="combined", cache_size=100, storage_options=s3["options"],
                                    dataset_name=name)
    loader = DataLoader(dataset, batch_size=8, shuffle=False, num_workers=2)
    base = torch.cat([b for b, _, _ in loader])
    np.testing.assert_array_equal(base.numpy(), src["base"][src["rows"]])
    dataset.update_labels(104, combined_label=np.array([0.0, 1.0, 0.0]))
    np.testing.assert_array_equal(dataset[4][2].numpy(), [0, 1, 0])
    assert dataset.get_cache_stats()["misses"] == 41
