"""Layer 2: the small interface every format implements.

A format *reads* by returning an :class:`OpenedStore` - the arrays it holds,
each described by an :class:`ArrayInfo` whose ``layout`` tells the read engine
where the rows are - and *writes* through a :class:`FormatWriter` into a local
staging path that :mod:`unistore.storage.store` commits atomically.
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from unistore.errors import UnsupportedError
from unistore.storage.layout import Layout
from unistore.storage.location import Location

if TYPE_CHECKING:
    from unistore.storage.cache import DiskCache

__all__ = [
    "ArrayInfo",
    "RaggedInfo",
    "OpenedStore",
    "Format",
    "FormatWriter",
    "META_NAME",
    "META_KEY",
    "dumps_meta",
    "loads_meta",
    "bfloat16",
    "dtype_name",
    "checked_nbytes",
]

#: Store-level metadata file of directory formats (written last on commit).
META_NAME = "unistore.json"
#: Marker object present while a remote store is being published.
PENDING_NAME = ".unistore-pending"
#: Attribute / metadata entry holding the same JSON inside single-file formats.
META_KEY = "unistore"


def _bfloat16() -> np.dtype[Any] | None:
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes is a core dependency
        return None
    return np.dtype(ml_dtypes.bfloat16)


bfloat16 = _bfloat16()


def checked_nbytes(shape: Any, dtype: np.dtype[Any], where: str) -> int:
    """Bytes an array of ``shape`` and ``dtype`` takes, refusing shapes numpy cannot hold.

    Header parsers call it before trusting a shape: every dimension must be a
    non-negative integer, and the whole array must be addressable
    (``(-6, 4)`` or ``(0, 10**30)`` are corrupt headers, not arrays).

    Raises:
        CorruptDataError: naming ``where`` and the shape.
    """
    from unistore.errors import CorruptDataError

    if not isinstance(shape, (tuple, list)) or not all(type(s) is int and s >= 0 for s in shape):
        raise CorruptDataError(f"{where}: shape {shape!r} is not a list of non-negative integers; "
                               "the header is corrupt")
    if math.prod(max(1, s) for s in shape) * max(1, dtype.itemsize) > _MAX_ARRAY_BYTES:
        raise CorruptDataError(f"{where}: shape {tuple(shape)} of {dtype} is larger than any array numpy can "
                               "hold; the header is corrupt")
    return math.prod(shape) * dtype.itemsize


#: the largest array numpy addresses (its sizes are signed 64-bit)
_MAX_ARRAY_BYTES = (1 << 63) - 1


def dtype_name(dtype: np.dtype[Any]) -> str:
    """A portable name for a dtype: ``float32``, ``bfloat16``, ``int64`` ..."""
    return "bfloat16" if bfloat16 is not None and dtype == bfloat16 else np.dtype(dtype).name


@dataclass
class ArrayInfo:
    """What a format knows about one array, without reading its data."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    layout: Layout
    chunks: tuple[int, ...] | None = None
    compression: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    #: bytes on storage; a format that must list objects to know gives a callable, asked on first use
    stored_nbytes: int | None | Callable[[], int | None] = None


@dataclass
class RaggedInfo:
    """A ragged array: row ``i`` is ``values[offsets[i]:offsets[i+1]]``."""

    key: str
    values: ArrayInfo
    offsets: ArrayInfo
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OpenedStore:
    """A format's view of a store: its arrays and store-level metadata."""

    format: str
    arrays: dict[str, ArrayInfo | RaggedInfo]
    attrs: dict[str, Any] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)


def dumps_meta(fmt: str, attrs: dict[str, Any], checksums: dict[str, str], ragged: list[str],
               array_attrs: dict[str, dict[str, Any]]) -> str:
    """The store metadata JSON unistore writes into every store."""
    return json.dumps({"format": fmt, "version": 1, "attrs": attrs, "checksums": checksums, "ragged": ragged,
                       "array_attrs": array_attrs}, sort_keys=True)


def loads_meta(text: str | bytes | None) -> dict[str, Any]:
    if not text:
        return {}
    from unistore.errors import CorruptDataError

    try:
        meta = json.loads(text)
    except ValueError as e:
        raise CorruptDataError(f"unistore metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CorruptDataError("unistore metadata is not a JSON object")
    return meta


class FormatWriter(ABC):
    """Writes arrays into a *local* staging path; commit happens elsewhere.

    Ragged arrays default to two plain arrays ``key/values`` and
    ``key/offsets`` listed in the store metadata; formats with a native ragged
    type override :meth:`write_ragged`.
    """

    def __init__(self, path: str, fmt: Format):
        self.path = path
        self.format = fmt
        self.ragged: list[str] = []
        self.array_attrs: dict[str, dict[str, Any]] = {}

    def keep_attrs(self, key: str, attrs: dict[str, Any]) -> None:
        """Remember array attrs for formats that keep them in the store metadata."""
        if attrs:
            self.array_attrs[key] = dict(attrs)

    def meta_json(self, attrs: dict[str, Any], checksums: dict[str, str]) -> str:
        return dumps_meta(self.format.name, attrs, checksums, self.ragged, self.array_attrs)

    @abstractmethod
    def write_array(self, key: str, data: np.ndarray, chunks: tuple[int, ...] | None,
                    compression: str | None, attrs: dict[str, Any]) -> None:
        """Write one dense array under ``key`` (validated by the caller)."""

    def create_array(self, key: str, shape: tuple[int, ...], dtype: np.dtype[Any], chunks: tuple[int, ...] | None,
                     compression: str | None, attrs: dict[str, Any]) -> tuple[str, int] | None:
        """Create an empty array that other processes fill block by block, if this format can.

        Returns ``(local path of the array, rows per independently writable
        block)``; blocks of that many rows (from row 0) may be written
        concurrently.  The default (None) means the format writes an array in
        one piece only (one file per store, or one writer per file).
        """
        return None

    def write_ragged(self, key: str, values: np.ndarray, offsets: np.ndarray, attrs: dict[str, Any]) -> None:
        self.write_array(f"{key}/values", values, None, None, attrs)
        self.write_array(f"{key}/offsets", offsets, None, None, {})
        self.ragged.append(key)

    @abstractmethod
    def finish(self, attrs: dict[str, Any], checksums: dict[str, str]) -> list[str]:
        """Write store metadata; return staged paths relative to ``self.path``
        that must be published *last* (the root metadata)."""

    def check_compression(self, compression: str | None) -> None:
        if not compression or compression.split(":", 1)[0] in self.format.compressions:
            return
        name = self.format.name
        if self.format.compressions:
            raise UnsupportedError(f"format {name!r} has no compression {compression!r}; choose one of "
                                   f"{', '.join(self.format.compressions)}")
        from unistore.storage.formats import compressing_formats

        others = " or ".join(f"format={f!r} ({', '.join(c)})" for f, c in compressing_formats())
        raise UnsupportedError(f"format {name!r} stores arrays uncompressed: drop compression={compression!r}, or "
                               f"write {others}")


class Format(ABC):
    """One storage format.  Capabilities are plain class attributes."""

    name: ClassVar[str]
    #: Compression codecs ``write_array`` accepts.
    compressions: ClassVar[tuple[str, ...]] = ()
    #: file name suffixes of the format's files (detection by name: a file, or the files of a directory store)
    extensions: ClassVar[tuple[str, ...]] = ()
    #: bytes a file of the format starts with (detection by content)
    magic: ClassVar[tuple[bytes, ...]] = ()
    #: names whose presence in a directory makes it a store of this format (zarr's metadata documents)
    markers: ClassVar[tuple[str, ...]] = ()
    #: the suffix of a store path of this format as datasets name them (``""``: a directory of files)
    store_suffix: ClassVar[str] = ""
    #: the library the format reads with, imported only when a store of the format is read (None: numpy)
    library: ClassVar[str | None] = None
    #: how to install that library
    install_hint: ClassVar[str] = ""

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        """Whether the first bytes of a file are this format's."""
        return any(head.startswith(m) for m in cls.magic)

    @classmethod
    def write_block(cls, array_path: str, start: int, block: np.ndarray) -> None:
        """Write rows ``start:start + len(block)`` into the array at ``array_path`` that the writer's
        :meth:`FormatWriter.create_array` made (in another process: a Dask worker)."""
        from unistore.errors import UnsupportedError

        raise UnsupportedError(f"the {cls.name} format does not take arrays in blocks")

    @abstractmethod
    def open(self, location: Location, cache: DiskCache | None = None, **options: Any) -> OpenedStore:
        """List the arrays at ``location``: metadata reads only, never the data.  Remote arrays are read through
        the disk cache ``cache`` (None: directly), and what it holds of the files' first bytes is used here."""

    @abstractmethod
    def writer(self, path: str, **options: Any) -> FormatWriter:
        """A writer that stages a new store at the local ``path``."""


def group_ragged(arrays: dict[str, ArrayInfo | RaggedInfo], ragged: list[str]) -> dict[str, ArrayInfo | RaggedInfo]:
    """Fold ``key/values`` + ``key/offsets`` pairs listed in ``ragged`` into :class:`RaggedInfo`."""
    for key in ragged:
        values, offsets = arrays.pop(f"{key}/values", None), arrays.pop(f"{key}/offsets", None)
        if isinstance(values, ArrayInfo) and isinstance(offsets, ArrayInfo):
            arrays[key] = RaggedInfo(key, values, offsets, dict(values.attrs))
    return arrays


def apply_meta(opened: OpenedStore, meta: dict[str, Any]) -> OpenedStore:
    """Fill store attrs, checksums, array attrs and ragged pairs from unistore metadata."""
    opened.attrs.update(meta.get("attrs", {}))
    opened.checksums.update(meta.get("checksums", {}))
    for key, attrs in dict(meta.get("array_attrs", {})).items():
        info = opened.arrays.get(key)
        if info is not None:
            info.attrs.update(attrs)
    group_ragged(opened.arrays, list(meta.get("ragged", [])))
    return opened


def list_members(location: Location, extension: str) -> dict[str, tuple[str, int]]:
    """Files below a directory store ending in ``extension``: key -> (path, size).

    Keys are relative paths without the extension; hidden and staging entries are skipped.
    """
    from unistore.storage.location import identity_from, retry_remote

    fs = location.fs
    found = retry_remote(lambda: fs.find(location.path, detail=True), location)
    root = location.path.rstrip("/") + "/"
    members: dict[str, tuple[str, int]] = {}
    for path, info in sorted(found.items()):
        rel = path[len(root):] if path.startswith(root) else path.rsplit("/", 1)[-1]
        if not rel.endswith(extension) or any(part.startswith(".") for part in rel.split("/")):
            continue
        if location.is_local:
            check_local_member(location, path)
        else:  # what this version of each object is: its reads ask for this version only
            location.listed[path] = identity_from(location.protocol, path, info)
        members[rel[: -len(extension)]] = (path, int(info.get("size") or 0))
    return members


def object_size(location: Location) -> int:
    """Size of the file at ``location``; remotely it is learned with the object's identity (one HEAD), so later
    reads can ask for that version only."""
    if location.is_local:
        return os.path.getsize(location.path)
    return location.identity()[1]


def check_local_member(location: Location, path: str) -> None:
    """A file of a local directory store must be a regular file inside the store: a link out of the store is
    never followed, and a FIFO or device is never opened (reading one would hang or read another thing).

    Raises:
        InvalidKeyError: the file is a link to something outside the store.
        FormatError: it is not a regular file.
    """
    import stat

    from unistore.errors import FormatError, InvalidKeyError

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path} in store {location.url} is not a regular file (a FIFO, device or socket); "
                          "remove it or replace it with the file it stands for")
    root = os.path.realpath(location.path)
    real = os.path.realpath(path)
    if not real.startswith(root + os.sep):
        raise InvalidKeyError(f"{path} in store {location.url} links to {real}, outside the store; unistore does "
                              "not follow links out of a store (copy the file into the store instead)")


def read_dir_meta(location: Location) -> dict[str, Any]:
    """The ``unistore.json`` of a directory store, or ``{}`` for foreign directories."""
    from unistore.storage.location import retry_remote

    fs = location.fs
    pending = f"{location.path.rstrip('/')}/{PENDING_NAME}"
    try:
        raw = retry_remote(lambda: fs.cat_file(f"{location.path.rstrip('/')}/{META_NAME}"), location)
    except FileNotFoundError:
        raw = None
    if raw is None and retry_remote(lambda: fs.exists(pending), location):
        raise incomplete_error(location)
    return loads_meta(raw)


def incomplete_error(location: Location) -> Exception:
    from unistore.errors import IncompleteStoreError

    return IncompleteStoreError(f"{location.url} is still being written or its writer died before committing; "
                                "wait for the writer, or delete it and write it again")


def read_range(location: Location, start: int | None = None, end: int | None = None, stamp: int = 0) -> bytes:
    """Bytes ``[start, end)`` of the file at ``location`` (retried when remote).

    ``stamp``: a local file must still be the one whose first bytes gave it
    (see :func:`~unistore.storage.layout.open_described`).
    """
    from unistore.storage.layout import open_described
    from unistore.storage.location import retry_remote

    if location.is_local:
        with open_described(location, stamp) as f:
            f.seek(start or 0)
            return f.read(-1 if end is None else max(0, end - (start or 0)))
    return bytes(retry_remote(lambda: location.fs.cat_file(location.path, start=start, end=end), location))


def head_bytes(location: Location, paths: list[str], nbytes: int,
               cache: DiskCache | None = None) -> list[tuple[bytes, int]]:
    """The first ``nbytes`` of several files, fetched concurrently (unless ``cache`` holds them), each with the
    :func:`~unistore.storage.layout.file_stamp` of the very file they were read from (0 when remote)."""
    from unistore.storage.layout import stamp_of
    from unistore.storage.location import retry_remote

    if not paths:
        return []
    if location.is_local:
        out = []
        for p in paths:
            with open(p, "rb") as f:
                out.append((f.read(nbytes), stamp_of(os.fstat(f.fileno()))))
        return out
    fs = location.fs
    heads: list[bytes | None] = [_cached_head(location, p, nbytes, cache) for p in paths]
    asked = [p for p, h in zip(paths, heads) if h is None]
    blobs = retry_remote(lambda: fs.cat_ranges(asked, [0] * len(asked), [nbytes] * len(asked), on_error="return"),
                         location) if asked else []
    for blob in blobs:
        if isinstance(blob, BaseException):  # cat_ranges returns some failures instead of raising them
            raise _as_remote_error(blob, location)
    fetched = iter(blobs)
    return [(h if h is not None else bytes(next(fetched)), 0) for h in heads]


def _cached_head(location: Location, path: str, nbytes: int, cache: DiskCache | None) -> bytes | None:
    """The first ``nbytes`` of a remote object from its first block in ``cache``, when the cache holds that block
    for the version the listing (or lookup) found; None otherwise (nothing is fetched here)."""
    if cache is None:
        return None
    known = location.listed.get(path) or (location.known_identity if path == location.path else None)
    if known is None:
        return None
    identity, size = known
    want = min(cache.block_bytes, size)
    if want < min(nbytes, size):
        return None
    block = cache.get_entry(identity, "0", want)
    return None if block is None else bytes(block[:nbytes])


def _as_remote_error(exc: BaseException, location: Location) -> Exception:
    from unistore.errors import RemoteError

    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return exc  # type: ignore[return-value]
    return RemoteError(f"reading {location.url} failed ({type(exc).__name__}); check that the endpoint is "
                       "reachable and the credentials are valid")


def file_location(location: Location, path: str) -> Location:
    """A :class:`Location` for one member file of a directory store."""
    loc = Location.__new__(Location)
    url = path if location.protocol == "file" else f"{location.protocol}://{path}"
    known = location.known_identity if path == location.path else location.listed.get(path)
    loc.__setstate__((url, location.protocol, path, location.storage_options, known, None, location.deadline,
                      location.transport_choice))
    return loc
