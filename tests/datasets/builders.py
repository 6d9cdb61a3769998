"""Seed-layout datasets written exactly as the spec documents describe, with each format's own library."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import sqlite3
import struct
from typing import Any

import numpy as np

from ..catalog.legacy_builder import SEED_SCHEMA

# logical name -> HDF5 key, as in the JASPER document's "HDF5 Format" tree
H5_KEYS = {
    "question_embs": "embeddings/questions", "source_embs": "embeddings/sources",
    "keyword_embs": "embeddings/keywords", "centroid_embs": "embeddings/centroids",
    "pair_index": "pair_data/index", "pair_cluster_id": "pair_data/cluster_id",
    "pair_relevance": "pair_data/relevance", "pair_keyword_ids": "pair_data/keyword_ids",
    "hard_negatives": "negatives/hard", "negative_tiers": "negatives/tiers",
    "steering_centroid": "steering/centroid", "steering_keyword_weighted": "steering/keyword_weighted",
    "steering_residual": "steering/residual", "centroid_distances": "steering/distances",
    "train_idx": "splits/train", "val_idx": "splits/val", "test_idx": "splits/test",
}


def make_jasper(n_q: int = 40, n_s: int = 60, n_k: int = 25, n_c: int = 5, n_pairs: int = 80, dim: int = 16,
                n_neg: int = 4, seed: int = 0) -> dict[str, Any]:
    """Random JASPER arrays with consistent references (numpy, plus keyword ids as lists)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    perm = rng.permutation(n_pairs)
    n_train, n_val = int(n_pairs * 0.7), int(n_pairs * 0.15)
    data: dict[str, Any] = {
        "question_embs": rng.standard_normal((n_q, dim)).astype(f32),
        "source_embs": rng.standard_normal((n_s, dim)).astype(f32),
        "keyword_embs": rng.standard_normal((n_k, dim)).astype(f32),
        "centroid_embs": rng.standard_normal((n_c, dim)).astype(f32),
        "pair_index": np.stack([rng.integers(0, n_q, n_pairs), rng.integers(0, n_s, n_pairs)], axis=1),
        "pair_cluster_id": rng.integers(0, n_c, n_pairs),
        "pair_relevance": rng.random(n_pairs).astype(f32),
        "pair_keyword_ids": [rng.integers(0, n_k, int(rng.integers(0, 4))).tolist() for _ in range(n_pairs)],
        "hard_negatives": rng.integers(0, n_s, (n_pairs, n_neg)),
        "negative_tiers": rng.integers(0, 3, (n_pairs, n_neg)),
        "steering_centroid": rng.standard_normal((n_pairs, dim)).astype(f32),
        "steering_keyword_weighted": rng.standard_normal((n_pairs, dim)).astype(f32),
        "steering_residual": rng.standard_normal((n_pairs, dim)).astype(f32),
        "centroid_distances": (rng.random(n_pairs) * 2).astype(f32),
        "train_idx": np.sort(perm[:n_train]),
        "val_idx": np.sort(perm[n_train:n_train + n_val]),
        "test_idx": np.sort(perm[n_train + n_val:]),
    }
    data["config"] = {"embedding_dim": dim, "n_neg": n_neg, "n_clusters": n_c, "dataset_name": "test",
                      "created_at": "2026-02-13T10:30:00",
                      "split_sizes": {s: int(len(data[f"{s}_idx"])) for s in ("train", "val", "test")}}
    return data


def write_jasper_pt(path: str, data: dict[str, Any]) -> str:
    """The documented PT directory: config.json plus one torch.save file per array."""
    import torch

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(data["config"], f)
    for name in H5_KEYS:
        value = data[name]
        torch.save(value if isinstance(value, list) else torch.from_numpy(np.ascontiguousarray(value)),
                   os.path.join(path, f"{name}.pt"))
    return path


def write_jasper_h5(path: str, data: dict[str, Any], compression: str | None = "gzip") -> str:
    """The documented HDF5 layout (dataset.h5 with groups; keyword ids variable-length) plus config.json."""
    import h5py

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(data["config"], f)
    with h5py.File(os.path.join(path, "dataset.h5"), "w") as f:
        for name, key in H5_KEYS.items():
            value = data[name]
            if isinstance(value, list):
                ds = f.create_dataset(key, shape=(len(value),), dtype=h5py.vlen_dtype(np.int64))
                for i, row in enumerate(value):
                    ds[i] = np.asarray(row, dtype=np.int64)
            else:
                f.create_dataset(key, data=value, compression=compression if value.ndim else None)
    return path


def expected_batch(data: dict[str, Any], split: str, positions: np.ndarray, variants: np.ndarray) -> dict[str, Any]:
    """The batch the JASPER dataset must return, computed from the numpy source."""
    pairs = data[f"{split}_idx"][positions]
    q, s = data["pair_index"][pairs, 0], data["pair_index"][pairs, 1]
    steering = np.zeros((len(pairs), data["question_embs"].shape[1]), np.float32)
    for v, name in ((1, "steering_centroid"), (2, "steering_keyword_weighted"), (3, "steering_residual")):
        sel = variants == v
        steering[sel] = data[name][pairs[sel]]
    return {
        "question_emb": data["question_embs"][q],
        "target_source_emb": data["source_embs"][s],
        "steering": steering,
        "negative_embs": data["source_embs"][data["hard_negatives"][pairs]],
        "cluster_id": data["pair_cluster_id"][pairs],
        "relevance": data["pair_relevance"][pairs],
        "centroid_distance": data["centroid_distances"][pairs],
        "steering_variant": variants,
        "negative_tiers": data["negative_tiers"][pairs],
    }


def write_cluster_seed(path: str, n: int = 60, dim: int = 8, n_clusters: int = 5, seed: int = 0,
                       overrides: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The documented ClusterLabeled directory: dataset.db (raw sqlite3, pickled labels) + two raw memmaps.

    Sample ids start at 100 and embedding rows are a permutation, so positions,
    ids and rows are all different numbers.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    base = rng.standard_normal((n, dim)).astype(np.float32)
    steering = rng.standard_normal((n, dim)).astype(np.float32)
    for name, data in (("base_embeddings.npy", base), ("steering_embeddings.npy", steering)):
        mm = np.memmap(os.path.join(path, name), dtype=np.float32, mode="w+", shape=(n, dim))
        mm[:] = data
        mm.flush()
        del mm
    rows_of = rng.permutation(n)
    labels = {k: np.zeros((n, n_clusters), np.float32) for k in ("source", "steering", "combined")}
    conn = sqlite3.connect(os.path.join(path, "dataset.db"))
    conn.executescript(SEED_SCHEMA)
    conn.executemany("INSERT INTO dataset_info VALUES (?, ?)", [("n_clusters", str(n_clusters)),
                                                                ("embedding_dim", str(dim)), ("dataset_size", str(n))])
    records = []
    for i in range(n):
        sid = 100 + i
        vecs = []
        for kind in ("source", "steering", "combined"):
            x = rng.random(n_clusters)
            x = (x / x.sum()).astype(np.float32)
            labels[kind][i] = x
            vecs.append(pickle.dumps(x))
        row = {"sample_id": sid, "embedding_idx": int(rows_of[i]), "sample_type": "question" if i % 2 else "source",
               "text": f"text of {sid}", "chroma_id": f"chroma-{sid}", "suggestions": json.dumps(["bio", "chem"]),
               "steering_mode": "centroid" if i % 3 else "residual", "source_label": vecs[0],
               "steering_label": vecs[1], "combined_label": vecs[2]}
        row.update((overrides or {}).get(sid, {}))
        records.append(tuple(row.values()))
    conn.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", records)
    conn.commit()
    conn.close()
    return {"base": base, "steering": steering, "rows": rows_of, "labels": labels, "ids": 100 + np.arange(n),
            "n_clusters": n_clusters, "dim": dim}


def _idx(array: np.ndarray, magic_dims: int | None = None) -> bytes:
    dims = array.shape
    head = bytes([0, 0, 0x08, magic_dims or len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    return head + array.astype(np.uint8).tobytes()


def write_mnist(folder: Any, n_train: int = 30, n_test: int = 10, gz: bool = False) -> dict[str, np.ndarray]:
    """MNIST's four IDX files (optionally gzipped) as the dataset ships them; returns their arrays."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    os.makedirs(folder, exist_ok=True)
    for name, arr in arrays.items():
        payload = _idx(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)
    return arrays


def write_cifar(folder: Any, variant: str = "cifar10", n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Batches as the CIFAR python version ships them: protocol-2 pickles of dicts with bytes keys."""
    rng = np.random.default_rng(1)
    os.makedirs(folder, exist_ok=True)
    names = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if variant == "cifar10" else ["train", "test"]
    all_images, all_labels = [], []
    for name in names:
        images = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        labels = rng.integers(0, 10 if variant == "cifar10" else 100, n).tolist()
        key = b"labels" if variant == "cifar10" else b"fine_labels"
        batch = {b"batch_label": name.encode(), key: labels, b"data": images,
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        if variant == "cifar100":
            batch[b"coarse_labels"] = [x // 5 for x in labels]
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        if "test" not in name:
            all_images.append(images)
            all_labels.extend(labels)
    return np.concatenate(all_images), np.array(all_labels)
