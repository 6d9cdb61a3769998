"""unistore: one storage layer for ML training data.

>>> import unistore as us
>>> store = us.open_store("s3://bucket/run1.zarr", storage_options={...})
>>> rows = store["embeddings"].take([7, 3, 7])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unistore import errors

__version__ = "0.1.0"
__all__ = [
    "errors",
    "open_store",
    "create_store",
    "convert",
    "TensorStore",
    "Array",
    "RaggedArray",
    "Location",
    "available_formats",
]

_LAZY = {
    "open_store": "unistore.storage.store",
    "create_store": "unistore.storage.store",
    "TensorStore": "unistore.storage.store",
    "Array": "unistore.storage.array",
    "RaggedArray": "unistore.storage.array",
    "Location": "unistore.storage.location",
    "available_formats": "unistore.storage.formats",
    "convert": "unistore.storage.convert",
}

if TYPE_CHECKING:
    from unistore.storage.array import Array, RaggedArray
    from unistore.storage.convert import convert
    from unistore.storage.formats import available_formats
    from unistore.storage.location import Location
    from unistore.storage.store import TensorStore, create_store, open_store


def __getattr__(name: str) -> Any:
    # keeps `import unistore` free of numpy/fsspec until an API is used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unistore' has no attribute {name!r}")
