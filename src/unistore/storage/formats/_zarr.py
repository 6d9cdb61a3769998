"""``zarr``: v3 groups and arrays (compressed or not, sharded or not); v2 readable.

Chunks are decoded by zarr-python itself, a run of consecutive chunks per
call and several runs concurrently; the engine keeps decoded chunks in its
byte-bounded LRU.  Written with zarr-python as zarr v3.
"""

from __future__ import annotations

import os
import stat
import threading
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from unistore.errors import CorruptDataError, InvalidKeyError, StoreNotFoundError, UnistoreError, UnsupportedError
from unistore.storage.formats.base import (
    META_KEY,
    PENDING_NAME,
    ArrayInfo,
    Format,
    FormatWriter,
    OpenedStore,
    apply_meta,
    checked_nbytes,
    incomplete_error,
)
from unistore.storage.layout import ChunkedLayout, LazyBlockReader, path_identity
from unistore.storage.location import Location, one_retry_budget, precondition_failed, retry_remote

if TYPE_CHECKING:
    from unistore.storage.cache import DiskCache

#: Default chunk size (bytes) for arrays written without explicit chunks.
DEFAULT_CHUNK_BYTES = 1 << 20


def _zarr_store(location: Location) -> Any:
    from zarr.storage import FsspecStore, LocalStore

    if location.is_local:
        return LocalStore(location.path, read_only=True)
    store = FsspecStore.from_url(f"{location.protocol}://{location.path}", storage_options=location.storage_options,
                                 read_only=True)
    one_retry_budget(store.fs)
    return store


def _counting_store(location: Location, strict: bool = False, root_id: tuple[int, ...] | None = None,
                    opened_at: Any = None) -> Any:
    """The zarr store for ``location`` wrapped so every object read from storage is counted and checked.

    Locally, a chunk file must be a regular file inside the store (a link out
    of the store, a FIFO or a directory in a chunk's place is an error, never
    followed or read). ``strict`` (arrays unistore wrote, which store every
    chunk): a missing chunk is :class:`~unistore.errors.CorruptDataError`, not
    fill values. A ranged read that comes back short is an error either way.
    ``root_id``: (device, inode) of a local store's root when it was opened;
    a root replaced since (the store republished) is an error, not new bytes.

    On S3 every object is read with one ``GetObject`` of its own, and, once
    the store was opened, with ``If-Unmodified-Since`` set to the server's
    time of that opening (``opened_at``; the store records it as ``opened_at``
    on its first read): an object rewritten since is
    :class:`~unistore.errors.StoreChangedError`, never new bytes under the old
    shape. HTTP dates count whole seconds, so a rewrite within the second the
    store was opened is not seen.
    """
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest
    from zarr.storage import WrapperStore

    remote = not location.is_local
    root = os.path.realpath(location.path) if not remote else ""
    root_id = root_id or (path_identity(location.path) if not remote else None)

    def same_root() -> None:
        if path_identity(location.path) != root_id:
            from unistore.errors import StoreChangedError

            raise StoreChangedError(f"{location.url} was replaced after it was opened (rewritten with "
                                    "overwrite=True?); open the store again to read the new version")

    s3 = remote and location.protocol in ("s3", "s3a")

    class CountingStore(WrapperStore[Any]):
        requests = 0
        nbytes = 0

        def __init__(self, store: Any):
            super().__init__(store)
            self.opened_at = opened_at

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            if not remote:
                same_root()
                _check_local_object(location, root, key)
            if byte_range is None and remote:
                # "bytes=0-": one GET, where a plain whole-object read makes s3fs ask the size first (a HEAD)
                byte_range = OffsetByteRequest(0)
            if s3:
                buf = await self._s3_get(key, prototype, byte_range)
            else:
                buf = await self._store.get(key, prototype, byte_range)
            if not remote:
                same_root()  # still the version opened: what was read is its bytes
            self.requests += 1
            self.nbytes += len(buf) if buf is not None else 0
            if buf is None and strict and _is_chunk_key(key):
                if s3 and not await self._root_unchanged():
                    raise _changed(location)
                raise CorruptDataError(f"{location.url}: chunk {key!r} is missing, but unistore wrote every chunk "
                                       "of this array; the store was damaged - restore it from a copy")
            if buf is not None and isinstance(byte_range, RangeByteRequest) and \
                    len(buf) != byte_range.end - byte_range.start:
                raise CorruptDataError(f"{location.url}: {key!r} holds fewer bytes than its shard index points "
                                       f"to ({len(buf)} of {byte_range.end - byte_range.start}); the store is "
                                       "corrupt")
            return buf

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
            return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

        def _object(self, key: str) -> tuple[str, str]:
            bucket, path, _ = self._store.fs.split_path(f"{self._store.path}/{key}")
            return bucket, path

        async def _s3_get(self, key: str, prototype: Any, byte_range: Any) -> Any:
            bucket, path = self._object(key)
            transport = location.transport
            if self.opened_at is not None and transport.name == "obstore":
                return await self._obstore_get(transport, f"{bucket}/{path}", prototype, byte_range)
            kwargs: dict[str, Any] = {"Bucket": bucket, "Key": path}
            if isinstance(byte_range, RangeByteRequest):
                if byte_range.end <= byte_range.start:
                    return prototype.buffer.from_bytes(b"")
                kwargs["Range"] = f"bytes={byte_range.start}-{byte_range.end - 1}"
            elif isinstance(byte_range, OffsetByteRequest):
                kwargs["Range"] = f"bytes={byte_range.offset}-"
            elif byte_range is not None:  # SuffixByteRequest
                kwargs["Range"] = f"bytes=-{byte_range.suffix}"
            if self.opened_at is not None:
                kwargs["IfUnmodifiedSince"] = self.opened_at
            try:
                resp = await self._store.fs._call_s3("get_object", **kwargs)
            except FileNotFoundError:
                return None
            except Exception as e:  # noqa: BLE001 - sorted by S3's error code below
                if precondition_failed(e):
                    raise _changed(location) from e
                if "InvalidRange" in f"{e} {e.__cause__}":  # a range past the object's end: short, judged by the caller
                    return prototype.buffer.from_bytes(b"")
                raise
            try:
                data = bytes(await resp["Body"].read())
            finally:
                resp["Body"].close()
            if self.opened_at is None:  # the first read opens the store: later reads are pinned to this moment
                from email.utils import parsedate_to_datetime

                date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
                self.opened_at = parsedate_to_datetime(date) if date else None
            return prototype.buffer.from_bytes(data)

        async def _obstore_get(self, transport: Any, path: str, prototype: Any, byte_range: Any) -> Any:
            """One object through obstore, pinned to the moment the store was opened."""
            from unistore.storage.transport import Pin

            start = end = suffix = None
            if isinstance(byte_range, RangeByteRequest):
                start, end = byte_range.start, byte_range.end
            elif isinstance(byte_range, OffsetByteRequest):
                start = byte_range.offset
            elif byte_range is not None:  # SuffixByteRequest
                suffix = byte_range.suffix
            data = await transport.get_async(path, start, end, suffix,
                                             pin=Pin(location.url, unmodified_since=self.opened_at))
            return None if data is None else prototype.buffer.from_bytes(data)

        async def _root_unchanged(self) -> bool:
            """Whether the root metadata is still the version opened (a republish deletes objects first)."""
            if self.opened_at is None:
                return True
            bucket, path = self._object("zarr.json")
            try:
                await self._store.fs._call_s3("head_object", Bucket=bucket, Key=path,
                                              IfUnmodifiedSince=self.opened_at)
            except FileNotFoundError:
                return False
            except Exception as e:  # noqa: BLE001
                if precondition_failed(e):
                    return False
                raise
            return True

    return CountingStore(_zarr_store(location))


def _changed(location: Location) -> UnistoreError:
    from unistore.errors import StoreChangedError

    return StoreChangedError(f"{location.url} was rewritten after it was opened (overwrite=True?); no bytes of "
                             "the new version are served under the old one - open the store again to read it")


def _is_chunk_key(key: str) -> bool:
    """Whether ``key`` names a chunk (or shard) in zarr v3's default encoding (``<array>/c/0/1``)."""
    parts = key.split("/")
    return "c" in parts[:-1] or parts[-1] == "c"


def _check_local_object(location: Location, root: str, key: str) -> None:
    """A local object of a zarr store must be a regular file below the store's root, if it exists at all."""
    path = os.path.join(location.path, *key.split("/"))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise CorruptDataError(f"{location.url}: {key!r} is {kind} where zarr expects an object; the store is "
                               "damaged - restore it from a copy")
    real = os.path.realpath(path)
    if not real.startswith(root + os.sep):
        raise InvalidKeyError(f"{location.url}: {key!r} links to {real}, outside the store; unistore does not "
                              "follow links out of a store (copy the file into the store instead)")


def _listing_digest(location: Location, name: str) -> str:
    """A digest of every object of array ``name`` (metadata and chunks) with its ETag or mtime and size: one
    listing remotely, a directory walk locally."""
    import hashlib

    root = location.path.rstrip("/") + (f"/{name}" if name else "")
    entries = []
    if location.is_local:
        for folder, _, files in os.walk(root):
            for f in files:
                st = os.stat(os.path.join(folder, f))
                entries.append(f"{os.path.relpath(os.path.join(folder, f), root)}|{st.st_ino}|{st.st_size}|"
                               f"{st.st_mtime_ns}")
    else:
        listing = retry_remote(lambda: location.fs.find(root, detail=True), location)
        for path, info in listing.items():
            tag = next((str(info[k]) for k in ("ETag", "etag", "VersionId", "LastModified", "mtime") if info.get(k)),
                       "")
            entries.append(f"{path[len(root):]}|{tag}|{int(info.get('size') or 0)}")
    return hashlib.sha1("\n".join(sorted(entries)).encode()).hexdigest()


def _open_node(location: Location, store: Any = None) -> Any:
    import zarr

    try:
        return zarr.open(store=store if store is not None else _zarr_store(location), mode="r")
    except FileNotFoundError as e:
        if location.fs.exists(f"{location.path.rstrip('/')}/{PENDING_NAME}"):
            raise incomplete_error(location) from e
        raise StoreNotFoundError(f"no zarr group or array at {location.url} ({e})") from e
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptDataError(f"{location.url} has unreadable zarr metadata ({e})") from e


def _codec_names(arr: Any) -> str | None:
    names = []
    for codec in list(getattr(arr, "compressors", ()) or ()):
        name = getattr(codec, "codec_id", None) or type(codec).__name__.replace("Codec", "").lower()
        if name == "crc32c":
            continue  # a checksum, not a compression
        if getattr(codec, "cname", None):
            name = f"blosc-{getattr(codec.cname, 'value', codec.cname)}"
        names.append(str(name))
    return ",".join(names) or None


class _StoredBytes:
    """Bytes the objects of one zarr array take on storage, from a listing made when first asked (opening a
    store must not list every chunk: 64 ranks opening one array would list it 64 times)."""

    def __init__(self, location: Location, name: str):
        self.location, self.name = location, name

    def __call__(self) -> int | None:
        prefix = self.location.path.rstrip("/") + (f"/{self.name}" if self.name else "")
        try:
            return int(retry_remote(lambda: self.location.fs.du(prefix), self.location))
        except Exception:  # noqa: BLE001 - a size for display only
            return None


# One listing per reader even when several read-ahead threads ask for its identity at once.  Held only while
# listing; a fresh lock in a forked child, in case the fork came while another thread held it.
_IDENTITY_LOCK = threading.Lock()


def _fresh_identity_lock() -> None:
    global _IDENTITY_LOCK
    _IDENTITY_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_identity_lock)


class ZarrBlockReader(LazyBlockReader):
    """Reads rows ``[start, stop)`` of one zarr array; the handle is (counting store, array).

    ``strict``: the array was written by unistore, which stores every chunk,
    so a missing chunk is an error rather than fill values.
    """

    concurrent = True

    def __init__(self, location: Location, name: str, strict: bool = False,
                 root_id: tuple[int, ...] | None = None, opened_at: Any = None, cache: DiskCache | None = None):
        super().__init__(location, name, cache)
        self.strict = strict
        self.root_id = root_id
        self.opened_at = opened_at

    def _open(self) -> tuple[Any, Any]:
        store = _counting_store(self.location, self.strict, self.root_id, self.opened_at)
        node = retry_remote(lambda: _open_node(self.location, store), self.location)
        return store, (node[self.name] if self.name else node)

    def fetched(self) -> tuple[int, int]:
        """Objects read from storage and the bytes they held, in this process (before decoding)."""
        handle = self.current()
        if handle is None:
            return (0, 0)
        return (handle[0].requests, handle[0].nbytes)

    _identity: str | None = None

    def identity(self) -> str | None:
        """The store's URL and array path with a digest of the array's objects, from one listing.

        Listed once per reader (a handle opened with :func:`open_store`), and
        carried when the reader is pickled: DataLoader workers started after
        it was listed do not list the array again.
        """
        if self.cache is None:
            return None
        if self._identity is None:
            with _IDENTITY_LOCK:
                if self._identity is None:
                    digest = _listing_digest(self.location, self.name)
                    self._identity = f"zarr|{self.location.url}|{self.name}|{digest}"
        return self._identity

    def __getstate__(self) -> tuple[Any, ...]:  # type: ignore[override]
        return (self.location, self.name, self._identity, self.strict, self.root_id, self.opened_at, self.cache)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.__init__(state[0], state[1], *state[3:7])  # type: ignore[misc]
        self._identity = state[2]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``; a 0-d array is read as its one element, row 0."""
        arr = self.handle()[1]

        def decode() -> np.ndarray:
            try:
                return np.asarray(arr[start:stop] if arr.ndim else np.asarray(arr[...]).reshape(1)[start:stop])
            except (UnistoreError, FileNotFoundError, PermissionError):
                raise
            except _DECODE_ERRORS as e:  # a codec's verdict on the bytes: final, not retried
                raise CorruptDataError(f"{self.location.url}: cannot decode rows {start}:{stop} of {self.name!r} "
                                       f"({type(e).__name__}: {e}); a chunk is corrupt") from e

        return retry_remote(decode, self.location)


def _decode_errors() -> tuple[type[BaseException], ...]:
    import gzip
    import zlib

    return (ValueError, RuntimeError, TypeError, zlib.error, gzip.BadGzipFile, EOFError, IndexError, KeyError,
            OverflowError, MemoryError)


_DECODE_ERRORS = _decode_errors()


class ZarrFormat(Format):
    name = "zarr"
    compressions = ("zstd", "gzip", "blosc", "lz4")
    extensions = (".zarr",)
    markers = ("zarr.json", ".zgroup", ".zarray")
    store_suffix = ".zarr"
    library = "zarr"
    install_hint = "pip install 'unistore[zarr]'"

    @classmethod
    def write_block(cls, array_path: str, start: int, block: np.ndarray) -> None:
        """Whole chunks (or shards) of the array the writer created."""
        import zarr

        zarr.open_array(array_path, mode="r+")[start:start + len(block)] = block

    def open(self, location: Location, cache: DiskCache | None = None, **options: Any) -> OpenedStore:
        import zarr

        if options:
            raise TypeError(f"zarr stores take no options {sorted(options)}")
        root_id = path_identity(location.path) if location.is_local else None
        store = _counting_store(location, root_id=root_id)
        node = retry_remote(lambda: _open_node(location, store), location)
        opened_at = getattr(store, "opened_at", None)  # S3: the server's time of opening, which reads are pinned to
        opened = OpenedStore(self.name, {})
        token = uuid.uuid4().hex
        if isinstance(node, zarr.Array):
            members = [(location.name.removesuffix(".zarr") or "data", node, "")]
            meta: dict[str, Any] = {}
        else:
            attrs = dict(node.attrs)
            raw_meta = attrs.pop(META_KEY, None)
            meta = raw_meta if isinstance(raw_meta, dict) else {}
            opened.attrs.update(attrs)
            try:
                members = [(p, m, p) for p, m in node.members(max_depth=None) if isinstance(m, zarr.Array)]
            except (ValueError, KeyError, TypeError) as e:
                raise CorruptDataError(f"{location.url} has unreadable zarr metadata below the root ({e})") from e
        strict = meta.get("zarr_chunks") == "all"
        for key, arr, path in members:
            if arr.dtype.kind not in "biufc":
                continue
            shape = tuple(int(s) for s in arr.shape)
            chunks = tuple(int(c) for c in arr.chunks) if shape else None
            checked_nbytes(list(shape), np.dtype(arr.dtype), f"{location.url}: array {key!r}")
            if chunks is not None and (len(chunks) != len(shape)
                                       or any(c < 1 and n > 0 for c, n in zip(chunks, shape))):
                raise CorruptDataError(f"{location.url}: array {key!r} has chunk shape {chunks} for shape {shape}; "
                                       "every chunk dimension of a non-empty axis must be at least 1 - the "
                                       "metadata is corrupt")
            stored = _StoredBytes(location, path)  # a listing of every chunk: only when asked
            reader = ZarrBlockReader(location, path, strict, root_id, opened_at, cache)
            layout = ChunkedLayout(reader, shape, np.dtype(arr.dtype), int(chunks[0]) if chunks else 1,
                                   token=f"zarr:{token}:{path}")
            opened.arrays[key] = ArrayInfo(key, shape, np.dtype(arr.dtype), layout, chunks=chunks,
                                           compression=_codec_names(arr), attrs=dict(arr.attrs),
                                           stored_nbytes=stored)
        return apply_meta(opened, meta)

    def writer(self, path: str, **options: Any) -> FormatWriter:
        return _ZarrWriter(path, self, **options)


def _compressors(name: str | None) -> list[Any]:
    """The bytes codecs of an array unistore writes: the compression asked for, then a ``crc32c`` checksum of
    each stored chunk, so a flipped bit is an error when the chunk is read, not wrong numbers."""
    from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

    if not name:
        return [Crc32cCodec()]
    base, _, level = name.partition(":")
    lvl = int(level) if level else None
    if base == "zstd":
        codec: Any = ZstdCodec(level=lvl or 3)
    elif base == "gzip":
        codec = GzipCodec(level=lvl or 5)
    elif base in ("blosc", "lz4"):
        codec = BloscCodec(cname="lz4" if base == "lz4" else "zstd", clevel=lvl or 5, shuffle="shuffle")
    else:
        raise UnsupportedError(f"unknown zarr compression {name!r}")
    return [codec, Crc32cCodec()]


class _ZarrWriter(FormatWriter):
    def __init__(self, path: str, fmt: Format, shards: int | None = None):
        import zarr

        super().__init__(path, fmt)
        self.group = zarr.open_group(path, mode="w", zarr_format=3)
        self.shards = shards

    def _create(self, key: str, shape: tuple[int, ...], dtype: np.dtype[Any], chunks: tuple[int, ...] | None,
                compression: str | None, attrs: dict[str, Any]) -> Any:
        self.check_compression(compression.partition(":")[0] if compression else None)
        if chunks is None and len(shape):
            row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
            chunks = (max(1, min(shape[0] or 1, DEFAULT_CHUNK_BYTES // row)),) + tuple(max(1, s) for s in shape[1:])
        shards = None
        if self.shards and chunks:
            # ``shards=N``: N chunks along the first axis per shard object
            shards = (chunks[0] * int(self.shards),) + tuple(chunks[1:])
        try:
            # every chunk is stored, fill-valued ones too: a missing chunk then means damage (see ZarrBlockReader)
            return self.group.create_array(key, shape=shape, dtype=dtype, chunks=chunks or "auto", shards=shards,
                                           compressors=_compressors(compression), attributes=dict(attrs),
                                           config={"write_empty_chunks": True})
        except (ValueError, TypeError) as e:
            raise UnsupportedError(f"zarr cannot store array {key!r} ({dtype}, chunks={chunks}): {e}") from e

    def write_array(self, key: str, data: np.ndarray, chunks: tuple[int, ...] | None,
                    compression: str | None, attrs: dict[str, Any]) -> None:
        arr = self._create(key, data.shape, data.dtype, chunks, compression, attrs)
        if data.size:
            arr[...] = data

    def create_array(self, key: str, shape: tuple[int, ...], dtype: np.dtype[Any], chunks: tuple[int, ...] | None,
                     compression: str | None, attrs: dict[str, Any]) -> tuple[str, int] | None:
        if not shape:
            return None
        arr = self._create(key, shape, dtype, chunks, compression, attrs)
        # a shard is one object holding many chunks: concurrent writers must not share one
        rows = (arr.shards or arr.chunks)[0]
        return os.path.join(self.path, key), int(rows)

    def finish(self, attrs: dict[str, Any], checksums: dict[str, str]) -> list[str]:
        import json

        meta = json.loads(self.meta_json(attrs, checksums))
        meta["zarr_chunks"] = "all"
        self.group.attrs.update({**attrs, META_KEY: meta})
        return ["zarr.json"]
