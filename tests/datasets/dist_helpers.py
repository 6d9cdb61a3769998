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


def run_elastic_rank(rank: int, world_size: int, url: str, options: dict[str, object], rendezvous: str,
                     out_dir: str, phase: str, stop_after: int | None) -> None:
    """One rank of a run over a remote store, each rank with a disk cache of its own (as on its own node).

    Records the rows of every batch it trains on.  ``stop_after``: once every rank has trained on that many
    batches, rank 0 checkpoints the loader (its state alone describes the run) and every rank is killed.
    Otherwise it resumes from that checkpoint and trains to the end of the epoch.
    """
    import signal

    import torch.distributed as dist

    import unistore as us
    from unistore.datasets import StoreDataset, make_loader
    from unistore.storage.cache import DiskCache

    checkpoint = os.path.join(out_dir, "checkpoint.json")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    store = us.open_store(url, storage_options=options, cache=DiskCache(os.path.join(out_dir, f"cache-{phase}-{rank}")))
    loader = make_loader(StoreDataset(store), 128, seed=7, distributed=True, num_workers=2)
    if stop_after is None:
        with open(checkpoint) as f:
            loader.load_state_dict(json.load(f))
    else:
        loader.sampler.set_epoch(1)
    with open(os.path.join(out_dir, f"{phase}-rank{rank}.txt"), "w") as seen:
        for k, batch in enumerate(loader):
            rows = batch["x"].numpy()
            assert (rows == rows[:, :1]).all()  # row i holds i in every column
            seen.write(" ".join(str(int(v)) for v in rows[:, 0]) + "\n")
            seen.flush()
            if stop_after is not None and k + 1 == stop_after:
                if rank == 0:
                    with open(checkpoint + ".tmp", "w") as f:
                        json.dump(loader.state_dict(), f)
                    os.replace(checkpoint + ".tmp", checkpoint)
                dist.barrier()
                os.kill(os.getpid(), signal.SIGKILL)  # the node is lost mid-epoch, workers and all
    dist.destroy_process_group()
