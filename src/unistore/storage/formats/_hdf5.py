"""``hdf5``: one file; groups become ``a/b`` keys.

Contiguous, unfiltered datasets expose their file offset
(``Dataset.id.get_offset()``) and are read as a :class:`ContiguousLayout` -
``mmap`` locally, byte ranges remotely - which is what makes HDF5 as fast as
a raw memmap.  Chunked and compressed (gzip, lzf) datasets are decoded by
h5py a run of chunks at a time.  Variable-length integer datasets are ragged
arrays.  Written with h5py.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import threading
import uuid
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from unistore.errors import CorruptDataError, RemoteError, TruncatedDataError, UnistoreError, UnsupportedError
from unistore.storage import budget
from unistore.storage.formats.base import (
    META_KEY,
    ArrayInfo,
    Format,
    FormatWriter,
    OpenedStore,
    RaggedInfo,
    apply_meta,
    loads_meta,
    object_size,
)
from unistore.storage.layout import (
    ChunkedLayout,
    ContiguousLayout,
    InMemoryLayout,
    IOStats,
    LazyBlockReader,
    stamp_of,
)
from unistore.storage.location import Location

if TYPE_CHECKING:
    from unistore.storage.cache import DiskCache

_LOCK = threading.Lock()  # libhdf5 is not thread-safe across files opened from Python threads


def _open_h5(location: Location, cache: DiskCache | None) -> tuple[Any, Any]:
    """(h5py.File, the :class:`_RemoteFile` under it, read through ``cache``, or None)."""
    import h5py

    fileobj: Any = None
    try:
        if location.is_local:
            return h5py.File(location.path, "r"), None
        fileobj = _RemoteFile(location, cache)
        return h5py.File(fileobj, "r"), fileobj
    except OSError as e:
        if fileobj is not None and fileobj.error is not None:
            # what the storage did (RemoteError, a missing object), not libhdf5's echo
            raise _storage_error(fileobj) from None
        text = str(e)
        if "truncated" in text.lower() or "eof" in text.lower():
            raise TruncatedDataError(f"{location.url} is a truncated HDF5 file ({text}); re-create or re-download it") \
                from e
        if "signature" in text.lower() or "not an hdf5" in text.lower() or "unable to open" in text.lower():
            raise CorruptDataError(f"{location.url} is not a readable HDF5 file ({text})") from e
        raise


def _storage_error(fileobj: _RemoteFile) -> BaseException:
    """The error that ended a read of ``fileobj``, taken from it and without its traceback: that traceback runs
    through libhdf5's callback frames, and kept alive (the file object holds the error, the error's frames hold
    the file object) it is destroyed only at interpreter exit, after libhdf5, which then crashes."""
    error = fileobj.error
    assert error is not None
    fileobj.error = None
    return error.with_traceback(None)


def _stored_as_is(ds: Any, dtype: np.dtype[Any], nbytes: int) -> bool:
    """Whether a contiguous dataset's bytes on disk are exactly numpy's ``dtype`` values, all ``nbytes`` of them."""
    import h5py

    try:
        same_type = bool(ds.id.get_type().equal(h5py.h5t.py_create(dtype)))
    except (TypeError, ValueError):
        return False
    return same_type and int(ds.id.get_storage_size()) == nbytes


def _h5_stamp(f: Any) -> int:
    """:func:`~unistore.storage.layout.file_stamp` of the local file an open ``h5py.File`` reads."""
    return stamp_of(os.fstat(f.id.get_vfd_handle()))


class _RemoteFile:
    """A read-only file object over a remote HDF5 file for h5py.

    Every read is a ranged read of the file's byte source
    (:func:`~unistore.storage.sources.byte_source`): through the disk cache
    when there is one (fetched once, in cache blocks, and read locally
    afterwards by every process on the machine), else with a read-ahead
    buffer (``budget.HDF5_READ_AHEAD_BYTES``, 1 MiB) for h5py's many small
    metadata reads.  Reads are retried and bounded by the store's deadline, and always return what was
    asked (a short body is retried, never handed to libhdf5); the error that
    ended a read is kept in ``error``, since h5py reports it only as its own
    ``OSError``.
    """

    def __init__(self, location: Location, cache: DiskCache | None = None):
        from unistore.storage.sources import byte_source

        self._loc = location
        self._source = byte_source(location, cache=cache)
        self._size = location.identity()[1]
        self._pos = 0
        self._stats = IOStats()
        self._buf = b""
        self._buf_start = 0
        self.error: BaseException | None = None

    def _fetch(self, start: int, end: int) -> bytes:
        try:
            return bytes(self._source.read_ranges(np.array([start]), np.array([end]), self._stats)[0])
        except BaseException as e:
            self.error = e
            raise

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        end = min(self._pos + len(view), self._size)
        if end <= self._pos:
            return 0
        if self._source.cached_remote:
            blob = self._fetch(self._pos, end)
        else:
            lo, hi = self._buf_start, self._buf_start + len(self._buf)
            if not (lo <= self._pos and end <= hi):
                self._buf_start = self._pos
                self._buf = self._fetch(self._pos, min(self._size, max(end, self._pos + budget.HDF5_READ_AHEAD_BYTES)))
            at = self._pos - self._buf_start
            blob = self._buf[at:at + end - self._pos]
        view[:len(blob)] = blob
        self._pos += len(blob)
        return len(blob)

    def read(self, size: int = -1) -> bytes:
        n = self._size - self._pos if size is None or size < 0 else size
        buf = bytearray(max(0, min(n, self._size - self._pos)))
        return bytes(buf[:self.readinto(buf)])

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self._size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def requests(self) -> int:
        """Range requests this file sent to storage (with a disk cache: blocks missing from it)."""
        return self._stats.requests

    @property
    def nbytes(self) -> int:
        return self._stats.bytes

    def close(self) -> None:
        self._buf = b""


def _close_h5(h5: Any, fileobj: Any) -> None:
    # h5py first, then the Python file it reads through: the other order (or
    # leaving it to garbage collection at interpreter exit) can crash libhdf5
    if h5 is not None:
        h5.close()
    if fileobj is not None:
        fileobj.close()


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


_OPEN_READERS: weakref.WeakSet[Hdf5BlockReader] = weakref.WeakSet()


@atexit.register
def _close_open_readers() -> None:
    # Spawned DataLoader workers exit through full interpreter finalization; an
    # h5py file still open on a Python file object then crashes libhdf5.
    # atexit runs before module teardown, while closing is still safe.
    for reader in list(_OPEN_READERS):
        reader.close()


class Hdf5BlockReader(LazyBlockReader):
    """Reads rows of one chunked dataset through h5py; the handle is (file, remote file object).

    ``stamp`` (:func:`~unistore.storage.layout.file_stamp` of a local file when
    its store was opened): a handle opened later must open that same file.
    """

    def __init__(self, location: Location, name: str, stamp: int = 0, cache: DiskCache | None = None):
        super().__init__(location, name, cache)
        self.stamp = stamp

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.location, self.name, self.stamp, self.cache)

    def __setstate__(self, state: tuple[Any, ...]) -> None:  # type: ignore[override]
        self.__init__(*state)  # type: ignore[misc]

    def _open(self) -> tuple[Any, Any]:
        handle = _open_h5(self.location, self.cache)
        if self.stamp and _h5_stamp(handle[0]) != self.stamp:  # the file h5py holds, not the path
            from unistore.errors import StoreChangedError

            _close_h5(*handle)
            raise StoreChangedError(f"{self.location.url} was replaced after its store was opened (rewritten with "
                                    "overwrite=True?); open the store again to read the new version")
        _OPEN_READERS.add(self)
        return handle

    def fetched(self) -> tuple[int, int] | None:
        """Reads made through the remote file object (None for local files: h5py reads them itself)."""
        handle = self.current()
        if handle is None or handle[1] is None:
            return None
        return (handle[1].requests, handle[1].nbytes)

    def identity(self) -> str | None:
        """The file's identity (ETag and size remotely; inode, size and mtime locally) and the dataset name."""
        if self.cache is None:
            return None
        if self.location.is_local:
            st = os.stat(self.location.path)
            return f"hdf5|{self.location.path}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{self.name}"
        return f"hdf5|{self.location.identity()[0]}|{self.name}"

    def close(self) -> None:
        handle = self.current()
        if handle is not None:
            _close_h5(*handle)
        self._handle = None

    def read(self, start: int, stop: int) -> np.ndarray:
        with _LOCK:
            f, fileobj = self.handle()
            ds = f[self.name]
            if fileobj is not None:
                fileobj.error = None
            try:
                return np.asarray(ds[start:stop])
            except (OSError, RuntimeError, ValueError) as e:
                if fileobj is not None and fileobj.error is not None:
                    # the storage failed (retried already), not the file: libhdf5 may hold half-read state of
                    # it, so the handle is closed now, while closing is safe; the next read opens it afresh
                    error = _storage_error(fileobj)
                    self.close()
                    raise error from None
                raise CorruptDataError(f"{self.location.url}: cannot decode rows {start}:{stop} of "
                                       f"{self.name!r} ({type(e).__name__}: {e}); the file is corrupt") from e


class Hdf5Format(Format):
    name = "hdf5"
    compressions = ("gzip", "lzf")
    extensions = (".h5", ".hdf5", ".hdf")
    magic = (b"\x89HDF\r\n\x1a\n",)
    store_suffix = ".h5"
    library = "h5py"
    install_hint = "pip install 'unistore[hdf5]'"

    def open(self, location: Location, cache: DiskCache | None = None, **options: Any) -> OpenedStore:
        if options:
            raise TypeError(f"hdf5 stores take no options {sorted(options)}")
        opened = OpenedStore(self.name, {})
        size = object_size(location)  # remotely the HEAD that also gives the identity the probe and reads use
        from unistore.storage.formats._hdf5_probe import probe

        verdict = probe(location, cache)  # a crafted file must not hang this process inside libhdf5
        if verdict is not None and verdict[0] == "remote":
            raise RemoteError(f"reading {location.url} failed ({verdict[1]})")
        if verdict is not None and verdict[0] != "error":
            raise CorruptDataError(f"{location.url} is a corrupt HDF5 file: {verdict[1]}; re-create or "
                                   "re-download it")
        try:
            return self._open(location, opened, size, cache)
        except (UnistoreError, FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError,
                OverflowError, SystemError) as e:
            raise CorruptDataError(f"{location.url} is a corrupt HDF5 file: h5py cannot list it "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); re-create "
                                   "or re-download it") from e

    def _open(self, location: Location, opened: OpenedStore, size: int, cache: DiskCache | None) -> OpenedStore:
        import h5py

        with _LOCK:
            f, fileobj = _open_h5(location, cache)
            stamp = _h5_stamp(f) if location.is_local else 0
            try:
                meta = loads_meta(_plain(f.attrs.get(META_KEY)))
                opened.attrs.update({k: _plain(v) for k, v in f.attrs.items() if k != META_KEY})
                datasets: list[tuple[str, Any]] = []
                f.visititems(lambda name, obj: datasets.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
                for name, ds in datasets:
                    info = self._describe(location, name, ds, size, stamp, cache)
                    if info is not None:
                        opened.arrays[name] = info
            finally:
                _close_h5(f, fileobj)
        return apply_meta(opened, meta)

    def _describe(self, location: Location, name: str, ds: Any, size: int, stamp: int,
                  cache: DiskCache | None) -> ArrayInfo | RaggedInfo | None:
        import h5py

        attrs = {k: _plain(v) for k, v in ds.attrs.items()}
        if ds.external:
            raise UnsupportedError(f"{location.url}: dataset {name!r} keeps its data in external file "
                                   f"{ds.external[0][0]!r}; unistore reads only data stored inside the file "
                                   "(copy it in: h5py's ds[...] into a new dataset)")
        if ds.is_virtual:
            raise UnsupportedError(f"{location.url}: dataset {name!r} is a virtual dataset that reads other files; "
                                   "unistore reads only data stored inside the file (copy it into a real dataset)")
        base = h5py.check_vlen_dtype(ds.dtype)
        if base is not None:
            if np.dtype(base).kind not in "biuf":
                return None  # variable-length strings are not arrays
            from unistore.storage.store import as_ragged

            values, offsets = as_ragged(list(ds[...]), dtype=base)
            return RaggedInfo(
                name,
                ArrayInfo(f"{name}/values", values.shape, values.dtype, InMemoryLayout(values)),
                ArrayInfo(f"{name}/offsets", offsets.shape, offsets.dtype, InMemoryLayout(offsets)),
                attrs,
            )
        dtype = ds.dtype
        if dtype.kind not in "biufc" or dtype.fields:
            return None  # strings and compound types are not tensors
        shape = tuple(int(s) for s in ds.shape)
        compression = ds.compression
        offset = ds.id.get_offset() if ds.chunks is None and not shape == () else None
        nbytes = math.prod(shape) * dtype.itemsize
        if offset is not None and not _stored_as_is(ds, dtype, nbytes):
            # the file's type is not numpy's (another bit layout, byte order or size) or its storage is not all
            # there: libhdf5 converts or fills what it reads, so h5py reads it, not a map of the raw bytes
            converted = ChunkedLayout(Hdf5BlockReader(location, name, stamp, cache), shape, dtype,
                                      max(1, (1 << 20) // max(1, nbytes // max(1, shape[0]))),
                                      token=f"hdf5:{uuid.uuid4().hex}:{name}")
            return ArrayInfo(name, shape, dtype, converted, chunks=None, compression=compression, attrs=attrs,
                             stored_nbytes=int(ds.id.get_storage_size()))
        if ds.chunks is None and offset is not None:
            if offset + nbytes > size:
                raise TruncatedDataError(f"{location.url} is truncated: dataset {name!r} ends at byte "
                                         f"{offset + nbytes} of {size}; re-create or re-download it")
            layout: Any = ContiguousLayout(location, int(offset), shape, dtype, stamp, cache=cache)
            stored = nbytes
        elif ds.chunks is not None:
            layout = ChunkedLayout(Hdf5BlockReader(location, name, stamp, cache), shape, dtype,
                                   int(ds.chunks[0]),
                                   token=f"hdf5:{uuid.uuid4().hex}:{name}")
            stored = int(ds.id.get_storage_size())
        else:  # scalar or never-written dataset: tiny, read now
            data = np.asarray(ds[...])
            layout, stored = InMemoryLayout(data), data.nbytes
        return ArrayInfo(name, shape, dtype, layout, chunks=tuple(ds.chunks) if ds.chunks else None,
                         compression=compression, attrs=attrs, stored_nbytes=stored)

    def writer(self, path: str, **options: Any) -> FormatWriter:
        return _Hdf5Writer(path, self)


class _Hdf5Writer(FormatWriter):
    def __init__(self, path: str, fmt: Format):
        import h5py

        super().__init__(path, fmt)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = h5py.File(path, "w")

    def write_array(self, key: str, data: np.ndarray, chunks: tuple[int, ...] | None,
                    compression: str | None, attrs: dict[str, Any]) -> None:
        self.check_compression(compression)
        kwargs: dict[str, Any] = {}
        if compression:
            kwargs["compression"] = compression
        if chunks or compression:
            kwargs["chunks"] = chunks if chunks else True
        if data.size == 0 and (chunks or compression):
            kwargs["chunks"] = None if not compression else kwargs["chunks"]
        ds = self.file.create_dataset(key, data=data, **kwargs)
        for k, v in attrs.items():
            ds.attrs[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)

    def write_ragged(self, key: str, values: np.ndarray, offsets: np.ndarray, attrs: dict[str, Any]) -> None:
        import h5py

        rows = np.empty(len(offsets) - 1, dtype=object)
        for i in range(len(rows)):
            rows[i] = values[offsets[i]:offsets[i + 1]]
        ds = self.file.create_dataset(key, shape=rows.shape, dtype=h5py.vlen_dtype(values.dtype))
        if len(rows):
            ds[...] = rows
        for k, v in attrs.items():
            ds.attrs[k] = v

    def finish(self, attrs: dict[str, Any], checksums: dict[str, str]) -> list[str]:
        self.file.attrs[META_KEY] = self.meta_json(attrs, checksums)
        for k, v in attrs.items():
            if isinstance(v, (int, float, str, bool)):
                self.file.attrs[k] = v
        self.file.close()
        return []
