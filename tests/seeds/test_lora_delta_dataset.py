"""Conformance: ``lora_delta_dataset.md``, called as the document calls it (relative paths, ``DeltaCache("deltas")``).

| document section | test |
|---|---|
| Step 1: DeltaAugmentedDataset (wraps (tokens, condition, path); require_delta; zeros fallback; collate_fn) | test_delta_augmented_dataset |
| Step 1: Text2Qwen25LoRA_DeltaDataset (constructor, attributes as Paths, hooks, sample keys) | test_full_dataset_attributes_and_sample |
| Step 1: the hooks a subclass overrides (_find_checkpoints, _load_conditions, _load_checkpoint(path)) | test_subclass_overrides_the_documented_hooks |
| Step 1: create_dataloader | test_create_dataloader_and_dtypes |
| Step 2: test_dataset / test_dtype_consistency (shapes, delta statistics, dtypes) | test_create_dataloader_and_dtypes |
| Step 3: DnDDatasetWithDelta, collate_fn_train, wrap_dnd_dataset | test_dnd_wrapper_and_factory |
| Acceptance Criteria | test_acceptance_criteria |
| Usage | test_create_dataloader_and_dtypes |

External pieces (the DnD LoRA tokenizer, ``AutoTokenizer.from_pretrained``) are stood in for by
``ReferenceLoRATokenizer`` and a tokenizer built locally: nothing is downloaded.
Differs on purpose: ``create_dataloader`` pins memory only when CUDA is there (``pin_memory=True`` on a CPU-only
machine only warns); a checkpoint's tensors are read through the storage layer (``_load_checkpoint`` reads the
safetensors file by ranged reads, the same bytes ``load_file`` returns).
"""

from __future__ import annotations

import json
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

from ..datasets.lora_builders import make_checkpoints, make_text_tokenizer

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

HIDDEN = 1536  # the document's Qwen2.5-1.5B hidden size


@pytest.fixture
def project(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The document's working directory: data/teacher_checkpoints and a populated DeltaCache("deltas")."""
    monkeypatch.chdir(tmp_path)
    data = make_checkpoints("data/teacher_checkpoints", n=5, hidden=HIDDEN)
    DeltaCache("deltas").put_many({p: d for p, d in data["deltas"].items() if not p.endswith("checkpoint-4")})
    data["lora_tokenizer"] = ReferenceLoRATokenizer((4, 8))
    data["text_tokenizer"] = make_text_tokenizer()
    return data


def _full(project: dict[str, Any], cls: type = Text2Qwen25LoRA_DeltaDataset, **kw: Any) -> Any:
    return cls(checkpoint_folder="data/teacher_checkpoints", lora_tokenizer=project["lora_tokenizer"],
               text_tokenizer=project["text_tokenizer"], delta_cache=DeltaCache("deltas"), max_text_length=16,
               condition_type=kw.pop("condition_type", "prompt"), **kw)


def test_full_dataset_attributes_and_sample(project: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    dataset = _full(project)
    assert "Found 4/5 checkpoints with deltas" in capsys.readouterr().out
    assert isinstance(dataset.checkpoint_folder, Path) and len(list(dataset.checkpoint_folder.rglob(
        "adapter_config.json"))) == 5
    assert all(isinstance(p, Path) for p in dataset.checkpoint_paths + dataset.valid_checkpoints)
    assert [p.name for p in dataset.valid_checkpoints] == ["checkpoint-0", "checkpoint-2", "checkpoint-1",
                                                           "checkpoint-3"]
    assert all(str(p) in dataset.all_deltas for p in dataset.valid_checkpoints)
    assert set(dataset.conditions) == {str(p) for p in dataset.valid_checkpoints}
    first = dataset.valid_checkpoints[0]
    assert dataset.conditions[str(first)] == {"prompts": [first.name], "answers": []}  # no prompts.json
    assert len(dataset) == 4
    sample = dataset[0]
    assert set(sample) == {"tokens", "scales", "condition_ids", "attention_mask", "delta", "checkpoint_path"}
    assert sample["checkpoint_path"] == str(first)
    np.testing.assert_array_equal(sample["delta"].numpy(), project["deltas"][str(first)])
    assert sample["delta"].shape == (HIDDEN,) and sample["condition_ids"].shape == (16,)
    weights = dataset._load_checkpoint(first)  # the document's signature: a Path
    from safetensors.torch import load_file

    want = load_file(first / "adapter_model.safetensors")
    assert list(weights) == sorted(want) and all(torch.equal(weights[k], want[k]) for k in want)
    answered = _full(project, condition_type="prompt_answer", verbose=False)
    j = next(i for i, p in enumerate(answered.valid_checkpoints) if answered.conditions[str(p)]["answers"])
    text = answered.conditions[str(answered.valid_checkpoints[j])]["prompts"][0] + "\n" + "answer"
    want_ids = project["text_tokenizer"](text, max_length=16, padding="max_length", truncation=True,
                                        return_tensors="pt")["input_ids"].squeeze(0)
    assert torch.equal(answered[j]["condition_ids"], want_ids)


def test_subclass_overrides_the_documented_hooks(project: dict[str, Any]) -> None:
    calls: list[str] = []

    class OnlyRunZero(Text2Qwen25LoRA_DeltaDataset):
        def _find_checkpoints(self) -> list[Path]:
            return sorted(p.parent for p in self.checkpoint_folder.rglob("adapter_config.json")
                          if p.parent.parent.name == "run0")

        def _load_conditions(self) -> dict[str, dict[str, Any]]:
            return {str(p): {"prompts": ["write a poem"], "answers": []} for p in self.valid_checkpoints}

        def _load_checkpoint(self, path: Path) -> dict[str, Any]:
            calls.append(path.name)
            from safetensors.torch import load_file

            weights = load_file(path / "adapter_model.safetensors")
            return {k: weights[k] * 0 for k in sorted(weights)}

    dataset = _full(project, cls=OnlyRunZero, verbose=False)
    assert [p.name for p in dataset.valid_checkpoints] == ["checkpoint-0", "checkpoint-2"]
    batch = dataset.collate_fn([dataset[0], dataset[1]])
    assert calls == ["checkpoint-0", "checkpoint-2"] and float(batch["tokens"].abs().sum()) == 0.0
    want = project["text_tokenizer"]("write a poem", max_length=16, padding="max_length", truncation=True,
                                     return_tensors="pt")["input_ids"]
    assert torch.equal(batch["condition_ids"], want.repeat(2, 1))


def test_create_dataloader_and_dtypes(project: dict[str, Any]) -> None:
    dataloader = create_dataloader(checkpoint_folder="data/teacher_checkpoints",
                                   lora_tokenizer=project["lora_tokenizer"],
                                   text_tokenizer=project["text_tokenizer"], delta_cache=DeltaCache("deltas"),
                                   batch_size=4, num_workers=0, max_text_length=16)
    batch = next(iter(dataloader))
    expected_dtypes = {"tokens": torch.float32, "scales": torch.float32, "condition_ids": torch.long,
                       "attention_mask": torch.long, "delta": torch.float32}
    assert {key: batch[key].dtype for key in expected_dtypes} == expected_dtypes
    assert batch["delta"].shape == (4, HIDDEN) and batch["tokens"].dim() == 4
    assert float(batch["delta"].norm(dim=1).mean()) > 0  # real deltas, not the zero fallback
    seen = []
    for batch in create_dataloader("data/teacher_checkpoints", project["lora_tokenizer"],
                                   project["text_tokenizer"], DeltaCache("deltas"), batch_size=8, num_workers=2,
                                   shuffle=False, max_text_length=16):
        tokens, condition, delta = batch["tokens"], batch["condition_ids"], batch["delta"]
        assert tokens.shape[0] == condition.shape[0] == delta.shape[0]
        seen += batch["checkpoint_path"]
    assert sorted(seen) == sorted(p for p in project["deltas"] if not p.endswith("checkpoint-4"))


class _DnDBase(torch.utils.data.Dataset):
    """A DnD-style dataset: ``(tokens, condition, checkpoint_path)`` samples, ``checkpoint_paths`` for each."""

    def __init__(self, root: str = "data/teacher_checkpoints"):
        self.checkpoint_paths = sorted(p.parent for p in Path(root).rglob("adapter_config.json"))

    def __len__(self) -> int:
        return len(self.checkpoint_paths)

    def __getitem__(self, idx: int) -> tuple[Any, Any, str]:
        return torch.full((2, 4, 8), float(idx)), torch.arange(6) + idx, str(self.checkpoint_paths[idx])


def test_delta_augmented_dataset(project: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    base = _DnDBase()
    kept = DeltaAugmentedDataset(base, DeltaCache("deltas"), require_delta=True)
    assert "4/5 samples have deltas" in capsys.readouterr().out and len(kept) == 4
    all_of_them = DeltaAugmentedDataset(base, DeltaCache("deltas"), require_delta=False)
    assert len(all_of_them) == 5
    for i in range(5):
        tokens, condition, delta = all_of_them[i]
        path = base[i][2]
        assert torch.equal(tokens, base[i][0]) and torch.equal(condition, base[i][1])
        if path.endswith("checkpoint-4"):
            assert torch.equal(delta, torch.zeros(HIDDEN))  # no cached delta: zeros of the hidden size
        else:
            np.testing.assert_array_equal(delta.numpy(), project["deltas"][path])
    batch = DeltaAugmentedDataset.collate_fn([kept[0], kept[1]])
    assert batch["tokens"].shape == (2, 2, 4, 8) and batch["condition"].shape == (2, 6)
    assert batch["delta"].shape == (2, HIDDEN)


def test_dnd_wrapper_and_factory(project: dict[str, Any]) -> None:
    wrapped = DnDDatasetWithDelta(_DnDBase(), delta_cache_dir="deltas", fallback_delta_norm=0.0)
    assert wrapped.hidden_size == HIDDEN and len(wrapped) == 5
    tokens, condition, delta, path = wrapped[1]  # the delta goes in after the condition
    np.testing.assert_array_equal(delta.numpy(), project["deltas"][path])
    missing = next(i for i in range(5) if wrapped.idx_to_path[i].endswith("checkpoint-4"))
    assert torch.equal(wrapped[missing][2], torch.zeros(HIDDEN))
    batch = wrapped.collate_fn_train([wrapped[0], wrapped[1]])
    assert set(batch) == {"tokens", "condition", "delta"} and batch["delta"].shape == (2, HIDDEN)
    factory = wrap_dnd_dataset(_DnDBase, delta_cache_dir="deltas", root="data/teacher_checkpoints")
    assert isinstance(factory, DnDDatasetWithDelta) and torch.equal(factory[1][2], wrapped[1][2])
    # a dict-returning base (the full dataset) gets the delta under "delta"
    full = DnDDatasetWithDelta(_full(project, require_delta=False, verbose=False), delta_cache_dir="deltas")
    sample = full[0]
    np.testing.assert_array_equal(sample["delta"].numpy(), project["deltas"][sample["checkpoint_path"]])


def test_acceptance_criteria(project: dict[str, Any]) -> None:
    dataset = _full(project, require_delta=False, verbose=False)
    assert len(dataset) == 5  # samples without a cached delta are handled: kept, with the fallback delta
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["delta"].shape == (HIDDEN,) and sample["delta"].dtype == torch.float32
    batch = dataset.collate_fn([dataset[i] for i in range(5)])
    assert batch["delta"].shape == (5, HIDDEN)
    no_delta = next(i for i, p in enumerate(dataset.valid_checkpoints) if p.name == "checkpoint-4")
    assert torch.equal(batch["delta"][no_delta], torch.zeros(HIDDEN))
    with open(os.path.join("data/teacher_checkpoints/run0/checkpoint-0", "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA"}, f)  # still a checkpoint folder; its tensors are what is read
    assert len(_full(project, verbose=False)) == 4


@pytest.mark.s3
def test_checkpoints_on_s3(project: dict[str, Any], s3: dict[str, Any]) -> None:
    """The document's dataset over a bucket of checkpoints (``storage_options`` added); deltas keyed by URL."""
    from upath import UPath

    url = f"s3://{s3['bucket']}/teacher_checkpoints"
    s3["fs"].put("data/teacher_checkpoints", url, recursive=True)
    cache = DeltaCache("remote-deltas")
    cache.put_many({url + p[len("data/teacher_checkpoints"):]: d for p, d in project["deltas"].items()})
    dataset = Text2Qwen25LoRA_DeltaDataset(url, project["lora_tokenizer"], project["text_tokenizer"], cache,
                                           max_text_length=16, storage_options=s3["options"], verbose=False)
    assert len(dataset) == 5 and all(isinstance(p, UPath) for p in dataset.valid_checkpoints)
    assert [p.name for p in dataset.valid_checkpoints] == [p.name for p in _full(project, require_delta=False,
                                                                                  verbose=False).valid_checkpoints]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2,
                                                  collate_fn=dataset.collate_fn)))
    for i, path in enumerate(batch["checkpoint_path"]):
        np.testing.assert_array_equal(batch["delta"][i].numpy(), project["deltas"][
            "data/teacher_checkpoints" + path[len(url):]])
