"""Builders of crafted files: valid files changed in one place, written without unistore."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Any

import numpy as np


def npy_bytes(header: str | bytes, data: bytes = b"", version: tuple[int, int] = (1, 0)) -> bytes:
    """A ``.npy`` file with the header text given verbatim (padded with spaces and a newline as numpy does)."""
    raw = header.encode("latin1") if isinstance(header, str) else header
    width = 2 if version == (1, 0) else 4
    pad = (-(8 + width + len(raw) + 1)) % 64
    body = raw + b" " * pad + b"\n"
    return b"\x93NUMPY" + bytes(version) + len(body).to_bytes(width, "little") + body + data


def safetensors_bytes(header: dict[str, Any] | str, data: bytes) -> bytes:
    """A safetensors file with this header (a dict, or JSON text given verbatim) and data."""
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def rezip(src: str | os.PathLike[str], dest: str | os.PathLike[str], method: int = zipfile.ZIP_STORED,
          replace: dict[str, bytes] | None = None) -> None:
    """Copy a torch checkpoint's records into a new zip written by Python's ``zipfile`` (another layout than
    torch's own), optionally replacing some records' bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", compression=method) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, new in (replace or {}).items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info.filename, data)


def write(path: str | os.PathLike[str], data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def float_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
