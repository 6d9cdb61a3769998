"""The storage layer: locations, formats, the read engine and ``TensorStore``."""

from unistore.storage.array import Array, RaggedArray
from unistore.storage.formats import available_formats, detect_format, get_format, register_format
from unistore.storage.location import Location
from unistore.storage.store import TensorStore, create_store, open_store

__all__ = [
    "Array",
    "RaggedArray",
    "Location",
    "TensorStore",
    "open_store",
    "create_store",
    "available_formats",
    "detect_format",
    "get_format",
    "register_format",
]
