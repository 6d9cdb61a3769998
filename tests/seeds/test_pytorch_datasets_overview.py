"""Conformance: ``pytorch_datasets_overview.md``, called as the document calls it.

| document section | test |
|---|---|
| Quick Start: JASPER Steering Dataset (create_loader, loader.dataset_obj.set_epoch) | test_quick_start_jasper |
| Quick Start: Cluster Labeled Dataset | test_quick_start_cluster_labeled |
| Key Features: Zero I/O During Training (preloaded; no disk access in __getitem__) | test_preloaded_jasper_reads_no_files |
| Key Features: Curriculum Learning (deterministic per-epoch sampling) | test_quick_start_jasper |
| Key Features: Distributed Training (disjoint shards, epoch-synchronised shuffling) | test_distributed_shards |
| Key Features: Memory Management (memmap, LRU cache); Performance Tips | test_quick_start_cluster_labeled |
| File Formats (both trees) | test_quick_start_jasper, test_quick_start_cluster_labeled (built as documented) |
| Validation (validate_first_batch, AssertionError on a bad batch) | test_validate_first_batch |

The per-class documents have their own modules (``test_jasper_steering_dataset``, ``test_cluster_labeled_dataset``).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from unistore.datasets import ClusterLabeledDataset, JASPERSteeringDataset, create_loader
from unistore.datasets.loader import validate_first_batch

from ..datasets.builders import make_jasper, write_cluster_seed, write_jasper_pt


@pytest.fixture
def output(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)
    jasper = make_jasper(n_pairs=100, dim=8)
    write_jasper_pt("output/dataset", jasper)
    clusters = write_cluster_seed("output/clusters", n=50, dim=8, n_clusters=4)
    return {"jasper": jasper, "clusters": clusters}


def test_quick_start_jasper(output: dict[str, Any]) -> None:
    loader = create_loader(dataset_dir="output/dataset", split="train", batch_size=32, num_workers=4)
    variants = []
    for epoch in range(3):
        loader.dataset_obj.set_epoch(epoch)
        seen = 0
        for batch in loader:
            question_emb = batch["question_emb"]
            target_source_emb = batch["target_source_emb"]
            steering = batch["steering"]
            negative_embs = batch["negative_embs"]
            assert question_emb.shape[1:] == target_source_emb.shape[1:] == steering.shape[1:] == (8,)
            assert negative_embs.shape[1:] == (4, 8)
            seen += len(question_emb)
        assert seen == len(output["jasper"]["train_idx"])
        variants.append(loader.dataset_obj.__getitems__(list(range(len(loader.dataset_obj)))).collated[
            "steering_variant"])
    loader.dataset_obj.set_epoch(1)  # deterministic per-epoch sampling
    assert torch.equal(loader.dataset_obj.__getitems__(list(range(len(loader.dataset_obj)))).collated[
        "steering_variant"], variants[1])


def test_quick_start_cluster_labeled(output: dict[str, Any]) -> None:
    src = output["clusters"]
    dataset = ClusterLabeledDataset(dataset_dir="output/clusters", label_type="combined", cache_size=1000)
    loader = DataLoader(dataset, batch_size=32, shuffle=True)
    rows = 0
    for base_emb, steering_emb, label in loader:
        assert base_emb.shape[1:] == steering_emb.shape[1:] == (8,) and label.shape[1:] == (4,)
        rows += len(base_emb)
    assert rows == 50
    # memmap + cache: the raw files are mapped read-only, never rewritten
    fast = ClusterLabeledDataset("output/clusters", cache_size=max(1, len(dataset) // 10), mmap_mode="r")
    np.testing.assert_array_equal(fast[7][0].numpy(), src["base"][src["rows"][7]])


def test_preloaded_jasper_reads_no_files(output: dict[str, Any]) -> None:
    dataset = JASPERSteeringDataset("output/dataset", split="train")
    before = dataset.__getitems__(list(range(16))).collated
    shutil.move("output/dataset", "output/moved-away")  # nothing on disk any more
    after = next(iter(DataLoader(dataset, batch_size=16)))
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_distributed_shards(output: dict[str, Any]) -> None:
    """Each rank (rank/world_size as a DistributedSampler takes them) gets a disjoint shard; every rank moves to
    the same epoch's order."""
    n = len(output["jasper"]["train_idx"])
    for epoch in (0, 1):
        shards = []
        for rank in range(3):
            loader = create_loader("output/dataset", "train", batch_size=8, distributed=True, rank=rank,
                                   world_size=3)
            from unistore.datasets import set_epoch

            set_epoch(loader, epoch)
            shards.append(list(loader.sampler))
        assert len({len(s) for s in shards}) == 1
        union = [i for s in shards for i in s]
        assert set(union) == set(range(n)) and len(union) - n < 3  # padded by at most world_size - 1


def test_validate_first_batch(output: dict[str, Any]) -> None:
    loader = create_loader("output/dataset", "train", batch_size=32)
    batch = validate_first_batch(loader)
    assert set(batch) >= {"question_emb", "negative_embs", "cluster_id", "relevance"}
    validate_first_batch(DataLoader(ClusterLabeledDataset("output/clusters"), batch_size=16))
    bad = dict(output["jasper"])
    bad["question_embs"] = bad["question_embs"].copy()
    bad["question_embs"][:] = np.nan
    write_jasper_pt("output/nan", bad)
    with pytest.raises(AssertionError, match="NaN|finite"):
        validate_first_batch(create_loader("output/nan", "train", batch_size=32))
    assert os.path.exists("output/nan/question_embs.pt")
