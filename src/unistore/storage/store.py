"""Layer 4: :class:`TensorStore`, ``open_store`` and ``create_store``.

Writes are staged in a temporary local path and published atomically on
``commit()``: by ``os.replace`` on local disk, and on object stores by
uploading the data first and the root metadata last, so a reader sees either
no store or a complete one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from unistore.errors import (
    ArrayNotFoundError,
    ChecksumMismatchError,
    CorruptDataError,
    ReadOnlyError,
    ShapeMismatchError,
    StoreExistsError,
    StoreNotFoundError,
    UnistoreError,
)
from unistore.storage.array import Array, RaggedArray
from unistore.storage.checksums import checksum_of
from unistore.storage.formats import detect_format, get_format
from unistore.storage.formats.base import PENDING_NAME, ArrayInfo, FormatWriter, OpenedStore, RaggedInfo, bfloat16
from unistore.storage.layout import IOStats, path_identity
from unistore.storage.leftovers import sweep
from unistore.storage.location import Location, retry_remote, validate_key

if TYPE_CHECKING:
    from unistore.storage.cache import DiskCache

__all__ = ["TensorStore", "open_store", "create_store", "as_ragged", "checksum_of"]

log = logging.getLogger("unistore")
_ALLOWED_KINDS = "biufc"


def _check_dtype(key: str, data: np.ndarray) -> None:
    if data.dtype.kind not in _ALLOWED_KINDS and not (bfloat16 is not None and data.dtype == bfloat16):
        raise ShapeMismatchError(
            f"array {key!r} has dtype {data.dtype}; unistore stores numeric and bool arrays only "
            "(object and string arrays would need pickle)"
        )


def as_ragged(rows: Sequence[Sequence[Any]] | RaggedArray, dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``(values, offsets)`` of a list of lists (row i = values[offsets[i]:offsets[i+1]])."""
    if isinstance(rows, RaggedArray):
        return rows.values.read(), rows.offsets
    arrays = [np.asarray(r, dtype=dtype) for r in rows]
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if arrays:
        values = np.concatenate([a.reshape(-1) for a in arrays])
    else:
        values = np.empty(0, dtype=dtype or np.int64)
    if values.dtype.kind == "f" and dtype is None and all(a.dtype.kind in "iu" for a in arrays if a.size):
        values = values.astype(np.int64)
    return values, offsets


def _is_ragged_input(data: Any) -> bool:
    if isinstance(data, RaggedArray):
        return True
    if isinstance(data, (list, tuple)) and data and all(isinstance(r, (list, tuple, np.ndarray)) for r in data):
        lengths = {len(r) for r in data}
        return len(lengths) > 1
    return False


class TensorStore:
    """A named collection of arrays plus attrs, in any supported format.

    Open one with :func:`open_store` (reading) or :func:`create_store`
    (writing).  Stores are picklable: a copy in another process reopens its
    files lazily, so DataLoader workers can share one.

    >>> with unistore.open_store("data/run1.zarr") as store:
    ...     rows = store["embeddings"].take([3, 1, 3])
    """

    def __init__(self, location: Location, format: str, mode: str, opened: OpenedStore | None = None,
                 writer: FormatWriter | None = None, staging_dir: str | None = None, overwrite: bool = False):
        self.location = location
        self.format = format
        self.mode = mode
        self._opened = opened or OpenedStore(format, {})
        self._writer = writer
        self._staging_dir = staging_dir  # everything staged lives below it; removed after commit or abort
        self._overwrite = overwrite
        self._stats = IOStats()
        self._closed = False
        self._written: dict[str, ArrayInfo | RaggedInfo] = {}
        self._attrs: dict[str, Any] = dict(self._opened.attrs)

    # ------------------------------------------------------------- reading
    def keys(self) -> list[str]:
        """Sorted array keys (``a/b`` for nested groups)."""
        return sorted(self._opened.arrays)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._opened.arrays)

    def __contains__(self, key: object) -> bool:
        return key in self._opened.arrays

    def __getitem__(self, key: str) -> Array | RaggedArray:
        """The lazy array stored under ``key``.

        Raises:
            ArrayNotFoundError: no such array (the message lists a few that exist).
        """
        info = self._opened.arrays.get(key)
        if info is None:
            if self.mode == "r":
                validate_key(key)
            some = ", ".join(self.keys()[:8]) or "none"
            raise ArrayNotFoundError(f"no array {key!r} in {self.location.url}; arrays here: {some}")
        if isinstance(info, RaggedInfo):
            return RaggedArray(info, self.format, self._stats)
        return Array(info, self.format, self._stats)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def read_arrays(self, keys: Sequence[str] | None = None, as_tensor: bool = False) -> dict[str, Any]:
        """Several whole arrays (all, or ``keys``) in as few reads as their layout allows.

        Remotely, uncompressed arrays lying next to each other in one file (the
        tensors of a safetensors checkpoint, the entries of a ``.pt`` archive)
        are fetched as merged range requests: a checkpoint of hundreds of small
        tensors costs about one request, not hundreds.  Locally every array is
        read from its file as by :meth:`Array.read`.  Ragged arrays come back
        as lists of rows.

        Raises:
            ArrayNotFoundError: a key names no array.
        """
        from unistore.storage.array import to_tensor
        from unistore.storage.engine import read_contiguous
        from unistore.storage.layout import ContiguousLayout

        arrays = {key: self[key] for key in (keys if keys is not None else self.keys())}
        remote = {key: a.layout for key, a in arrays.items()
                  if isinstance(a, Array) and isinstance(a.layout, ContiguousLayout) and not a.layout.location.is_local}
        out: dict[str, Any] = dict(read_contiguous(remote, self._stats)) if remote else {}
        for key, arr in arrays.items():
            if key not in out:
                out[key] = arr.read()
        if as_tensor:
            out = {k: [to_tensor(r) for r in v] if isinstance(v, list) else to_tensor(v) for k, v in out.items()}
        return {key: out[key] for key in arrays}

    def to_dask(self, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """``{key: dask.array}`` for the dense arrays of this store (all, or ``keys``); see :meth:`Array.to_dask`.

        Ragged arrays have no dask form and are left out unless asked for by key.

        Raises:
            UnsupportedError: a ragged array was asked for by key.
        """
        from unistore.errors import UnsupportedError

        out = {}
        for key in keys if keys is not None else self.keys():
            arr = self[key]
            if isinstance(arr, RaggedArray):
                if keys is not None:
                    raise UnsupportedError(f"{key!r} is ragged (lists of different lengths); dask arrays are dense")
                continue
            out[key] = arr.to_dask()
        return out

    @property
    def attrs(self) -> dict[str, Any]:
        """Store-level attributes (JSON-serialisable; writable before commit)."""
        return self._attrs

    @property
    def checksums(self) -> dict[str, str]:
        """Checksums recorded when the store was written (empty for foreign stores)."""
        return dict(self._opened.checksums)

    def io_stats(self) -> dict[str, int]:
        """Reads issued by this store in this process: requests, bytes, cache hits."""
        return self._stats.as_dict()

    def reset_io_stats(self) -> None:
        self._stats.reset()

    def verify(self, block_rows: int | None = None, scheduler: Any = None, progress: bool = False) -> dict[str, str]:
        """Recompute each recorded checksum; returns ``{key: "ok" | "no checksum"}``.

        ``scheduler`` runs the arrays' checksums in parallel on Dask, one task
        per array, each worker reading its array itself: ``"local"`` (a local
        cluster of worker processes), ``"tcp://host:port"`` or a
        ``dask.distributed.Client``; ``progress`` shows Dask's progress bar.

        Raises:
            ChecksumMismatchError: naming the first array (in key order) whose bytes changed.
        """
        from unistore.storage.dask_jobs import checksum_task, dask_client

        expected = {key: self._opened.checksums.get(key) for key in self.keys()}
        todo = [key for key, value in expected.items() if value is not None]
        if scheduler is None:
            got = {}
            for key in todo:
                try:
                    got[key] = checksum_task(self, key, block_rows)
                except ChecksumMismatchError:
                    raise
                except CorruptDataError as e:  # a chunk's own checksum (zarr's crc32c) failed while reading
                    raise ChecksumMismatchError(f"array {key!r} in {self.location.url} is corrupt: {e}; restore it "
                                                "from a copy") from e
        else:
            with dask_client(scheduler) as client:
                futures = [client.submit(checksum_task, self, key, block_rows, pure=False)
                           for key in todo]
                if progress:
                    from dask.distributed import progress as show_progress

                    show_progress(futures)
                got = dict(zip(todo, client.gather(futures)))
        report = {}
        for key, want in expected.items():
            if want is None:
                report[key] = "no checksum"
            elif got[key] != want:
                raise ChecksumMismatchError(
                    f"array {key!r} in {self.location.url} does not match its stored checksum "
                    f"({want[:20]}... vs {got[key][:20]}...); the data is corrupt - restore it from a copy"
                )
            else:
                report[key] = "ok"
        return report

    def __repr__(self) -> str:
        return f"<unistore.TensorStore {self.location!r} format={self.format} mode={self.mode} arrays={len(self)}>"

    def __getstate__(self) -> dict[str, Any]:
        if self.mode != "r":
            raise UnistoreError("a store open for writing cannot be pickled; commit it and open it for reading")
        return {"location": self.location, "format": self.format, "opened": self._opened, "attrs": self._attrs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["location"], state["format"], "r", state["opened"])  # type: ignore[misc]
        self._attrs = state["attrs"]

    def __enter__(self) -> TensorStore:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and self.mode != "r":
            self.abort()
        else:
            self.close()

    # ------------------------------------------------------------- writing
    def _require_writable(self) -> FormatWriter:
        if self.mode == "r" or self._writer is None:
            raise ReadOnlyError(f"{self.location.url} is open read-only; use unistore.create_store to write")
        if self._closed:
            raise ReadOnlyError(f"{self.location.url} was already committed; open it again to read")
        return self._writer

    def write_array(self, key: str, data: Any, chunks: Sequence[int] | None = None,
                    compression: str | None = None, attrs: Mapping[str, Any] | None = None) -> None:
        """Stage ``data`` under ``key``; nothing is visible until :meth:`commit`.

        ``data`` may be an ndarray, a torch tensor, anything ``np.asarray``
        accepts, or a list of lists of different lengths (stored ragged).

        Raises:
            ReadOnlyError: the store was opened for reading.
            InvalidKeyError: unsafe key.
            ShapeMismatchError: object/string data.
            UnsupportedError: compression the format cannot do.
        """
        writer = self._require_writable()
        validate_key(key)
        if key in self._written:
            raise StoreExistsError(f"array {key!r} was already written to this store")
        attrs = dict(attrs or {})
        if _is_ragged_input(data):
            values, offsets = as_ragged(data)
            _check_dtype(key, values)
            writer.write_ragged(key, values, offsets, attrs)
            self._opened.checksums[key] = checksum_of([values, offsets])
            self._written[key] = RaggedInfo(key, _stub(f"{key}/values", values), _stub(f"{key}/offsets", offsets))
            return
        arr = _to_numpy(data)
        _check_dtype(key, arr)
        writer.write_array(key, arr, tuple(int(c) for c in chunks) if chunks else None, compression, attrs)
        self._opened.checksums[key] = checksum_of([arr])
        self._written[key] = _stub(key, arr)

    def create_array(self, key: str, shape: Sequence[int], dtype: Any, chunks: Sequence[int] | None = None,
                     compression: str | None = None, attrs: Mapping[str, Any] | None = None) -> tuple[str, int] | None:
        """Create an empty dense array for other processes to fill in blocks; ``(local path, rows per block)``.

        Only formats that store an array as independently writable pieces
        (zarr: chunks, or shards) can; the rest return None and the array is
        written with :meth:`write_array`.  Once every block is written, call
        :meth:`record_checksum` with the checksum of the whole array.

        Raises:
            ReadOnlyError / InvalidKeyError / StoreExistsError / UnsupportedError: as :meth:`write_array`.
        """
        writer = self._require_writable()
        validate_key(key)
        if key in self._written:
            raise StoreExistsError(f"array {key!r} was already written to this store")
        shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        _check_dtype(key, np.empty(0, dtype))
        target = writer.create_array(key, shape, dtype, tuple(int(c) for c in chunks) if chunks else None,
                                     compression, dict(attrs or {}))
        if target is not None:
            self._written[key] = ArrayInfo(key, shape, dtype, _stub(key, np.empty((0,) + shape[1:], dtype)).layout)
        return target

    @property
    def staging_path(self) -> str | None:
        """Where a store open for writing is staged on this machine (None when read-only or committed)."""
        if self.mode == "r" or self._writer is None or self._closed:
            return None
        return self._writer.path

    def record_checksum(self, key: str, checksum: str) -> None:
        """The checksum (``sha256:<hex>`` of the C-ordered bytes) of an array made by :meth:`create_array`."""
        if key not in self._written:
            raise ArrayNotFoundError(f"no array {key!r} was created in this store")
        self._opened.checksums[key] = checksum

    def commit(self) -> None:
        """Publish every staged array atomically (idempotent)."""
        if self.mode == "r" or self._closed:
            return
        writer = self._require_writable()
        last = writer.finish(self._attrs, self._opened.checksums)
        _publish(writer.path, self.location, last, self._overwrite)
        self._closed = True
        self._cleanup()

    def abort(self) -> None:
        """Discard everything staged; the destination is left as it was."""
        if self.mode != "r" and not self._closed:
            self._closed = True
            self._cleanup()

    def _cleanup(self) -> None:
        if self._staging_dir and os.path.exists(self._staging_dir):
            shutil.rmtree(self._staging_dir, ignore_errors=True)

    def close(self) -> None:
        """Commit a store open for writing; release nothing else (handles are per process)."""
        if self.mode != "r":
            self.commit()
        self._closed = True

    def __del__(self) -> None:
        if getattr(self, "mode", "r") != "r" and not getattr(self, "_closed", True):
            if self._written:
                warnings.warn(f"store {self.location.url} was never committed; its {len(self._written)} staged "
                              "arrays are discarded (call commit() or use it as a context manager)",
                              ResourceWarning, stacklevel=2)
            self.abort()


def _stub(key: str, arr: np.ndarray) -> ArrayInfo:
    from unistore.storage.layout import InMemoryLayout

    return ArrayInfo(key, tuple(arr.shape), arr.dtype, InMemoryLayout(np.empty((0,) + arr.shape[1:], arr.dtype)))


def _to_numpy(data: Any) -> np.ndarray:
    if type(data).__module__.startswith("torch"):
        import torch

        t = data.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16 and bfloat16 is not None:
            return t.view(torch.int16).numpy().view(bfloat16)
        return np.asarray(t.numpy())
    if isinstance(data, (Array, RaggedArray)):
        return data.read() if isinstance(data, Array) else np.asarray(data.read())
    return np.asarray(data)


# ------------------------------------------------------------------- open
def open_store(url: str | os.PathLike[str] | Location, mode: str = "r", format: str = "auto",
               storage_options: Mapping[str, Any] | None = None, cache: Any = None, deadline: float | None = None,
               transport: str | None = None, **format_options: Any) -> TensorStore:
    """Open the store at ``url`` for reading.  Reads metadata only.

    ``format="auto"`` sniffs magic bytes, then names.  ``format_options`` go to
    the format, e.g. ``raw={"base_embeddings": ((-1, 384), "float32")}`` for
    headerless memmap dumps in an ``npy`` directory.

    ``cache`` keeps what reads fetch or decode on local disk (see
    :mod:`unistore.storage.cache`): a directory, a
    :class:`~unistore.storage.cache.DiskCache`, ``False`` for none, or None
    for ``$UNISTORE_CACHE_DIR`` when it is set.  Uncompressed remote arrays
    are cached as byte blocks; chunked (compressed) arrays, remote or local,
    as decoded chunks that every process maps; local uncompressed arrays are
    read in place.

    ``deadline``: seconds any one remote read of this store may take, retries
    included, before it raises :class:`~unistore.errors.RemoteError` (default
    ``$UNISTORE_RETRY_DEADLINE``, else 60).

    ``transport``: how object bytes travel - ``"auto"`` (obstore where it is
    installed and takes the storage options, else fsspec), ``"obstore"`` or
    ``"fsspec"``; default ``$UNISTORE_TRANSPORT``, else ``"auto"`` (see
    :mod:`unistore.storage.transport`).  Metadata always goes through fsspec.

    Raises:
        StoreNotFoundError: nothing at ``url``.
        UnknownFormatError: the format could not be detected.
        FormatError / TruncatedDataError / UnsafePickleError: bad files.
        IncompleteStoreError: a writer has not committed the store yet.
    """
    if mode != "r":
        raise ValueError(f"open_store supports mode='r' only, got {mode!r}; use create_store to write")
    location = url if isinstance(url, Location) else Location(url, storage_options)
    if deadline is not None:
        location.deadline = float(deadline)
    if transport is not None:
        from unistore.storage.transport import TRANSPORTS

        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        location.transport_choice = transport
        location._transport = None
    if not location.is_local:
        # fsspec caches listings per filesystem instance; a store published since
        # must not be judged by a stale listing
        location.fs.invalidate_cache(location.path)
    disk_cache = _as_cache(cache)
    if format != "auto" and not location.exists():
        raise StoreNotFoundError(f"no store at {location.url}: the path does not exist")
    fmt, opened = _open_consistent(format, location, {**format_options, "cache": disk_cache})
    return TensorStore(location, fmt.name, "r", opened)


def _open_consistent(format: str, location: Location, options: Mapping[str, Any]) -> tuple[Any, OpenedStore]:
    """The format (detected when ``"auto"``) and ``open`` of one version of a store: locally, a store
    republished while it was being detected or listed (its root replaced, the old one being deleted) is
    detected and listed again, so its format, files and metadata all come from one version."""

    def attempt() -> tuple[Any, OpenedStore]:
        if format == "auto":
            fmt = get_format(detect_format(location))
            return fmt, fmt.open(location, **options)
        return get_format(format), _open_as(format, location, options)

    if not location.is_local:
        return attempt()
    for _ in range(5):
        before = path_identity(location.path)
        try:
            fmt, opened = attempt()
        except (FileNotFoundError, UnistoreError):
            if path_identity(location.path) == before:
                raise
            continue  # republished mid-listing: list the new version
        if path_identity(location.path) == before:
            return fmt, opened
    from unistore.errors import StoreChangedError

    raise StoreChangedError(f"{location.url} was rewritten 5 times while it was being opened; open it again once "
                            "its writer has finished")


def _open_as(format: str, location: Location, options: Mapping[str, Any]) -> OpenedStore:
    """``open`` of the format asked for; when it fails or finds no array, and the path looks like another format,
    a :class:`~unistore.errors.FormatError` says which (instead of the asked format's library's complaint)."""
    from unistore.errors import (
        FormatError,
        IncompleteStoreError,
        MissingDependencyError,
        RemoteError,
        StoreChangedError,
        StoreNotFoundError,
    )

    def looks_like() -> str | None:
        try:
            found = detect_format(location)
        except Exception:  # noqa: BLE001 - only a hint: a path no format claims says nothing
            return None
        return found if found != format else None

    try:
        opened = get_format(format).open(location, **options)
    except (FileNotFoundError, PermissionError, IncompleteStoreError, StoreChangedError, RemoteError,
            StoreNotFoundError, MissingDependencyError):
        raise
    except Exception as e:
        found = looks_like()
        if found is not None:
            raise FormatError(f"{location.url} is not a {format} store: it looks like {found}; open it with "
                              f"format={found!r} (or format='auto' to detect it)") from e
        if isinstance(e, UnistoreError):
            raise
        raise FormatError(f"{location.url} cannot be read as {format} ({type(e).__name__}: {e}); check the path, "
                          "or open it with format='auto' to detect its format") from e
    if not opened.arrays:
        found = looks_like()
        if found is not None:
            raise FormatError(f"{location.url} holds no {format} arrays: it looks like a {found} store; open it "
                              f"with format={found!r} (or format='auto' to detect it)")
    return opened


def _as_cache(cache: Any) -> DiskCache | None:
    from unistore.storage.cache import DiskCache, default_cache

    if cache is None:
        return default_cache()
    if cache is False:
        return None
    if isinstance(cache, DiskCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return DiskCache(cache)
    raise TypeError(f"cache must be a directory, a DiskCache, False or None, got {type(cache).__name__}")


def create_store(url: str | os.PathLike[str] | Location, format: str, storage_options: Mapping[str, Any] | None = None,
                 overwrite: bool = False, **writer_options: Any) -> TensorStore:
    """A new, empty store at ``url`` for writing; published on ``commit()``/``close()``.

    Raises:
        StoreExistsError: ``url`` exists and ``overwrite`` is false.
        UnknownFormatError / MissingDependencyError: bad or uninstalled format.
    """
    location = url if isinstance(url, Location) else Location(url, storage_options)
    fmt = get_format(format)
    if not overwrite and location.exists():
        raise StoreExistsError(f"{location.url} already exists; pass overwrite=True to replace it")
    token = uuid.uuid4().hex[:12]
    if location.is_local:
        parent = os.path.dirname(location.path) or "."
        os.makedirs(parent, exist_ok=True)
        sweep(parent)  # staging entries of writers that were killed
        staging_dir = os.path.join(parent, f".{location.name}.unistore-tmp-{os.getpid()}-{token}")
    else:
        sweep(tempfile.gettempdir())
        staging_dir = tempfile.mkdtemp(prefix=f"unistore-{os.getpid()}-")
    os.makedirs(staging_dir, exist_ok=True)
    writer = fmt.writer(os.path.join(staging_dir, location.name or "store"), **writer_options)
    return TensorStore(location, fmt.name, "w", None, writer, staging_dir, overwrite)


def _publish(staging: str, location: Location, last: list[str], overwrite: bool) -> None:
    if location.is_local:
        _publish_local(staging, location.path, overwrite)
    else:
        _publish_remote(staging, location, last, os.path.isfile(staging), overwrite)


def _fsync_tree(path: str) -> None:
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _publish_local(staging: str, dest: str, overwrite: bool) -> None:
    _fsync_tree(staging)
    if os.path.lexists(dest):
        if not overwrite:
            raise StoreExistsError(f"{dest} appeared while writing; pass overwrite=True to replace it")
        if os.path.isdir(dest) and not os.path.islink(dest):
            if _exchange(staging, dest):  # one step: readers see the old store or the new one, never none
                shutil.rmtree(staging, ignore_errors=True)
                return
            trash = f"{dest}.unistore-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(dest, trash)
            os.replace(staging, dest)
            shutil.rmtree(trash, ignore_errors=True)
            return
    os.replace(staging, dest)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False  # EINVAL/ENOSYS: this file system or kernel cannot exchange; the caller renames twice


def _publish_remote(staging: str, location: Location, last: list[str], single_file: bool, overwrite: bool) -> None:
    fs = location.fs
    dest = location.path
    if overwrite and location.exists():
        retry_remote(lambda: fs.rm(dest, recursive=True), location)
    if single_file:
        retry_remote(lambda: fs.put_file(staging, dest), location)
        return
    marker = f"{dest}/{PENDING_NAME}"
    retry_remote(lambda: fs.pipe_file(marker, b"writing"), location)
    files = sorted(os.path.relpath(os.path.join(d, f), staging) for d, _, fs_ in os.walk(staging) for f in fs_)
    first = [f for f in files if f.replace(os.sep, "/") not in last]
    final = [f for f in files if f.replace(os.sep, "/") in last]

    def upload(group: list[str]) -> None:
        if group:
            fs.put([os.path.join(staging, f) for f in group], [f"{dest}/{f.replace(os.sep, '/')}" for f in group])

    retry_remote(lambda: upload(first), location)
    retry_remote(lambda: upload(final), location)
    retry_remote(lambda: fs.rm_file(marker), location)
    fs.invalidate_cache(dest)
