"""Property test: any numeric array written in any format reads back like numpy, for any take."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import unistore as us

from .native import STORE_NAME

DTYPES = st.sampled_from(["int8", "int32", "int64", "uint8", "float16", "float32", "float64", "bool"])


@st.composite
def case(draw: Any) -> tuple[str, np.ndarray, np.ndarray, tuple[int, ...] | None]:
    fmt = draw(st.sampled_from(sorted(STORE_NAME)))
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9))
    data = draw(hnp.arrays(dtype, shape, elements={"allow_nan": False} if "float" in dtype else None))
    n = shape[0]
    idx = draw(st.lists(st.integers(-n, n - 1), max_size=20)) if n else []
    chunks = None
    if fmt in ("zarr", "hdf5") and n and draw(st.booleans()):
        chunks = (draw(st.integers(1, n)),) + shape[1:]
    return fmt, data, np.array(idx, dtype=np.int64), chunks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case())
def test_store_behaves_like_numpy(tmp_path: Any, c: tuple[str, np.ndarray, np.ndarray, Any]) -> None:
    fmt, data, idx, chunks = c
    url = tmp_path / f"{uuid.uuid4().hex}-{STORE_NAME[fmt]}"
    with us.create_store(url, format=fmt) as store:
        store.write_array("x", data, chunks=chunks)
    arr = us.open_store(url)["x"]
    assert arr.shape == data.shape and arr.dtype == data.dtype
    np.testing.assert_array_equal(arr.take(idx), data[idx])
    np.testing.assert_array_equal(arr[...], data)
    if data.shape[0]:
        np.testing.assert_array_equal(arr[1:], data[1:])
