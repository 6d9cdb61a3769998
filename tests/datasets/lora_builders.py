"""LoRA checkpoint folders as PEFT writes them, and a text tokenizer built locally (nothing downloaded)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

WORDS = "solve the math problem write a poem translate this sentence summarize text answer question code".split()


def make_text_tokenizer() -> Any:
    """A Hugging Face fast tokenizer over a WordLevel vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(sorted(set(WORDS)))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def lora_tensors(seed: int, rank: int = 4, dim: int = 32, layers: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(layers):
        for mod in ("q_proj", "v_proj"):
            base = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            out[f"{base}.lora_A.weight"] = rng.standard_normal((rank, dim)).astype(np.float32)
            out[f"{base}.lora_B.weight"] = rng.standard_normal((dim, rank)).astype(np.float32)
    return out


def write_adapter(folder: str, tensors: dict[str, np.ndarray], prompts: Any = None,
                  config: dict[str, Any] | None = None) -> str:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``prompts.json``), written by safetensors."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config or {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                  f)
    if prompts is not None:
        with open(os.path.join(folder, "prompts.json"), "w") as f:
            json.dump(prompts, f)
    return folder


def make_checkpoints(root: str, n: int = 6, hidden: int = 24) -> dict[str, Any]:
    """``n`` adapters below ``root/run*/checkpoint-*``; returns their tensors, prompts and deltas by path."""
    out: dict[str, Any] = {"tensors": {}, "prompts": {}, "deltas": {}}
    rng = np.random.default_rng(99)
    for i in range(n):
        path = os.path.join(root, f"run{i % 2}", f"checkpoint-{i}")
        prompts = {"prompts": [f"solve the math problem {i}"], "answers": ["answer"]} if i % 3 else None
        write_adapter(path, lora_tensors(i), prompts)
        out["tensors"][path] = lora_tensors(i)
        out["prompts"][path] = prompts
        out["deltas"][path] = rng.standard_normal(hidden).astype(np.float32)
    return out
