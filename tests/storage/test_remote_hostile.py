"""Crafted headers served from S3 get the same typed errors as the same files on local disk."""

from __future__ import annotations

from typing import Any

import pytest

import unistore as us
from unistore import errors

from .crafted import npy_bytes, safetensors_bytes

pytestmark = pytest.mark.s3

CASES = {
    "npy-negative": ("x.npy", npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (-6, 4), }", b"\0" * 96),
                     errors.CorruptDataError),
    "npy-version-4": ("x.npy", b"\x93NUMPY\x04\x00" + b"\x10\x00" + b" " * 16, errors.CorruptDataError),
    "npy-unterminated": ("x.npy", npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2,")
                         + b"\0" * 8, errors.CorruptDataError),
    "npy-cut-header": ("x.npy", npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }")[:30],
                       errors.TruncatedDataError),
    "safetensors-overlap": ("x.safetensors", safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24), errors.CorruptDataError),
    "safetensors-huge-header": ("x.safetensors", (10**12).to_bytes(8, "little") + b"{}", errors.CorruptDataError),
    "safetensors-bad-json": ("x.safetensors", (8).to_bytes(8, "little") + b"{\"a\": [}", errors.CorruptDataError),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["file", "directory"])
def test_crafted_headers_from_s3_are_typed(case: str, layout: str, s3: dict[str, Any], tmp_path: Any) -> None:
    name, raw, expected = CASES[case]
    local = tmp_path / name
    local.write_bytes(raw)
    key = f"{s3['bucket']}/{case}/{name}" if layout == "directory" else f"{s3['bucket']}/{case}-{name}"
    s3["fs"].pipe_file(key, raw)
    url = f"s3://{key.rsplit('/', 1)[0]}" if layout == "directory" else f"s3://{key}"
    fmt = name.rsplit(".", 1)[1]
    with pytest.raises(expected) as remote:
        us.open_store(url, format=fmt, storage_options=s3["options"])
    with pytest.raises(expected) as here:
        us.open_store(local if layout == "file" else tmp_path, format=fmt)
    assert type(remote.value) is type(here.value)
