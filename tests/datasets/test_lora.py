"""LoRA delta datasets over real adapter folders (safetensors + adapter_config.json), local and on S3."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unistore.datasets import (
    DeltaAugmentedDataset,
    DeltaCache,
    DnDDatasetWithDelta,
    ReferenceLoRATokenizer,
    Text2Qwen25LoRA_DeltaDataset,
    create_dataloader,
    wrap_dnd_dataset,
)
from unistore.errors import CorruptDataError, DatasetNotFoundError, ShapeMismatchError

from .lora_builders import lora_tensors, make_checkpoints, make_text_tokenizer, write_adapter

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

HIDDEN = 24


@pytest.fixture(scope="module")
def text_tokenizer() -> Any:
    return make_text_tokenizer()


@pytest.fixture
def ckpts(tmp_path: Any) -> dict[str, Any]:
    data = make_checkpoints(str(tmp_path / "teacher_checkpoints"), n=6, hidden=HIDDEN)
    data["root"] = str(tmp_path / "teacher_checkpoints")
    cache = DeltaCache(str(tmp_path / "deltas"))
    cache.put_many({p: d for p, d in data["deltas"].items() if not p.endswith("checkpoint-5")})
    data["cache"] = cache
    return data


def _dataset(ckpts: dict[str, Any], tok: Any, **kw: Any) -> Text2Qwen25LoRA_DeltaDataset:
    kw.setdefault("verbose", False)
    return Text2Qwen25LoRA_DeltaDataset(ckpts["root"], ReferenceLoRATokenizer((4, 8)), tok, ckpts["cache"],
                                        max_text_length=16, **kw)


def _check_sample(sample: dict[str, Any], ckpts: dict[str, Any], tok: Any, path: str) -> None:
    tensors = ckpts["tensors"][path]
    weights = ReferenceLoRATokenizer((4, 8)).detokenize(sample["tokens"], sample["scales"],
                                                        {k: v.shape for k, v in tensors.items()})
    for key, value in tensors.items():
        np.testing.assert_allclose(weights[key], value, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sample["delta"].numpy(), ckpts["deltas"][path])
    prompts = ckpts["prompts"][path]
    text = prompts["prompts"][0] if prompts else os.path.basename(path)
    want = tok(text, max_length=16, padding="max_length", truncation=True)["input_ids"]
    assert sample["condition_ids"].tolist() == want


def test_samples_match_source_tensors_and_documented_types(ckpts: dict[str, Any], text_tokenizer: Any) -> None:
    ds = _dataset(ckpts, text_tokenizer)
    assert len(ds) == 5  # checkpoint-5 has no delta (require_delta=True)
    assert [str(p) for p in ds.valid_checkpoints] == sorted(p for p in ckpts["tensors"]
                                                            if not p.endswith("checkpoint-5"))
    assert all(isinstance(p, Path) for p in ds.valid_checkpoints + ds.checkpoint_paths)
    for i, path in enumerate(map(str, ds.valid_checkpoints)):
        sample = ds[i]
        assert sample["checkpoint_path"] == path
        _check_sample(sample, ckpts, text_tokenizer, path)
    sample = ds[0]
    assert sample["tokens"].dtype == torch.float32 and sample["tokens"].ndim == 3
    assert sample["delta"].shape == (HIDDEN,) and sample["delta"].dtype == torch.float32
    assert sample["condition_ids"].dtype == torch.long and sample["attention_mask"].dtype == torch.long
    batch = ds.collate_fn([ds[0], ds[1]])
    assert batch["delta"].shape == (2, HIDDEN) and batch["tokens"].shape[0] == 2
    assert batch["condition_ids"].shape == (2, 16)


def test_prompt_answer_condition(ckpts: dict[str, Any], text_tokenizer: Any) -> None:
    ds = _dataset(ckpts, text_tokenizer, condition_type="prompt_answer")
    path = next(str(p) for p in ds.valid_checkpoints if ckpts["prompts"][str(p)])
    sample = ds[[str(p) for p in ds.valid_checkpoints].index(path)]
    text = ckpts["prompts"][path]["prompts"][0] + "\n" + "answer"
    assert sample["condition_ids"].tolist() == text_tokenizer(text, max_length=16, padding="max_length",
                                                              truncation=True)["input_ids"]


def test_missing_deltas_with_require_delta_false_get_fallback(ckpts: dict[str, Any], text_tokenizer: Any) -> None:
    ds = _dataset(ckpts, text_tokenizer, require_delta=False, fallback_delta_norm=2.0)
    assert len(ds) == 6
    sample = ds[ds.valid_checkpoints.index(next(p for p in ds.valid_checkpoints if p.name == "checkpoint-5"))]
    assert sample["delta"].shape == (HIDDEN,)
    assert float(sample["delta"].norm()) == pytest.approx(2.0)
    zeros = _dataset(ckpts, text_tokenizer, require_delta=False)[5]["delta"]
    assert float(zeros.abs().sum()) == 0.0


def test_dataloader_with_two_workers_matches_serial(ckpts: dict[str, Any], text_tokenizer: Any) -> None:
    ds = _dataset(ckpts, text_tokenizer)
    serial = [ds.collate_fn([ds[i] for i in range(j, min(j + 2, len(ds)))]) for j in range(0, len(ds), 2)]
    loader = create_dataloader(ckpts["root"], ReferenceLoRATokenizer((4, 8)), text_tokenizer, ckpts["cache"],
                               batch_size=2, num_workers=2, shuffle=False, max_text_length=16, verbose=False)
    batches = list(loader)
    assert len(batches) == len(serial)
    for got, want in zip(batches, serial):
        for key in ("tokens", "scales", "condition_ids", "attention_mask", "delta"):
            assert torch.equal(got[key], want[key])
        assert got["checkpoint_path"] == want["checkpoint_path"]


def test_bad_checkpoints_raise_or_are_skipped(ckpts: dict[str, Any], text_tokenizer: Any, tmp_path: Any) -> None:
    root = ckpts["root"]
    bad_json = os.path.join(root, "run0", "checkpoint-0")
    with open(os.path.join(bad_json, "adapter_config.json"), "w") as f:
        f.write("{broken")
    before = {p: open(os.path.join(p, "adapter_model.safetensors"), "rb").read() for p in ckpts["tensors"]}
    with pytest.raises(CorruptDataError, match="checkpoint-0/adapter_config.json"):
        _dataset(ckpts, text_tokenizer)
    ds = _dataset(ckpts, text_tokenizer, skip_bad=True)
    assert len(ds) == 4 and [p for p, _ in ds.skipped] == [bad_json]
    assert "adapter_config.json" in ds.skipped[0][1]
    # nothing stored was changed by reading
    assert before == {p: open(os.path.join(p, "adapter_model.safetensors"), "rb").read() for p in ckpts["tensors"]}


def test_checkpoint_with_other_rank_or_no_lora_tensors(ckpts: dict[str, Any], text_tokenizer: Any) -> None:
    odd = os.path.join(ckpts["root"], "run1", "checkpoint-3")
    write_adapter(odd, lora_tensors(3, rank=8))
    with pytest.raises(ShapeMismatchError, match="checkpoint-3") as e:
        _dataset(ckpts, text_tokenizer)
    assert "lora_A.weight" in str(e.value) and "(8, 32)" in str(e.value)
    write_adapter(odd, {"classifier.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(CorruptDataError, match="no LoRA tensors"):
        _dataset(ckpts, text_tokenizer)
    only_a = {k: v for k, v in lora_tensors(3).items() if "layers.1.self_attn.q_proj.lora_B" not in k}
    write_adapter(odd, only_a)
    with pytest.raises(CorruptDataError, match="lora_B partner"):
        _dataset(ckpts, text_tokenizer)
    assert len(_dataset(ckpts, text_tokenizer, skip_bad=True)) == 4


def test_missing_folder(tmp_path: Any, text_tokenizer: Any) -> None:
    with pytest.raises(DatasetNotFoundError):
        Text2Qwen25LoRA_DeltaDataset(str(tmp_path / "nope"), ReferenceLoRATokenizer(), text_tokenizer,
                                     DeltaCache(str(tmp_path / "d")), verbose=False)


def test_reference_tokenizer_round_trip_and_limits() -> None:
    tok = ReferenceLoRATokenizer((4, 4), num_tokens=40)
    weights = lora_tensors(1, rank=2, dim=5, layers=1)
    tokens, scales = tok.tokenize(weights)
    assert tokens.shape == (40, 4, 4) and scales.shape == (40,) and np.abs(tokens).max() <= 1.0
    back = tok.detokenize(tokens, scales, {k: v.shape for k, v in weights.items()})
    for k, v in weights.items():
        np.testing.assert_allclose(back[k], v, rtol=1e-6)
    with pytest.raises(ShapeMismatchError, match="num_tokens=2"):
        ReferenceLoRATokenizer((4, 4), num_tokens=2).tokenize(weights)


class _DnDBase(torch.utils.data.Dataset):  # a DnD-style dataset: (tokens, condition, path) samples
    def __init__(self, paths: list[str]):
        self.checkpoint_paths = paths

    def __len__(self) -> int:
        return len(self.checkpoint_paths)

    def __getitem__(self, i: int) -> tuple[Any, Any, str]:
        return torch.full((2, 3), float(i)), torch.arange(4) + i, self.checkpoint_paths[i]


def test_delta_augmented_and_dnd_wrappers(ckpts: dict[str, Any]) -> None:
    paths = sorted(ckpts["tensors"])
    base = _DnDBase(paths)
    aug = DeltaAugmentedDataset(base, ckpts["cache"], verbose=False)
    assert len(aug) == 5 and aug.valid_indices == [i for i, p in enumerate(paths) if not p.endswith("checkpoint-5")]
    tokens, cond, delta = aug[0]
    np.testing.assert_array_equal(delta.numpy(), ckpts["deltas"][paths[aug.valid_indices[0]]])
    batch = DeltaAugmentedDataset.collate_fn([aug[0], aug[1]])
    assert batch["delta"].shape == (2, HIDDEN) and batch["condition"].shape == (2, 4)
    assert len(DeltaAugmentedDataset(base, ckpts["cache"], require_delta=False, verbose=False)) == 6

    wrapped = DnDDatasetWithDelta(base, ckpts["cache"].root.url)
    assert wrapped.hidden_size == HIDDEN and len(wrapped) == 6
    for i, path in enumerate(paths):
        sample = wrapped[i]
        assert len(sample) == 4 and sample[3] == path
        want = ckpts["deltas"][path] if not path.endswith("checkpoint-5") else np.zeros(HIDDEN, np.float32)
        np.testing.assert_array_equal(sample[2].numpy(), want)
    out = wrapped.collate_fn_train([wrapped[0], wrapped[1]])
    assert out["delta"].shape == (2, HIDDEN) and out["tokens"].shape == (2, 2, 3)
    built = wrap_dnd_dataset(_DnDBase, ckpts["cache"], paths=paths)
    assert torch.equal(built[1][2], wrapped[1][2])


# ------------------------------------------------------------------ DeltaCache
def test_delta_cache_put_get_and_errors(tmp_path: Any) -> None:
    cache = DeltaCache(str(tmp_path / "deltas"))
    assert cache.hidden_size is None and len(cache) == 0 and cache.get_all_deltas() == {}
    a, b = np.arange(8, dtype=np.float32), np.ones(8, np.float32)
    cache.put("ckpts/a", a)
    cache.put_many({"ckpts/b": torch.from_numpy(b), "ckpts/c": a * 2})
    assert cache.hidden_size == 8 and len(cache) == 3
    np.testing.assert_array_equal(cache.get("ckpts/b"), b)
    assert cache.get(os.path.abspath("ckpts/b")) is not None  # one spelling per checkpoint
    assert cache.get("ckpts/none") is None and "ckpts/a" in cache
    cache.put("ckpts/a", a + 1)  # replaced in one transaction
    np.testing.assert_array_equal(cache.get("ckpts/a"), a + 1)
    assert len(cache) == 3
    stores = sorted(os.listdir(tmp_path / "deltas"))
    for bad, match in ((np.ones(9, np.float32), "hidden_size 8"), (np.ones((2, 4)), "shape"),
                       (np.full(8, np.nan), "NaN")):
        with pytest.raises(ShapeMismatchError, match=match):
            cache.put("ckpts/d", bad)
    assert sorted(os.listdir(tmp_path / "deltas")) == stores  # nothing written on bad input
    again = DeltaCache(str(tmp_path / "deltas"))  # persisted: a new process sees the same deltas
    all_deltas = again.get_all_deltas()
    assert sorted(all_deltas) == ["ckpts/a", "ckpts/b", "ckpts/c"]
    np.testing.assert_array_equal(all_deltas["ckpts/c"], a * 2)
    assert all(v.dtype == np.float32 for v in all_deltas.values())


@pytest.mark.parametrize("fmt", ["npy", "zarr", "hdf5"])
def test_delta_cache_any_format_and_catalog(tmp_path: Any, catalog_url: str, fmt: str) -> None:
    cache = DeltaCache(str(tmp_path / "d"), catalog_url=catalog_url, format=fmt)
    deltas = {f"/ck/{i}": np.random.default_rng(i).standard_normal(16).astype(np.float32) for i in range(5)}
    cache.put_many(deltas)
    got = DeltaCache(str(tmp_path / "d"), catalog_url=catalog_url, format=fmt).get_all_deltas()
    assert sorted(got) == sorted(deltas)
    for k, v in deltas.items():
        np.testing.assert_array_equal(got[k], v)
    cache.close()


@pytest.mark.s3
def test_lora_dataset_from_s3_matches_local(ckpts: dict[str, Any], text_tokenizer: Any, s3: dict[str, Any],
                                            tmp_path: Any) -> None:
    s3["fs"].put(ckpts["root"] + "/", f"{s3['bucket']}/teacher_checkpoints", recursive=True)
    url = f"s3://{s3['bucket']}/teacher_checkpoints"
    cache = DeltaCache(f"s3://{s3['bucket']}/deltas", catalog_url=str(tmp_path / "remote-cache.db"),
                       storage_options=s3["options"])
    local = _dataset(ckpts, text_tokenizer)
    cache.put_many({url + str(p)[len(ckpts["root"]):]: ckpts["deltas"][str(p)] for p in local.valid_checkpoints})
    remote = Text2Qwen25LoRA_DeltaDataset(url, ReferenceLoRATokenizer((4, 8)), text_tokenizer, cache,
                                          max_text_length=16, storage_options=s3["options"], verbose=False)
    assert [str(p)[len(url):] for p in remote.valid_checkpoints] == [str(p)[len(ckpts["root"]):] for p in
                                                                    local.valid_checkpoints]
    assert [p.name for p in remote.valid_checkpoints] == [p.name for p in local.valid_checkpoints]
    import pickle

    from ..conftest import S3_SECRET

    assert S3_SECRET.encode() not in pickle.dumps(remote)  # what DataLoader workers receive carries no secret
    batch = remote.__getitems__(list(range(len(remote))))
    for got, want in zip(batch, [local[i] for i in range(len(local))]):
        for key in ("tokens", "scales", "condition_ids", "attention_mask", "delta"):
            assert torch.equal(got[key], want[key]), key
    loader = torch.utils.data.DataLoader(remote, batch_size=2, num_workers=2, collate_fn=remote.collate_fn)
    assert sum(b["delta"].shape[0] for b in loader) == len(remote)

