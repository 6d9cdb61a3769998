"""The training half of ``make demo``: the same training loops on every storage backend.

Writes a ClusterLabeled dataset in the seed layout (``dataset.db`` with pickled
labels + raw memmaps) and a JASPER dataset in the PT layout, copies each into
every format (and to an S3 bucket when an endpoint is given), then trains the
seed's domain classifier and a small JASPER-style model from each copy with
one unchanged loop, printing samples/s and the loss at the start and the end.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

#: (label, format, compression) of every copy the demo trains from.
FORMATS: list[tuple[str, str, str | None]] = [
    ("npy", "npy", None), ("pt", "pt", None), ("safetensors", "safetensors", None),
    ("hdf5 gzip", "hdf5", "gzip"), ("zarr zstd", "zarr", "zstd"),
]


def write_cluster_seed_layout(path: str, n: int, dim: int, n_clusters: int, seed: int = 0) -> None:
    """A ClusterLabeled directory exactly as the seed wrote it: sqlite3 + pickled numpy labels + raw memmaps.

    Embeddings sit around one centre per cluster, so a classifier can learn them.
    """
    from unistore.migrations.legacy import SEED_SCHEMA

    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    cluster = rng.integers(0, n_clusters, n)
    for name, scale in (("base_embeddings.npy", 1.0), ("steering_embeddings.npy", 1.5)):
        mm = np.memmap(os.path.join(path, name), dtype=np.float32, mode="w+", shape=(n, dim))
        mm[:] = centres[cluster] + scale * rng.standard_normal((n, dim)).astype(np.float32)
        mm.flush()
        del mm
    conn = sqlite3.connect(os.path.join(path, "dataset.db"))
    conn.executescript(SEED_SCHEMA)
    conn.executemany("INSERT INTO dataset_info VALUES (?, ?)", [("n_clusters", str(n_clusters)),
                                                                ("embedding_dim", str(dim)), ("dataset_size", str(n))])
    eye = np.eye(n_clusters, dtype=np.float32)
    soft = 0.9 * eye + 0.1 / n_clusters

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(n):
            c = int(cluster[i])
            label = pickle.dumps(soft[c])
            yield (i + 1, i, "question" if i % 2 else "source", f"sample {i} about topic {c}", f"chroma-{i}",
                   json.dumps([f"topic-{c}"]), "centroid", label, label, label)

    conn.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
    conn.commit()
    conn.close()


def write_jasper_pt_layout(path: str, n_pairs: int, dim: int, n_neg: int = 4, n_clusters: int = 20,
                           seed: int = 0) -> None:
    """A JASPER PT directory (config.json + one ``torch.save`` per array) whose targets a linear map can learn."""
    import torch

    rng = np.random.default_rng(seed)
    f32 = np.float32
    questions = rng.standard_normal((n_pairs, dim)).astype(f32)
    mix = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(f32)  # targets are a rotation of questions
    sources = questions @ mix + 0.1 * rng.standard_normal((n_pairs, dim)).astype(f32)
    cluster = rng.integers(0, n_clusters, n_pairs)
    centroids = rng.standard_normal((n_clusters, dim)).astype(f32)
    order = rng.permutation(n_pairs)
    n_train, n_val = int(0.8 * n_pairs), int(0.1 * n_pairs)
    negatives = rng.integers(0, n_pairs, (n_pairs, n_neg))
    arrays: dict[str, Any] = {
        "question_embs": questions, "source_embs": sources, "centroid_embs": centroids,
        "keyword_embs": rng.standard_normal((100, dim)).astype(f32),
        "pair_index": np.stack([np.arange(n_pairs), np.arange(n_pairs)], axis=1),
        "pair_cluster_id": cluster, "pair_relevance": rng.random(n_pairs).astype(f32),
        "pair_keyword_ids": [rng.integers(0, 100, int(rng.integers(1, 4))).tolist() for _ in range(n_pairs)],
        "hard_negatives": negatives, "negative_tiers": rng.integers(0, 3, (n_pairs, n_neg)),
        "steering_centroid": centroids[cluster],
        "steering_keyword_weighted": 0.5 * centroids[cluster],
        "steering_residual": (sources - questions) * 0.1,
        "centroid_distances": rng.random(n_pairs).astype(f32) * 2,
        "train_idx": np.sort(order[:n_train]), "val_idx": np.sort(order[n_train:n_train + n_val]),
        "test_idx": np.sort(order[n_train + n_val:]),
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"embedding_dim": dim, "n_neg": n_neg, "n_clusters": n_clusters, "dataset_name": "demo",
                   "split_sizes": {s: len(arrays[f"{s}_idx"]) for s in ("train", "val", "test")}}, f)
    for name, value in arrays.items():
        torch.save(value if isinstance(value, list) else torch.from_numpy(np.ascontiguousarray(value)),
                   os.path.join(path, f"{name}.pt"))


def train(loader: Any, step: Callable[[Any], float], steps: int, desc: str | None = None) -> tuple[float, float, float]:
    """Run ``steps`` optimisation steps over ``loader`` (cycling epochs), with a progress bar named ``desc``
    (none when ``desc`` is None or stderr is not a terminal).

    Returns samples/s, the mean loss of the first 3 steps and of the last tenth.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=desc, unit="step", leave=False, disable=desc is None or None)
    losses: list[float] = []
    seen = 0
    start = time.perf_counter()
    epoch = 0
    while len(losses) < steps:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            losses.append(step(batch))
            bar.update(1)
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            seen += len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch["question_emb"])
            if len(losses) == steps:
                break
        epoch += 1
    elapsed = time.perf_counter() - start
    bar.close()
    window = max(1, steps // 10)
    return seen / elapsed, float(np.mean(losses[:3])), float(np.mean(losses[-window:]))


def domain_classifier_step(dim: int, n_clusters: int) -> Callable[[Any], float]:
    """The seed's domain classifier (Linear -> ReLU -> Linear) with cross-entropy on soft labels."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2 * dim, 128), nn.ReLU(), nn.Linear(128, n_clusters))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch: Any) -> float:
        base, steering, label = batch[:3]
        loss = nn.functional.cross_entropy(model(torch.cat([base, steering], dim=-1)), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def jasper_step(dim: int) -> Callable[[Any], float]:
    """A small JASPER-style model: predict the source from question + steering, InfoNCE against hard negatives."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Linear(2 * dim, dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step(batch: Any) -> float:
        pred = model(torch.cat([batch["question_emb"], batch["steering"]], dim=-1))
        candidates = torch.cat([batch["target_source_emb"].unsqueeze(1), batch["negative_embs"]], dim=1)
        logits = torch.einsum("bd,bkd->bk", pred, candidates) / dim ** 0.5
        weights = 1.0 + 0.5 * batch["negative_tiers"].float().mean(dim=1) / 2.0
        loss = (nn.functional.cross_entropy(logits, torch.zeros(len(pred), dtype=torch.long),
                                            reduction="none") * weights).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def _s3_target(endpoint: str | None) -> tuple[str | None, dict[str, Any] | None, str]:
    """``(bucket URL, storage options, note)`` for the demo's S3 copies, or ``(None, None, why not)``."""
    if not endpoint:
        return None, None, ("S3: skipped - no S3 endpoint given (pass --s3-endpoint http://127.0.0.1:PORT or set "
                            "UNISTORE_DEMO_S3_ENDPOINT or AWS_ENDPOINT_URL to also train from a bucket)")
    import uuid

    options = {"key": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
               "secret": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
               "client_kwargs": {"endpoint_url": endpoint},
               "config_kwargs": {"connect_timeout": 3, "retries": {"max_attempts": 2}}}
    bucket = f"unistore-demo-{uuid.uuid4().hex[:8]}"
    try:
        import s3fs

        s3fs.S3FileSystem(**options).mkdir(bucket)
    except Exception as e:  # noqa: BLE001 - any failure to reach the server means: skip with a note
        return None, None, f"S3: skipped - {endpoint} is not reachable ({type(e).__name__})"
    return f"s3://{bucket}", options, f"S3: training also from s3://{bucket} at {endpoint}"


def run_training_demo(workdir: str, rows: int = 20_000, pairs: int = 20_000, dim: int = 128, steps: int = 300,
                      batch_size: int = 256, s3_endpoint: str | None = None) -> list[dict[str, Any]]:
    """Build both datasets, copy them into every format, train from each; prints and returns one row per run."""
    from torch.utils.data import DataLoader

    from unistore.datasets import ClusterLabeledDataset, convert_pt_to_hdf5, copy_dataset, create_loader

    os.makedirs(workdir, exist_ok=True)
    endpoint = s3_endpoint or next((os.environ[v] for v in ("UNISTORE_DEMO_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3",
                                                            "AWS_ENDPOINT_URL") if os.environ.get(v)), None)
    s3_root, s3_options, note = _s3_target(endpoint)
    print(f"\nTraining from every backend ({rows} ClusterLabeled samples, {pairs} JASPER pairs, D={dim}, "
          f"{steps} steps of {batch_size})")
    print(note)

    seed_dir = os.path.join(workdir, "clusters")
    shutil.rmtree(seed_dir, ignore_errors=True)
    write_cluster_seed_layout(seed_dir, rows, dim, n_clusters=16)
    seed = ClusterLabeledDataset(seed_dir)  # imports dataset.db into the catalog once
    cluster_sets: list[tuple[str, Any]] = [("seed layout (sqlite + memmap)", seed)]
    targets: list[tuple[str, str, str | None, str, dict[str, Any] | None]] = [
        (label, fmt, comp, os.path.join(workdir, f"clusters-{fmt}"), None) for label, fmt, comp in FORMATS]
    if s3_root:
        targets.append(("zarr zstd on S3", "zarr", "zstd", f"{s3_root}/clusters.zarr", s3_options))
    for label, fmt, comp, url, options in targets:
        name = seed.export(url, fmt, compression=comp, chunks=(2048,) if comp else None, storage_options=options,
                           overwrite=True, name=f"clusters-{label}")
        cluster_sets.append((label, ClusterLabeledDataset(url, catalog_url=seed.catalog_url, dataset_name=name,
                                                          storage_options=options)))

    jasper_dir = os.path.join(workdir, "jasper")
    shutil.rmtree(jasper_dir, ignore_errors=True)
    write_jasper_pt_layout(jasper_dir, pairs, dim)
    convert_pt_to_hdf5(jasper_dir, compression="gzip", verbose=False)
    jasper_sets: list[tuple[str, str, str, dict[str, Any] | None]] = [
        ("pt", jasper_dir, "pt", None), ("hdf5 gzip", jasper_dir, "hdf5", None)]
    for label, fmt, comp in FORMATS:
        if fmt not in ("pt", "hdf5"):
            out = os.path.join(workdir, f"jasper-{fmt}")
            shutil.rmtree(out, ignore_errors=True)
            copy_dataset(jasper_dir, out, fmt, compression=comp, chunks=(2048,) if comp else None)
            jasper_sets.append((label, out, fmt, None))
    if s3_root:
        remote = copy_dataset(jasper_dir, f"{s3_root}/jasper", "zarr", compression="zstd", chunks=(2048,),
                              out_storage_options=s3_options)
        jasper_sets.append(("zarr zstd on S3", remote, "zarr", s3_options))

    results: list[dict[str, Any]] = []
    print(f"\n{'dataset':<14s} {'backend':<30s} {'samples/s':>10s} {'loss start':>11s} {'loss end':>9s}")

    def row(r: dict[str, Any]) -> None:  # each run's line as it ends, so a long demo shows its progress
        results.append(r)
        print(f"{r['dataset']:<14s} {r['backend']:<30s} {r['samples_s']:>10,.0f} {r['first']:>11.3f} "
              f"{r['last']:>9.3f}", flush=True)

    for label, ds in cluster_sets:
        loader = DataLoader(ds, batch_size=batch_size, shuffle=True)  # the seed's own loop, unchanged
        speed, first, last = train(loader, domain_classifier_step(dim, ds.n_clusters), steps,
                                   desc=f"ClusterLabeled {label}")
        row({"dataset": "ClusterLabeled", "backend": label, "samples_s": speed, "first": first, "last": last})
    for label, url, fmt, options in jasper_sets:
        loader = create_loader(url, "train", batch_size=batch_size, storage_format=fmt, use_mmap=True,
                               storage_options=options)
        speed, first, last = train(loader, jasper_step(dim), steps, desc=f"JASPER {label}")
        row({"dataset": "JASPER", "backend": label, "samples_s": speed, "first": first, "last": last})
    falling = all(r["last"] < r["first"] for r in results)
    print("\nthe loss fell on every backend" if falling else "\nWARNING: the loss did not fall everywhere")
    return results
