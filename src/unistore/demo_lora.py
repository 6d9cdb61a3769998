"""The factory and LoRA part of ``make demo``: train from ``create_dataset`` and from LoRA checkpoints + deltas."""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np

from unistore.demo_training import _s3_target, train


def write_adapters(root: str, n: int, layers: int = 4, rank: int = 4, width: int = 64, seed: int = 0) -> list[str]:
    """``n`` PEFT-style adapter folders (adapter_config.json + adapter_model.safetensors + prompts.json)."""
    import json

    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tasks = ["solve the math problem", "write a poem", "translate this sentence", "summarize text"]
    paths = []
    for i in range(n):
        folder = os.path.join(root, f"task{i % len(tasks)}", f"checkpoint-{i}")
        os.makedirs(folder, exist_ok=True)
        scale = 0.5 + (i % len(tasks))  # each task's adapters differ in scale: a pattern the model can learn
        tensors = {}
        for layer in range(layers):
            for mod in ("q_proj", "v_proj"):
                base = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
                tensors[f"{base}.lora_A.weight"] = (scale * rng.standard_normal((rank, width))).astype(np.float32)
                tensors[f"{base}.lora_B.weight"] = (scale * rng.standard_normal((width, rank))).astype(np.float32)
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                       "target_modules": ["q_proj", "v_proj"]}, f)
        with open(os.path.join(folder, "prompts.json"), "w") as f:
            json.dump({"prompts": [tasks[i % len(tasks)]], "answers": ["ok"]}, f)
        paths.append(folder)
    return paths


def text_tokenizer() -> Any:
    """A Hugging Face fast tokenizer built locally (WordLevel vocabulary; nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set("solve the math problem write a poem translate this sentence summarize text ok".split()))
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _factory_demo(workdir: str, steps: int) -> dict[str, Any]:
    import torch

    from unistore.datasets import create_dataset, dataset_usage_history

    data_dir = os.path.join(workdir, "data")
    data = create_dataset("synthetic", batch_size=64, data_dir=data_dir, experiment_id="demo-factory")
    config = data["config"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(config.input_size, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, config.num_classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def step(batch: Any) -> float:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    rate, first, last = train(data["train_loader"], step, steps, desc="factory synthetic")
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data["test_loader"])
    accuracy = correct / len(data["test_loader"].dataset)
    uses = len(dataset_usage_history("synthetic"))  # the catalog create_dataset recorded the use in
    print(f"\nDataset factory: create_dataset('synthetic') from {data_dir} ({config.input_shape}, "
          f"{config.num_classes} classes): {steps} steps at {rate:,.0f} samples/s, loss {first:.3f} -> {last:.3f}, "
          f"test accuracy {accuracy:.2f}; {uses} use(s) recorded in the catalog")
    return {"name": "factory synthetic", "first": first, "last": last}


def _lora_run(label: str, folder: str, cache: Any, steps: int, storage_options: Any = None) -> dict[str, Any]:
    import torch

    from unistore.datasets import ReferenceLoRATokenizer, create_dataloader

    loader = create_dataloader(folder, ReferenceLoRATokenizer((8, 8)), text_tokenizer(), cache, batch_size=8,
                               num_workers=0, max_text_length=8, storage_options=storage_options, verbose=False)
    first_batch = next(iter(loader))
    n_tokens, hidden = first_batch["tokens"].shape[1], first_batch["delta"].shape[1]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(n_tokens * 64 + n_tokens, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, hidden))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step(batch: Any) -> float:
        x = torch.cat([batch["tokens"].flatten(1), batch["scales"]], dim=1)
        loss = torch.nn.functional.mse_loss(model(x), batch["delta"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    class _Batches:  # train() counts samples by the first item of a tuple batch
        sampler = loader.sampler

        def __iter__(self) -> Any:
            for b in loader:
                yield b["tokens"], b

    rate, first, last = train(_Batches(), lambda b: step(b[1]), steps, desc="LoRA deltas")  # type: ignore[arg-type]
    print(f"  {label:<28} {len(loader.dataset):>3} checkpoints  {rate:>8,.0f} samples/s  "
          f"loss {first:.3f} -> {last:.3f}")
    return {"name": f"lora {label}", "first": first, "last": last}


def run_lora_demo(workdir: str, checkpoints: int = 48, steps: int = 150,
                  s3_endpoint: str | None = None) -> list[dict[str, Any]]:
    """Train from the dataset factory, then learn delta labels from LoRA checkpoints (locally and from S3)."""
    from unistore.datasets import DeltaCache

    results = [_factory_demo(workdir, steps)]
    root = os.path.join(workdir, "lora")
    shutil.rmtree(root, ignore_errors=True)
    folder = os.path.join(root, "teacher_checkpoints")
    paths = write_adapters(folder, checkpoints)
    rng = np.random.default_rng(7)
    projection = rng.standard_normal((4, 32)).astype(np.float32)
    cache = DeltaCache(os.path.join(root, "deltas"))

    def delta_of(i: int) -> np.ndarray:  # a delta the model can learn: it depends on the task's weight scale
        return (0.5 + i % 4) * projection[i % 4]

    cache.put_many({p: delta_of(i) for i, p in enumerate(paths)})
    print(f"\nLoRA delta datasets: {checkpoints} adapter folders, deltas of hidden size {cache.hidden_size} in "
          f"{cache.root.url} (index in {cache.catalog_url})")
    results.append(_lora_run("local adapter folders", folder, cache, steps))
    endpoint = s3_endpoint or next((os.environ[v] for v in ("UNISTORE_DEMO_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3",
                                                            "AWS_ENDPOINT_URL") if os.environ.get(v)), None)
    s3_root, options, note = _s3_target(endpoint)
    if s3_root and options is not None:
        import s3fs

        s3fs.S3FileSystem(**options).put(folder + "/", f"{s3_root[5:]}/teacher_checkpoints", recursive=True)
        remote = f"{s3_root}/teacher_checkpoints"
        remote_cache = DeltaCache(f"{s3_root}/deltas", catalog_url=os.path.join(root, "remote-deltas.db"),
                                  storage_options=options)
        remote_cache.put_many({remote + p[len(folder):]: delta_of(i) for i, p in enumerate(paths)})
        results.append(_lora_run("adapter folders on S3", remote, remote_cache, steps, options))
    else:
        print(f"  {note}")
    return results
