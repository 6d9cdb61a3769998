"""LoRA checkpoint benchmark: samples/s of Text2Qwen25LoRA_DeltaDataset from local disk and from S3,
with requests and bytes per sample counted at the wire.

Checkpoints are PEFT adapter folders written with safetensors (by default 28
layers x q_proj/v_proj, rank 8, width 512: 112 LoRA tensors, 1.8 MB each).

1. Local: samples/s through the layer (header once, then one read per
   tensor) divided by the seed's path (``safetensors.torch.load_file`` of the
   whole file per sample), same tokenizers, same DataLoader.
2. S3 (moto server behind a counting proxy, optional latency per request):
   samples/s, GET requests and bytes per sample as the proxy saw them, for
   building the dataset (headers, configs, prompts) and for one epoch.  The
   epoch reads each checkpoint's LoRA tensors as one merged range request.

    python benchmarks/bench_lora.py
    python benchmarks/bench_lora.py --checkpoints 32 --latency-ms 30
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from wire import s3_behind_proxy  # noqa: E402

from tests.datasets.lora_builders import lora_tensors, make_text_tokenizer, write_adapter  # noqa: E402
from unistore.datasets import DeltaCache, ReferenceLoRATokenizer, Text2Qwen25LoRA_DeltaDataset  # noqa: E402

HIDDEN = 1536


def make_checkpoints(root: str, n: int, layers: int, rank: int, width: int) -> list[str]:
    paths = []
    for i in range(n):
        path = os.path.join(root, f"checkpoint-{i:04d}")
        write_adapter(path, lora_tensors(i, rank=rank, dim=width, layers=layers),
                      {"prompts": [f"solve the math problem {i}"], "answers": ["answer"]})
        paths.append(path)
    return paths


class SeedPath(Text2Qwen25LoRA_DeltaDataset):
    """The spec's reading path: the whole safetensors file with ``load_file`` per sample."""

    def _load_checkpoint(self, idx: int) -> dict[str, Any]:
        from safetensors.torch import load_file

        weights = load_file(os.path.join(self.valid_checkpoints[idx], "adapter_model.safetensors"))
        return {k: weights[k] for k in sorted(weights)}

    def __getitems__(self, indices: Any) -> list[dict[str, Any]]:
        return [self[int(i)] for i in indices]


def epoch(ds: Any, batch_size: int, workers: int) -> tuple[float, int]:
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=ds.collate_fn,
                        generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    n = sum(b["tokens"].shape[0] for b in loader)
    return n / (time.perf_counter() - t), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=64)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added by the proxy to every S3 request")
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()

    tok = make_text_tokenizer()
    lora_tok = ReferenceLoRATokenizer((16, 16))
    with tempfile.TemporaryDirectory() as work:
        root = os.path.join(work, "ckpts")
        paths = make_checkpoints(root, args.checkpoints, args.layers, args.rank, args.width)
        size = os.path.getsize(os.path.join(paths[0], "adapter_model.safetensors"))
        cache = DeltaCache(os.path.join(work, "deltas"))
        rng = np.random.default_rng(1)
        cache.put_many({p: rng.standard_normal(HIDDEN).astype(np.float32) for p in paths})
        print(f"{args.checkpoints} checkpoints, {2 * 2 * args.layers} LoRA tensors each, {size / 1e6:.2f} MB "
              f"adapter_model.safetensors, batch {args.batch_size}, {args.workers} workers\n")

        kw = dict(max_text_length=64, verbose=False)
        layer = Text2Qwen25LoRA_DeltaDataset(root, lora_tok, tok, cache, **kw)
        seed = SeedPath(root, lora_tok, tok, cache, **kw)
        epoch(layer, args.batch_size, args.workers)  # warm the page cache
        rows = [["path", "samples/s"]]
        best_layer = max(epoch(layer, args.batch_size, args.workers)[0] for _ in range(3))
        best_seed = max(epoch(seed, args.batch_size, args.workers)[0] for _ in range(3))
        rows += [["local, through the layer", f"{best_layer:,.0f}"],
                 ["local, seed path (load_file per sample)", f"{best_seed:,.0f}"],
                 ["ratio layer / seed", f"{best_layer / best_seed:.2f}x"]]
        print("\n".join(f"| {' | '.join(r)} |" for r in rows[:1] + [["---", "---"]] + rows[1:]))
        if not args.skip_s3:
            s3_table(args, work, root, paths, cache, lora_tok, tok, best_layer, size)


def s3_table(args: Any, work: str, root: str, paths: list[str], cache: DeltaCache, lora_tok: Any, tok: Any,
             local_rate: float, size: int) -> None:
    with s3_behind_proxy() as wire:
        proxy, options = wire.proxy, wire.options
        url = wire.upload(root, "ckpts")
        remote_cache = DeltaCache(os.path.join(work, "remote-deltas"))
        remote_cache.put_many({url + p[len(root):]: d for p, d in zip(paths, (cache.get(p) for p in paths))})
        proxy.latency = args.latency_ms / 1000
        proxy.reset_counts()
        t = time.perf_counter()
        ds = Text2Qwen25LoRA_DeltaDataset(url, lora_tok, tok, remote_cache, max_text_length=64, verbose=False,
                                          storage_options=options)
        build_s = time.perf_counter() - t
        build = (proxy.total_requests, proxy.bytes_out)
        n = len(ds)
        proxy.reset_counts()
        rate, seen = epoch(ds, args.batch_size, args.workers)
        gets, total, nbytes = proxy.requests["GET"], proxy.total_requests, proxy.bytes_out
        print(f"\nS3 (moto behind a counting proxy, {args.latency_ms:g} ms added per request), {n} checkpoints\n")
        print("| phase | requests / checkpoint | bytes / checkpoint | fetched / adapter file | samples/s |")
        print("| --- | --- | --- | --- | --- |")
        print(f"| build dataset ({build_s:.2f} s) | {build[0] / n:.2f} | {build[1] / n:,.0f} | "
              f"{build[1] / n / size:.3f} | - |")
        print(f"| one epoch ({gets} GETs of {total} requests) | {total / seen:.2f} | {nbytes / seen:,.0f} | "
              f"{nbytes / seen / size:.3f} | {rate:,.0f} |")
        print(f"\nS3 epoch samples/s / local samples/s: {rate / local_rate:.2f}x")


if __name__ == "__main__":
    main()
