"""Hugging Face checkpoint directories as one store, and ``read_arrays`` (merged reads of many tensors)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore.errors import ArrayNotFoundError, CorruptDataError

from ..conftest import s3_options
from .faulty_proxy import FaultyProxy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny_bert(seed: int = 0) -> Any:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg)


@pytest.mark.parametrize("shard", [None, "10KB"])
def test_save_pretrained_output_is_one_store_keyed_by_tensor_name(tmp_path: Any, shard: str | None) -> None:
    model = _tiny_bert()
    out = tmp_path / "ckpt"
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    files = os.listdir(out)
    assert ("model.safetensors.index.json" in files) == (shard is not None)
    store = us.open_store(out)
    state = model.state_dict()
    assert store.format == "safetensors"
    assert set(store.keys()) == set(state)  # tensor names, not file stems
    for key, value in state.items():
        np.testing.assert_array_equal(store[key].read(), value.numpy())
    assert store.attrs["config"]["hidden_size"] == 16
    assert ("index_metadata" in store.attrs) == (shard is not None)


def _adapter(folder: Any, rank: int = 4, seed: int = 0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(3):
        for mod in ("q_proj", "v_proj"):
            base = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            tensors[f"{base}.lora_A.weight"] = rng.standard_normal((rank, 32)).astype(np.float32)
            tensors[f"{base}.lora_B.weight"] = rng.standard_normal((32, rank)).astype(np.float32)
    tensors.update(extra or {})
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, f)
    return tensors


def test_peft_adapter_folder_keys_and_config(tmp_path: Any) -> None:
    tensors = _adapter(tmp_path / "a")
    store = us.open_store(tmp_path / "a")
    assert store.keys() == sorted(tensors)
    assert store.attrs["adapter_config"]["r"] == 4
    got = store.read_arrays()
    assert list(got) == sorted(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(got[key], value)
    as_t = store.read_arrays(sorted(tensors)[:2], as_tensor=True)
    assert all(isinstance(v, torch.Tensor) for v in as_t.values())


def test_plain_safetensors_directory_keeps_file_stems(tmp_path: Any) -> None:
    from safetensors.numpy import save_file

    save_file({"x": np.ones(3, np.float32)}, str(tmp_path / "a.safetensors"))
    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "b.safetensors"))
    assert us.open_store(tmp_path).keys() == ["a/x", "b/x"]


def test_malformed_checkpoint_files_raise_naming_the_file(tmp_path: Any) -> None:
    _adapter(tmp_path / "bad")
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(CorruptDataError, match="adapter_config.json is not valid JSON"):
        us.open_store(tmp_path / "bad")

    model = _tiny_bert()
    model.save_pretrained(tmp_path / "sh", max_shard_size="10KB")
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    (tmp_path / "sh" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptDataError, match="ghost.weight"):
        us.open_store(tmp_path / "sh")
    index["weight_map"] = {"embeddings.word_embeddings.weight": "model-00009-of-00009.safetensors"}
    (tmp_path / "sh" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptDataError, match="model-00009-of-00009.safetensors"):
        us.open_store(tmp_path / "sh")


def test_duplicate_tensor_names_across_files_are_refused(tmp_path: Any) -> None:
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "model-1.safetensors"))
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "model-2.safetensors"))
    with pytest.raises(CorruptDataError, match="more than one file"):
        us.open_store(tmp_path)


def test_read_arrays_unknown_key(tmp_path: Any) -> None:
    _adapter(tmp_path / "a")
    with pytest.raises(ArrayNotFoundError):
        us.open_store(tmp_path / "a").read_arrays(["nope"])


@pytest.mark.s3
def test_remote_checkpoint_reads_all_tensors_in_one_request(s3: dict[str, Any], tmp_path: Any) -> None:
    """At the wire: opening is a few metadata requests; reading 12 LoRA tensors is one ranged GET."""
    tensors = _adapter(tmp_path / "a")
    s3["fs"].put(str(tmp_path / "a"), f"{s3['bucket']}/ckpts/a", recursive=True)
    proxy = FaultyProxy(s3["endpoint"])
    try:
        store = us.open_store(f"s3://{s3['bucket']}/ckpts/a", storage_options=s3_options(proxy.endpoint))
        assert store.keys() == sorted(tensors)
        proxy.reset_counts()
        got = store.read_arrays()
        assert proxy.requests["GET"] == 1 and proxy.total_requests == 1
        payload = sum(v.nbytes for v in tensors.values())
        assert payload <= proxy.bytes_out <= payload + 4096
        for key, value in tensors.items():
            np.testing.assert_array_equal(got[key], value)
        assert store.io_stats()["requests"] == 1
        proxy.reset_counts()
        for key in sorted(tensors):  # one array at a time: a request each
            store[key].read()
        assert proxy.requests["GET"] == len(tensors)
    finally:
        proxy.close()
