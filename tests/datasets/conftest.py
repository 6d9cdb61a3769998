"""Fixtures: JASPER and ClusterLabeled datasets in every format, on local disk and on the S3 server."""

from __future__ import annotations

import os
from typing import Any

import pytest

from unistore.datasets import copy_dataset

from .builders import make_jasper, write_jasper_h5, write_jasper_pt

JASPER_FORMATS = ("pt", "hdf5", "zarr", "safetensors", "npy")


@pytest.fixture(scope="session")
def jasper_data() -> dict[str, Any]:
    return make_jasper()


@pytest.fixture(scope="session")
def jasper_root(tmp_path_factory: pytest.TempPathFactory, jasper_data: dict[str, Any]) -> str:
    """One dataset directory per format: PT and HDF5 as documented, the others converted from PT."""
    root = str(tmp_path_factory.mktemp("jasper"))
    pt = write_jasper_pt(os.path.join(root, "pt"), jasper_data)
    write_jasper_h5(os.path.join(root, "hdf5"), jasper_data)
    for fmt, options in (("zarr", {"compression": "zstd", "chunks": (16,)}), ("safetensors", {}), ("npy", {})):
        copy_dataset(pt, os.path.join(root, fmt), fmt, **options)
    return root


def jasper_url(root: str, fmt: str, where: str, s3: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """The dataset directory of ``fmt``, locally or uploaded to the S3 server."""
    local = os.path.join(root, fmt)
    if where == "local":
        return local, None
    assert s3 is not None
    s3["fs"].put(local + "/", f"{s3['bucket']}/{fmt}", recursive=True)
    return f"s3://{s3['bucket']}/{fmt}", s3["options"]

