"""Read plans as data: how an array's rows can be found.

A format describes each array with one of these frozen records; the read
engine (:mod:`unistore.storage.engine`) dispatches on their type.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import threading
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from unistore.errors import DiskFullError
from unistore.storage.location import Location

if TYPE_CHECKING:
    from unistore.storage.cache import DiskCache

__all__ = ["file_stamp", "stamp_of", "open_described", "path_identity", "LazyBlockReader", "ContiguousLayout",
           "ChunkedLayout", "InMemoryLayout", "BlockReader", "IOStats", "Layout"]


@dataclass(frozen=True, slots=True)
class ContiguousLayout:
    """Rows stored uncompressed, C-ordered, starting at ``offset`` of one file.

    This is what ``.npy``, raw memmap dumps, safetensors, ``.pt`` zip entries
    and HDF5 contiguous datasets all are; the engine reads them with ``mmap``
    locally and with merged concurrent range requests remotely.
    """

    location: Location
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    #: identity of a local file when it was opened, so a replaced file is never
    #: served from a stale mapping (0 for remote objects)
    stamp: int = 0
    #: where the bytes come from (:func:`~unistore.storage.sources.byte_source`, shared by the arrays of one file)
    source: Any = field(default=None, compare=False, repr=False)
    #: the disk cache a remote file is read through (None: read directly), when ``source`` is made here
    cache: InitVar[DiskCache | None] = None

    def __post_init__(self, cache: DiskCache | None) -> None:
        if self.source is None:
            from unistore.storage.sources import byte_source

            object.__setattr__(self, "source", byte_source(self.location, self.stamp, cache))

    @property
    def row_nbytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def file_stamp(location: Location) -> int:
    """Device, inode, size and mtime of a local file folded into one int (0 when remote)."""
    if not location.is_local:
        return 0
    return stamp_of(os.stat(location.path))


def stamp_of(st: os.stat_result) -> int:
    return hash((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


def path_identity(path: str) -> tuple[int, ...] | None:
    """(device, inode, size, mtime) of what is at a local ``path`` now, None if nothing: a store republished (its
    root swapped for a new file or directory) has another identity."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_described(location: Location, stamp: int) -> Any:
    """The local file at ``location`` opened for reading, checked to be the very file that was described
    when its store was opened (``stamp``, from :func:`file_stamp`; 0 skips the check).

    The check is made on the open descriptor, so what is read or mapped
    afterwards is that file even if the path is replaced meanwhile.

    Raises:
        StoreChangedError: the file was replaced or removed since.
    """
    from unistore.errors import StoreChangedError

    try:
        f = open(location.path, "rb")
    except FileNotFoundError:
        if not stamp:
            raise
        raise StoreChangedError(f"{location.url} was removed after its store was opened (rewritten with "
                                "overwrite=True, or deleted); open the store again") from None
    if stamp and stamp_of(os.fstat(f.fileno())) != stamp:
        f.close()
        raise StoreChangedError(f"{location.url} was replaced after its store was opened (rewritten with "
                                "overwrite=True?); its bytes are not served under the old shape and dtype - open the "
                                "store again to read the new version")
    return f


def preallocate(path: str, what: str) -> None:
    """Give the file at ``path`` (sized already, sparse) its disk blocks before anything writes into it
    through a map; ``what`` names it in the error.

    A page of a sparse file written through ``mmap`` on a full disk kills the
    process with SIGBUS; allocated first, a full disk is one clear error here.

    Raises:
        DiskFullError: the disk holding ``path`` has no room for the file.
    """
    nbytes = os.path.getsize(path)
    if nbytes <= 0:
        return
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free
        raise DiskFullError(
            f"{what} needs {nbytes:,} bytes at {path}, and that disk has {free:,} bytes free: "
            f"free space under {folder} or write somewhere with room") from None


@runtime_checkable
class BlockReader(Protocol):
    """Reads decoded rows ``[start, stop)`` of a chunked array (format-specific).

    Implementations must be picklable and (re)open their handles lazily.
    ``concurrent`` says whether several blocks may be read from threads at once;
    ``location`` is where the array is stored (None: nowhere a deadline applies)
    and ``cache`` the disk cache its decoded chunks are kept in (None: the
    process's decoded-chunk LRU).  ``fetched() -> (requests, bytes)`` counts
    what it read from storage, for ``io_stats()``; ``identity() -> str | None``
    (see :meth:`LazyBlockReader.identity`) keys its decoded chunks in ``cache``.
    """

    concurrent: bool

    @property
    def location(self) -> Location | None: ...

    @property
    def cache(self) -> DiskCache | None: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...

    def fetched(self) -> tuple[int, int] | None: ...

    def identity(self) -> str | None: ...


class LazyBlockReader:
    """Base of block readers that hold a per-process handle (an open file, a zarr array).

    Pickles as ``(location, name, cache)`` only; the handle is (re)opened by
    :meth:`handle` on first use in each process, under a lock so the engine's
    threads share one.  Subclasses implement ``_open`` and ``read``.
    """

    concurrent = False

    def __init__(self, location: Location, name: str, cache: DiskCache | None = None):
        self.location = location
        self.name = name
        #: the disk cache decoded chunks (and, remotely, the file's bytes) are kept in, or None
        self.cache = cache
        self._handle: Any = None
        self._pid = -1
        self._lock = threading.Lock()

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.location, self.name, self.cache)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def _open(self) -> Any:
        raise NotImplementedError

    def handle(self) -> Any:
        """This process's handle, opened on first use."""
        with self._lock:
            if self._handle is None or self._pid != os.getpid():
                self._handle = self._open()
                self._pid = os.getpid()
            return self._handle

    def current(self) -> Any:
        """The handle if this process already opened it, else None."""
        return self._handle if self._pid == os.getpid() else None

    def identity(self) -> str | None:
        """What the stored array is, for keying its decoded chunks in a disk cache: changes whenever a stored
        byte of it does.  None (the default) when the reader cannot tell, and then nothing decoded is kept."""
        return None

    def fetched(self) -> tuple[int, int] | None:
        """Objects (or ranges) read from storage and the bytes they held, in this process; None: not counted."""
        return None


@dataclass(frozen=True, slots=True)
class ChunkedLayout:
    """Rows live in chunks of ``chunk_rows`` rows that must be decoded whole."""

    reader: BlockReader
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    chunk_rows: int
    token: str  # identifies the array in the decoded-chunk cache


@dataclass(frozen=True, slots=True)
class InMemoryLayout:
    """Small arrays a format had to decode entirely (offsets, legacy pickles)."""

    data: np.ndarray


Layout = ContiguousLayout | ChunkedLayout | InMemoryLayout


@dataclass
class IOStats:
    """Counters for every read of a store (``TensorStore.io_stats()``).

    ``requests``/``bytes``: storage reads issued and bytes they returned
    (range requests remotely; for local ``mmap`` reads, rows copied).
    ``cache_hits``: decoded chunks served from the chunk cache.
    ``disk_hits``/``disk_misses``: blocks of remote objects, or decoded chunks
    of chunked arrays, found / not found in the persistent local cache;
    ``bytes_local``: bytes it served.
    """

    requests: int = 0
    bytes: int = 0
    cache_hits: int = 0
    chunks_decoded: int = 0
    disk_hits: int = 0
    disk_misses: int = 0
    bytes_local: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, requests: int = 0, nbytes: int = 0, cache_hits: int = 0, chunks_decoded: int = 0,
            disk_hits: int = 0, disk_misses: int = 0, bytes_local: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
            self.cache_hits += cache_hits
            self.chunks_decoded += chunks_decoded
            self.disk_hits += disk_hits
            self.disk_misses += disk_misses
            self.bytes_local += bytes_local

    def add_read(self, requests: int, nbytes: int) -> None:
        """:meth:`add` of requests and bytes only (the local hot path)."""
        with self._lock:
            self.requests += requests
            self.bytes += nbytes

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes": self.bytes, "cache_hits": self.cache_hits,
                "chunks_decoded": self.chunks_decoded, "disk_hits": self.disk_hits,
                "disk_misses": self.disk_misses, "bytes_local": self.bytes_local}

    def reset(self) -> None:
        with self._lock:
            self.requests = self.bytes = self.cache_hits = self.chunks_decoded = 0
            self.disk_hits = self.disk_misses = self.bytes_local = 0

    def __getstate__(self) -> dict[str, int]:
        return {}  # counters are per process

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__()  # type: ignore[misc]
