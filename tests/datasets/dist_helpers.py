"""Bodies of multi-process tests (importable by spawned processes)."""

from __future__ import annotations

import json
import os

import numpy as np


def run_rank(rank: int, world_size: int, dataset_dir: str, rendezvous: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from unistore.datasets import create_loader, set_epoch

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        loader = create_loader(dataset_dir, "train", batch_size=4, distributed=True, seed=3, use_mmap=True)
        result: dict[str, object] = {"rank": loader.sampler.rank, "world_size": loader.sampler.world_size}
        for epoch in (0, 1):
            set_epoch(loader, epoch)
            order = list(loader.sampler)
            batches = list(loader)
            expected = loader.dataset_obj.__getitems__(order).collated["question_emb"]
            got = torch.cat([b["question_emb"] for b in batches])
            result[f"order_{epoch}"] = order
            result[f"batches_match_{epoch}"] = bool(torch.equal(got, expected))
        # every rank saw the same number of batches: a collective over them would not hang
        counts = [torch.zeros(1) for _ in range(world_size)]
        dist.all_gather(counts, torch.tensor([float(len(loader))]))
        result["batch_counts"] = [int(c.item()) for c in counts]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else o)
    finally:
        dist.destroy_process_group()


def open_cluster_dataset(path: str) -> tuple[int, float]:
    """Open a seed-layout directory (importing it if nobody has yet); its length and a label checksum."""
    from unistore.datasets import ClusterLabeledDataset

    ds = ClusterLabeledDataset(path)
    labels = ds.__getitems__(list(range(len(ds)))).collated[2]
    return len(ds), float(labels.sum())
