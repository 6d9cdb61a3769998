"""A minimal torch Dataset over unistore arrays, importable by spawned workers."""

from __future__ import annotations

from typing import Any

import numpy as np


class MultiFormatDataset:
    """Row ``i`` of every array, one per format, as a tuple of numpy arrays."""

    def __init__(self, arrays: list[Any]):
        self.arrays = arrays

    def __len__(self) -> int:
        return int(self.arrays[0].shape[0])

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
        return tuple(a.take([i])[0] for a in self.arrays)

    def __getitems__(self, indices: list[int]) -> list[tuple[np.ndarray, ...]]:
        columns = [a.take(indices) for a in self.arrays]  # one gather per array per batch
        return [tuple(c[j] for c in columns) for j in range(len(indices))]
