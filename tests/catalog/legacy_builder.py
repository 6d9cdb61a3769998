"""Builds legacy ``dataset.db`` files with the seed's own schema and real numpy pickles."""

from __future__ import annotations

import pickle
import sqlite3
from typing import Any

import numpy as np

# verbatim from the ClusterLabeledDataset spec ("SQLite Schema")
SEED_SCHEMA = """
CREATE TABLE samples (
    sample_id INTEGER PRIMARY KEY,
    embedding_idx INTEGER NOT NULL,           -- Index in memmap arrays
    sample_type TEXT NOT NULL,                -- "question" or "source"
    text TEXT NOT NULL,                       -- Original text
    chroma_id TEXT NOT NULL,                  -- ChromaDB identifier
    suggestions TEXT,                         -- Domain suggestions (JSON)
    steering_mode TEXT NOT NULL,              -- Steering method used
    source_label BLOB NOT NULL,               -- Numpy array (pickled)
    steering_label BLOB NOT NULL,             -- Numpy array (pickled)
    combined_label BLOB NOT NULL              -- Numpy array (pickled)
);

CREATE TABLE dataset_info (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Stores: n_clusters, embedding_dim, dataset_size
"""


def soft_label(rng: np.random.Generator, n_clusters: int, dtype: str = "float32") -> np.ndarray:
    x = rng.random(n_clusters)
    return (x / x.sum()).astype(dtype)


def build_legacy_db(path: str, n: int, n_clusters: int = 5, dim: int = 8, seed: int = 0,
                    protocols: tuple[int, ...] = (2, 3, 4, 5), first_id: int = 1,
                    overrides: dict[int, dict[str, Any]] | None = None) -> dict[int, list[np.ndarray]]:
    """Write a legacy db of ``n`` samples; returns sample_id -> [source, steering, combined].

    ``overrides`` replaces columns of given sample ids with raw values (bad blobs).
    """
    rng = np.random.default_rng(seed)
    conn = sqlite3.connect(path)
    conn.executescript(SEED_SCHEMA)
    conn.executemany("INSERT INTO dataset_info VALUES (?, ?)",
                     [("n_clusters", str(n_clusters)), ("embedding_dim", str(dim)), ("dataset_size", str(n))])
    expected: dict[int, list[np.ndarray]] = {}
    rows = []
    for i in range(n):
        sid = first_id + i
        labels = [soft_label(rng, n_clusters, "float32" if i % 3 else "float64") for _ in range(3)]
        proto = protocols[i % len(protocols)]
        row: dict[str, Any] = {
            "sample_id": sid, "embedding_idx": i, "sample_type": "question" if i % 2 else "source",
            "text": f"text {sid}", "chroma_id": f"chroma-{sid}", "suggestions": '["a", "b"]' if i % 4 else None,
            "steering_mode": "centroid",
            "source_label": pickle.dumps(labels[0], protocol=proto),
            "steering_label": pickle.dumps(labels[1], protocol=proto),
            "combined_label": pickle.dumps(labels[2], protocol=proto),
        }
        row.update((overrides or {}).get(sid, {}))
        if sid not in (overrides or {}):
            expected[sid] = labels
        rows.append(tuple(row.values()))
    conn.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    return expected
