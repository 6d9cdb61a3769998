"""Conformance: ``jasper_steering_dataset.md``, called as the document calls it (``"output/dataset"``).

| document section | test |
|---|---|
| Constructor (arguments, defaults) | test_constructor_signature |
| Constructor: Raises | test_documented_errors |
| Batch Output | test_batch_output |
| Methods: set_epoch; Curriculum Learning: Progression Schedule | test_set_epoch_and_schedule |
| Methods: force_steering; Validation with Frozen Steering | test_force_steering_and_frozen_validation |
| Methods: get_steering_stats | test_set_epoch_and_schedule |
| Methods: subset_by_cluster | test_subset_by_cluster |
| Hard Negatives: Usage in Training; Example Usage: Basic Training Loop | test_basic_training_loop |
| Distributed Training (create_loader(distributed=True), set_epoch(loader, epoch)) | test_distributed_loader (one gloo rank here; two in tests/datasets/test_sampler.py::test_two_process_gloo) |
| GPU Preloading | test_gpu_preloading (needs CUDA) |
| Storage Formats: PT, HDF5, Auto-Detection, Converting PT to HDF5 | test_storage_formats_and_conversion |
| Auto-detection when h5py is missing | test_auto_falls_back_to_pt_without_h5py |
| Memory-Mapped Loading (auto, explicit, not with a GPU device); Combined Example | test_memory_mapping |
| Dataset Directory Structure, config.json | test_directory_layouts_and_config |
| Validation: Referential Integrity, Batch Validation | test_documented_errors, test_batch_output |
| Troubleshooting: Slow DataLoader | test_basic_training_loop |

Differs on purpose: ``ImportError`` for HDF5 without h5py is ``MissingDependencyError`` (an ``ImportError``) that
names the extra to install; with ``storage_format="auto"`` a ``dataset.h5`` h5py cannot read falls back to the PT
files, as the document says auto-detection does.  ``use_mmap=True`` with a GPU device is refused
(``UnsupportedError``), where the document only lists it as incompatible.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from unistore.datasets import JASPERSteeringDataset, create_loader, set_epoch, validate_first_batch
from unistore.errors import MissingDependencyError, ProcessGroupError, UnsupportedError

from ..datasets.builders import expected_batch, make_jasper, write_jasper_pt

KEYS = ("question_emb", "target_source_emb", "steering", "negative_embs", "cluster_id", "relevance",
        "centroid_distance", "steering_variant", "negative_tiers")


@pytest.fixture
def dataset_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)
    data = make_jasper(n_pairs=120, dim=8, n_neg=5)
    write_jasper_pt("output/dataset", data)
    return data


def test_constructor_signature() -> None:
    params = inspect.signature(JASPERSteeringDataset).parameters
    assert list(params)[:6] == ["dataset_dir", "split", "epoch", "device", "storage_format", "use_mmap"]
    assert [params[k].default for k in ("epoch", "device", "storage_format", "use_mmap")] == [0, None, "auto", None]


def test_documented_errors(dataset_dir: dict[str, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        JASPERSteeringDataset("output/nowhere", split="train")
    with pytest.raises(ValueError, match="split"):
        JASPERSteeringDataset("output/dataset", split="holdout")
    os.remove("output/dataset/val_idx.pt")
    with pytest.raises(ValueError, match="val_idx"):
        JASPERSteeringDataset("output/dataset", split="val")
    bad = dict(dataset_dir, hard_negatives=dataset_dir["hard_negatives"] + 1000)
    write_jasper_pt("output/broken", bad)
    with pytest.raises(ValueError, match="hard_negatives"):
        JASPERSteeringDataset("output/broken", split="train")
    write_jasper_pt("output/dataset", dataset_dir)
    JASPERSteeringDataset.convert_pt_to_hdf5("output/dataset")
    monkeypatch.setitem(sys.modules, "h5py", None)  # h5py not installed
    with pytest.raises(ImportError, match=r"unistore\[hdf5\]") as info:
        JASPERSteeringDataset("output/dataset", split="train", storage_format="hdf5")
    assert isinstance(info.value, MissingDependencyError)


def test_batch_output(dataset_dir: dict[str, Any]) -> None:
    dataset = JASPERSteeringDataset(dataset_dir="output/dataset", split="train", epoch=0)
    batch = next(iter(DataLoader(dataset, batch_size=32)))
    assert tuple(batch) == KEYS
    b, d, n_neg = 32, 8, 5
    shapes = {"question_emb": (b, d), "target_source_emb": (b, d), "steering": (b, d), "negative_embs": (b, n_neg, d),
              "cluster_id": (b,), "relevance": (b,), "centroid_distance": (b,), "steering_variant": (b,),
              "negative_tiers": (b, n_neg)}
    assert {k: tuple(v.shape) for k, v in batch.items()} == shapes
    assert not batch["cluster_id"].is_floating_point() and batch["relevance"].min() >= 0 <= batch["relevance"].max() <= 1
    want = expected_batch(dataset_dir, "train", np.arange(32), batch["steering_variant"].numpy())
    for key in KEYS:
        np.testing.assert_allclose(batch[key].numpy(), want[key], rtol=0, atol=0)
    assert validate_first_batch(DataLoader(dataset, batch_size=32)) is not None


def test_set_epoch_and_schedule(dataset_dir: dict[str, Any]) -> None:
    dataset = JASPERSteeringDataset("output/dataset", split="train")
    table = {0: [0.7, 0.2, 0.1, 0.0], 10: [0.5, 0.3, 0.15, 0.05], 20: [0.3, 0.3, 0.25, 0.15],
             30: [0.1, 0.3, 0.35, 0.25], 40: [0.0, 0.2, 0.4, 0.4], 99: [0.0, 0.2, 0.4, 0.4]}
    for epoch, probs in table.items():
        dataset.set_epoch(epoch)
        stats = dataset.get_steering_stats()
        assert stats["epoch"] == epoch and stats["probs"] == pytest.approx(probs)
        assert stats["variant_names"] == ["none", "centroid", "keyword_weighted", "residual"]
    dataset.set_epoch(0)
    early = dataset.__getitems__(list(range(len(dataset)))).collated["steering_variant"]
    assert not (early == 3).any()  # residual has probability 0 before epoch 10
    dataset.set_epoch(45)
    late = dataset.__getitems__(list(range(len(dataset)))).collated["steering_variant"]
    assert not (late == 0).any()
    dataset.set_epoch(0)
    assert torch.equal(dataset.__getitems__(list(range(len(dataset)))).collated["steering_variant"], early)


def test_force_steering_and_frozen_validation(dataset_dir: dict[str, Any]) -> None:
    dataset = JASPERSteeringDataset("output/dataset", split="train")
    dataset.force_steering("centroid")
    batch = dataset.__getitems__(list(range(20))).collated
    assert (batch["steering_variant"] == 1).all()
    pairs = dataset_dir["train_idx"][:20]
    np.testing.assert_array_equal(batch["steering"].numpy(), dataset_dir["steering_centroid"][pairs])
    dataset.force_steering(None)
    assert dataset.get_steering_stats()["probs"] == pytest.approx([0.7, 0.2, 0.1, 0.0])
    with pytest.raises(ValueError, match="steering variant"):
        dataset.force_steering("diagonal")
    val_dataset = JASPERSteeringDataset("output/dataset", split="val")
    val_dataset.force_steering("centroid")
    val_loader = DataLoader(val_dataset, batch_size=64)
    for batch in val_loader:
        assert (batch["steering_variant"] == 1).all()


def test_subset_by_cluster(dataset_dir: dict[str, Any]) -> None:
    dataset = JASPERSteeringDataset("output/dataset", split="train")
    subset = dataset.subset_by_cluster([0, 3])
    assert isinstance(subset, Subset)
    loader = DataLoader(subset, batch_size=32)
    clusters = torch.cat([b["cluster_id"] for b in loader])
    want = dataset_dir["pair_cluster_id"][dataset_dir["train_idx"]]
    assert len(clusters) == int(np.isin(want, [0, 3]).sum()) and set(clusters.tolist()) <= {0, 3}


def test_basic_training_loop(dataset_dir: dict[str, Any]) -> None:
    torch.manual_seed(0)
    dataset = JASPERSteeringDataset(dataset_dir="output/dataset", split="train", epoch=0)
    loader = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=2)
    model = nn.Linear(16, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def contrastive_loss(output: Any, target: Any, negatives: Any, weights: Any = None) -> Any:
        pos = (output * target).sum(-1, keepdim=True)
        neg = torch.einsum("bd,bnd->bn", output, negatives)
        if weights is not None:
            neg = neg * weights
        return nn.functional.cross_entropy(torch.cat([pos, neg], dim=1), torch.zeros(len(output), dtype=torch.long))

    batch = next(iter(loader))  # the document's "Slow DataLoader" profile: one batch through the workers
    assert batch["question_emb"].shape == (32, 8)
    losses = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for batch in loader:
            question, target = batch["question_emb"], batch["target_source_emb"]
            steering, negatives = batch["steering"], batch["negative_embs"]
            tiers = batch["negative_tiers"]
            weights = 1.0 + 0.5 * (tiers / 2.0)  # tier 2 gets 1.5x weight
            output = model(torch.cat([question, steering], dim=-1))
            loss = contrastive_loss(output, target, negatives, weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    assert len(losses) == 3 * 3 and np.isfinite(losses).all()
    assert weights.max() <= 1.5 and weights.min() >= 1.0


def test_distributed_loader(dataset_dir: dict[str, Any], tmp_path: Any) -> None:
    import torch.distributed as dist

    with pytest.raises(ProcessGroupError, match="init_process_group"):
        create_loader(dataset_dir="output/dataset", split="train", batch_size=32, num_workers=0, distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        loader = create_loader(dataset_dir="output/dataset", split="train", batch_size=32, num_workers=2,
                               distributed=True)
        orders = []
        for epoch in range(2):
            set_epoch(loader, epoch)  # syncs both dataset and sampler
            assert loader.dataset_obj.epoch == epoch
            orders.append(list(loader.sampler))
            assert sum(len(b["cluster_id"]) for b in loader) == len(dataset_dir["train_idx"])
        assert orders[0] != orders[1] and sorted(orders[0]) == list(range(len(dataset_dir["train_idx"])))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU preloading needs CUDA")
def test_gpu_preloading(dataset_dir: dict[str, Any]) -> None:
    device = torch.device("cuda:0")
    dataset = JASPERSteeringDataset(dataset_dir="output/dataset", split="train", device=device)
    batch = next(iter(DataLoader(dataset, batch_size=32)))
    assert batch["question_emb"].device.type == "cuda"


def test_storage_formats_and_conversion(dataset_dir: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    pt = JASPERSteeringDataset("output/dataset", split="train", storage_format="pt")
    assert pt.storage_format == "pt"
    JASPERSteeringDataset.convert_pt_to_hdf5("output/dataset", compression="gzip")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Converting PT format to HDF5 in output/dataset" or lines[0].startswith(
        "Converting PT format to HDF5 in ") and lines[0].endswith("output/dataset")
    assert lines[1:6] == ["Converting embeddings...", "Converting pair data...", "Converting negatives...",
                          "Converting steering tensors...", "Converting split indices..."]
    assert lines[6].startswith("Conversion complete. HDF5 file saved to ") and lines[6].endswith("dataset.h5")
    assert lines[7].startswith("File sizes: PT format=") and "(compression: " in lines[7]
    assert os.path.exists("output/dataset/dataset.h5") and os.path.exists("output/dataset/question_embs.pt")
    h5 = JASPERSteeringDataset("output/dataset", split="train", storage_format="hdf5")
    auto = JASPERSteeringDataset("output/dataset", split="train", storage_format="auto")
    assert (h5.storage_format, auto.storage_format) == ("hdf5", "hdf5")
    for ds in (h5, auto):
        for key in KEYS:
            torch.testing.assert_close(ds.__getitems__(list(range(10))).collated[key],
                                       pt.__getitems__(list(range(10))).collated[key])
    for compression in ("lzf", None):
        JASPERSteeringDataset.convert_pt_to_hdf5("output/dataset", compression=compression)
        again = JASPERSteeringDataset("output/dataset", split="val", storage_format="hdf5")
        assert len(again) == len(dataset_dir["val_idx"])


def test_auto_falls_back_to_pt_without_h5py(dataset_dir: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    JASPERSteeringDataset.convert_pt_to_hdf5("output/dataset")
    monkeypatch.setitem(sys.modules, "h5py", None)  # dataset.h5 present, h5py not installed
    dataset = JASPERSteeringDataset("output/dataset", split="train", storage_format="auto")
    assert dataset.storage_format == "pt" and len(dataset) == len(dataset_dir["train_idx"])


def test_memory_mapping(dataset_dir: dict[str, Any]) -> None:
    auto = JASPERSteeringDataset("output/dataset", split="train")
    assert auto.use_mmap is False  # a small dataset is preloaded
    mapped = JASPERSteeringDataset("output/dataset", split="train", use_mmap=True)
    loaded = JASPERSteeringDataset("output/dataset", split="train", use_mmap=False)
    assert mapped.use_mmap and not loaded.use_mmap
    assert mapped._compute_memory_usage() < loaded._compute_memory_usage()
    for key in KEYS:
        torch.testing.assert_close(mapped.__getitems__([3, 1, 4]).collated[key],
                                   loaded.__getitems__([3, 1, 4]).collated[key])
    with pytest.raises(UnsupportedError, match="use_mmap"):
        JASPERSteeringDataset("output/dataset", split="train", use_mmap=True, device=torch.device("cuda"))
    JASPERSteeringDataset.convert_pt_to_hdf5("output/dataset")
    combined = JASPERSteeringDataset("output/dataset", split="train", storage_format="auto", use_mmap=None,
                                     device=torch.device("cpu"))
    assert combined.storage_format == "hdf5" and combined.use_mmap is False
    assert combined._compute_memory_usage() > 0


def test_directory_layouts_and_config(dataset_dir: dict[str, Any]) -> None:
    import h5py

    dataset = JASPERSteeringDataset("output/dataset", split="test")
    assert dataset.config["n_neg"] == 5 and dataset.config["split_sizes"]["test"] == len(dataset)
    JASPERSteeringDataset.convert_pt_to_hdf5("output/dataset")
    with h5py.File("output/dataset/dataset.h5") as f:
        groups = {g: sorted(f[g]) for g in f}
    assert groups == {"embeddings": ["centroids", "keywords", "questions", "sources"],
                      "pair_data": ["cluster_id", "index", "keyword_ids", "relevance"],
                      "negatives": ["hard", "tiers"],
                      "steering": ["centroid", "distances", "keyword_weighted", "residual"],
                      "splits": ["test", "train", "val"]}


@pytest.mark.s3
def test_dataset_dir_on_s3(dataset_dir: dict[str, Any], s3: dict[str, Any]) -> None:
    """The document's calls on a dataset directory in a bucket (``storage_options`` added), PT and HDF5."""
    from unistore.datasets import copy_dataset

    for fmt in ("pt", "hdf5"):
        url = copy_dataset("output/dataset", f"s3://{s3['bucket']}/dataset-{fmt}", fmt,
                           out_storage_options=s3["options"])
        dataset = JASPERSteeringDataset(url, split="train", storage_options=s3["options"])
        assert dataset.storage_format == fmt
        loader = create_loader(url, "train", batch_size=32, num_workers=2, storage_options=s3["options"])
        set_epoch(loader, 3)
        got = torch.cat([b["question_emb"] for b in loader])
        pairs = dataset_dir["train_idx"][np.array(list(loader.sampler))]
        np.testing.assert_array_equal(got.numpy(), dataset_dir["question_embs"][dataset_dir["pair_index"][pairs, 0]])
