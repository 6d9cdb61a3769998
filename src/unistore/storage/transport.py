"""How the bytes of a remote object travel: obstore (Rust ``object_store``) or fsspec.

Metadata (listing, HEAD, whole small files) always goes through the
location's fsspec filesystem.  The data path - range reads of object bytes,
which is where a training job spends its CPU - goes through a
:class:`Transport`:

- ``"obstore"``: `obstore <https://developmentseed.org/obstore/>`_ for
  ``s3://``, ``gs://``, ``az://`` and ``http(s)://``.  Receiving a byte
  costs about a quarter of the user-space CPU it costs through s3fs/aiohttp,
  0.5-0.7x of its CPU with the kernel's share (random rows: 0.2x;
  ``benchmarks/bench_transport.py``).
- ``"fsspec"``: the location's fsspec filesystem (``cat_ranges``), for every
  other protocol, and the fallback.
- ``"auto"`` (the default; ``$UNISTORE_TRANSPORT`` overrides it): obstore
  where it is installed (``pip install 'unistore[s3]'``), the protocol is one
  it serves and every storage option maps onto it; fsspec otherwise.

Both keep unistore's rules: one retry budget (obstore's own retries are off,
:func:`~unistore.storage.location.retry_remote` retries), typed errors, no
secret in any text form, and pins: a read that names a version (an ETag, or
"not modified since") fails with :class:`~unistore.errors.StoreChangedError`
instead of serving another version's bytes.

Fork safety: obstore's runtime does not survive ``fork()`` (a forked child's
calls hang).  A process forked from one that has used obstore (a DataLoader
worker started with the default ``fork`` context after its parent read data)
reads through fsspec instead; workers started with ``spawn`` or
``forkserver``, and forked workers whose parent never read bytes through
obstore, use obstore.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from unistore.errors import MissingDependencyError, StoreChangedError
from unistore.storage import budget

__all__ = ["Transport", "Pin", "TRANSPORTS", "transport_for", "obstore_config", "obstore_ready"]

TRANSPORTS = ("auto", "obstore", "fsspec")
#: protocols obstore serves (fsspec names them in several ways)
OBSTORE_PROTOCOLS = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az", "abfss": "az",
                     "http": "http", "https": "https"}


@dataclass(frozen=True)
class Pin:
    """The version a read must find: the object's ETag (``If-Match``), or no change since a moment
    (``If-Unmodified-Since``).  ``url`` names the object in the error."""

    url: str
    etag: str | None = None
    unmodified_since: datetime | None = None

    def changed(self) -> StoreChangedError:
        what = f"its ETag is no longer {self.etag}" if self.etag else "it was modified since the store was opened"
        return StoreChangedError(f"{self.url} was rewritten after its store was opened ({what}); no bytes of the "
                                 "new version are served under the old one - open the store again to read it")


class Transport:
    """Range reads of the objects below one location, in this process.

    ``get_ranges`` returns one bytes-like object per ``[start, end)``, each
    checked for length (a short one raises
    :class:`~unistore.storage.location.ShortReadError`, which is retried); a
    missing object is :class:`FileNotFoundError`, a refused one
    :class:`PermissionError`, a broken pin :class:`~unistore.errors.StoreChangedError`;
    anything else is raised as the transport raised it, for
    :func:`~unistore.storage.location.retry_remote` to judge.
    """

    name = "transport"

    def get_ranges(self, path: str, starts: Sequence[int], ends: Sequence[int], pin: Pin | None = None) -> list[Any]:
        raise NotImplementedError

    def stream_to(self, path: str, end: int, writer: Any, pin: Pin | None = None) -> int:
        """One attempt at handing bytes ``[writer.begin(), end)`` to ``writer`` (a
        :class:`~unistore.storage.cache.BlockWriter`) and checking they all came (``writer.finish()``); returns
        the bytes received."""
        raise NotImplementedError

    async def get_async(self, path: str, start: int | None, end: int | None, suffix: int | None = None,
                        pin: Pin | None = None) -> bytes | None:
        """One read from an event loop (zarr's): bytes ``[start, end)`` (``end`` None: to the end;
        ``suffix``: the last ``suffix`` bytes), or None when the object does not exist; a range that begins
        past the object's end gives ``b""``."""
        raise NotImplementedError


class FsspecTransport(Transport):
    """Range reads through the location's fsspec filesystem; on S3 a pinned read is one ``GetObject`` per range
    with ``If-Match`` / ``If-Unmodified-Since`` (s3fs has no public call for conditional reads)."""

    name = "fsspec"

    def __init__(self, fs: Any, protocol: str):
        self.fs = fs
        self.s3 = protocol in ("s3", "s3a")

    def get_ranges(self, path: str, starts: Sequence[int], ends: Sequence[int], pin: Pin | None = None) -> list[Any]:
        if pin is None or not self.s3:
            blobs = self.fs.cat_ranges([path] * len(starts), list(starts), list(ends), on_error="raise")
            for blob in blobs:
                if isinstance(blob, BaseException):
                    raise blob
            return _checked(list(blobs), starts, ends)
        from fsspec.asyn import sync

        async def all_ranges() -> list[Any]:
            sem = asyncio.Semaphore(budget.MAX_CONCURRENT_REQUESTS)

            async def one(a: int, b: int) -> Any:
                async with sem:
                    return await self.get_async(path, a, b, pin=pin)

            return list(await asyncio.gather(*(one(a, b) for a, b in zip(starts, ends)), return_exceptions=True))

        blobs = sync(self.fs.loop, all_ranges)
        for blob in blobs:
            if isinstance(blob, StoreChangedError):
                raise blob
        for blob in blobs:
            if isinstance(blob, BaseException):
                raise blob
            if blob is None:
                raise FileNotFoundError(path)
        return _checked(blobs, starts, ends)

    def stream_to(self, path: str, end: int, writer: Any, pin: Pin | None = None) -> int:
        """One request for the range; its body (which aiohttp and botocore hand over whole) goes to ``writer``
        once it has come."""
        start = writer.begin()
        if self.s3:
            from fsspec.asyn import sync

            blob = sync(self.fs.loop, self.get_async, path, start, end, pin=pin)
            if blob is None:
                raise FileNotFoundError(path)
        else:
            blob = self.fs.cat_file(path, start, end)
        writer.write(blob)
        writer.finish()
        return len(blob)

    async def get_async(self, path: str, start: int | None, end: int | None, suffix: int | None = None,
                        pin: Pin | None = None) -> bytes | None:
        from unistore.storage.location import precondition_failed

        bucket, _, key = path.partition("/")
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if suffix is not None:
            kwargs["Range"] = f"bytes=-{suffix}"
        elif end is not None:
            if end <= (start or 0):
                return b""
            kwargs["Range"] = f"bytes={start or 0}-{end - 1}"
        elif start is not None:
            kwargs["Range"] = f"bytes={start}-"
        if pin is not None and pin.etag:
            kwargs["IfMatch"] = pin.etag
        if pin is not None and pin.unmodified_since is not None:
            kwargs["IfUnmodifiedSince"] = pin.unmodified_since
        try:
            resp = await self.fs._call_s3("get_object", **kwargs)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - sorted by S3's error code
            if pin is not None and precondition_failed(e):
                raise pin.changed() from None
            if "InvalidRange" in f"{e} {e.__cause__}":  # a range past the object's end
                return b""
            raise
        try:
            return bytes(await resp["Body"].read())
        finally:
            resp["Body"].close()


class ObstoreTransport(Transport):
    """Range reads through obstore, one store per bucket (and per pinned version: the pin travels as a default
    header of that store, so a pinned batch is still one ``get_ranges`` call)."""

    name = "obstore"

    def __init__(self, protocol: str, root: str, config: Mapping[str, Any]):
        self.protocol = OBSTORE_PROTOCOLS[protocol]
        self.root = root  # bucket / container, or the http(s) origin
        self.config = dict(config)
        self._stores: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<ObstoreTransport {self.protocol}://{self.root}>"  # never the config: it holds secrets

    def _store(self, pin: Pin | None) -> Any:
        headers = _pin_headers(pin)
        key = tuple(sorted(headers.items()))
        with self._lock:
            store = self._stores.get(key)
            if store is None:
                if len(self._stores) > 64:  # pinned stores of objects read long ago
                    self._stores.clear()
                store = self._stores[key] = _make_store(self.protocol, self.root, self.config, headers)
            return store

    def _key(self, path: str) -> str:
        if self.protocol in ("s3", "gs", "az"):
            return path.partition("/")[2]
        return path[len(self.root):].lstrip("/") if path.startswith(self.root) else path

    def get_ranges(self, path: str, starts: Sequence[int], ends: Sequence[int], pin: Pin | None = None) -> list[Any]:
        """One request per range, as asked: ranges that touch are sent in two interleaved calls at once, since
        object_store would merge them into one request (its ``coalesce=0`` still joins neighbours), past the
        size the engine bounds a request to."""
        _started_here()
        store, key = self._store(pin), self._key(path)
        starts, ends = list(starts), list(ends)
        order = sorted(range(len(starts)), key=starts.__getitem__)
        touching = any(starts[b] <= ends[a] for a, b in zip(order, order[1:]))
        try:
            if not touching:
                return _checked(_get_ranges(store, key, starts, ends), starts, ends)
            halves = (order[0::2], order[1::2])  # both non-empty: touching needs two ranges
            pool = _pool()
            futures = [pool.submit(_get_ranges, store, key, [starts[i] for i in h], [ends[i] for i in h])
                       for h in halves]
            out: list[Any] = [None] * len(starts)
            for half, future in zip(halves, futures):
                for i, blob in zip(half, future.result()):
                    out[i] = blob
            return _checked(out, starts, ends)
        except Exception as e:  # noqa: BLE001 - mapped onto unistore's kinds
            raise _mapped(e, f"{self.protocol}://{path}", pin) from None

    def stream_to(self, path: str, end: int, writer: Any, pin: Pin | None = None) -> int:
        """One request, its body handed to ``writer`` in pieces of at least ``budget.STREAM_PIECE_BYTES`` as they
        arrive: no buffer holds the whole range."""
        import obstore

        from unistore.storage import budget

        _started_here()
        url = f"{self.protocol}://{path}"
        start = writer.begin()
        received = 0
        try:
            pieces = obstore.get(self._store(pin), self._key(path), options={"range": (start, end)}).stream(
                min_chunk_size=budget.STREAM_PIECE_BYTES)
        except Exception as e:  # noqa: BLE001 - mapped onto unistore's kinds
            raise _mapped(e, url, pin) from None
        while True:
            try:  # only obstore's own calls are mapped: what the writer raises passes as it is
                piece = next(pieces)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001
                raise _mapped(e, url, pin) from None
            received += len(piece)
            writer.write(piece)
        writer.finish()
        return received

    async def get_async(self, path: str, start: int | None, end: int | None, suffix: int | None = None,
                        pin: Pin | None = None) -> bytes | None:
        import obstore

        _started_here()
        options: dict[str, Any] = {}
        if suffix is not None:
            options["range"] = {"suffix": suffix}
        elif end is not None:
            if end <= (start or 0):
                return b""
            options["range"] = (start or 0, end)
        elif start is not None:
            options["range"] = {"offset": start}
        try:
            result = await obstore.get_async(self._store(pin), self._key(path), options=options)  # type: ignore[arg-type]
            return bytes(await result.bytes_async())
        except Exception as e:  # noqa: BLE001
            mapped = _mapped(e, f"{self.protocol}://{path}", pin)
            if isinstance(mapped, FileNotFoundError):
                return None
            if "Range Not Satisfiable" in str(e) or "InvalidRange" in str(e):  # a range past the object's end
                return b""
            raise mapped from None


def _checked(blobs: list[Any], starts: Sequence[int], ends: Sequence[int]) -> list[Any]:
    """``blobs``, each checked to hold the bytes of its range (a short one is retried, never handed on)."""
    from unistore.storage.location import ShortReadError

    for blob, s, e in zip(blobs, starts, ends):
        if len(blob) != e - s:
            raise ShortReadError(f"asked {e - s} bytes at {s}, got {len(blob)}")
    return blobs


def _get_ranges(store: Any, key: str, starts: list[int], ends: list[int]) -> list[Any]:
    import obstore

    return list(obstore.get_ranges(store, key, starts=starts, ends=ends, coalesce=0))


_POOL: list[Any] = [None, -1]


def _pool() -> Any:
    """Two threads of this process for the two halves of a call (made again in a forked child)."""
    if _POOL[1] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        _POOL[:] = [ThreadPoolExecutor(max_workers=2, thread_name_prefix="unistore-obstore"), os.getpid()]
    return _POOL[0]


def _pin_headers(pin: Pin | None) -> dict[str, str]:
    if pin is None:
        return {}
    headers = {}
    if pin.etag:
        headers["If-Match"] = pin.etag
    if pin.unmodified_since is not None:
        from email.utils import format_datetime

        headers["If-Unmodified-Since"] = format_datetime(pin.unmodified_since, usegmt=True)
    return headers


def _make_store(protocol: str, root: str, config: Mapping[str, Any], headers: Mapping[str, str]) -> Any:
    from obstore.store import AzureStore, GCSStore, HTTPStore, S3Store

    config = dict(config)
    client = dict(config.pop("client_options", {}))
    if headers:
        client["default_headers"] = dict(headers)
    retry = {"max_retries": 0, "retry_timeout": timedelta(seconds=600)}  # unistore's retries are the one budget
    if protocol == "s3":
        return S3Store(root, config=config or None, client_options=client or None, retry_config=retry)  # type: ignore[arg-type]
    if protocol == "gs":
        return GCSStore(root, config=config or None, client_options=client or None, retry_config=retry)  # type: ignore[arg-type]
    if protocol == "az":
        return AzureStore(root, config=config or None, client_options=client or None, retry_config=retry)  # type: ignore[arg-type]
    return HTTPStore.from_url(root, client_options=client or None, retry_config=retry)  # type: ignore[arg-type]


def _mapped(e: BaseException, path: str, pin: Pin | None) -> BaseException:
    """obstore's error as the kind unistore judges: missing, refused, pin broken, or as it was (retried when its
    text says it was a transient fault)."""
    from obstore import exceptions as ox

    if isinstance(e, (FileNotFoundError, ox.NotFoundError)):
        return FileNotFoundError(f"{path}: no such object")
    if isinstance(e, (PermissionError, ox.PermissionDeniedError, ox.UnauthenticatedError)):
        return PermissionError(f"{path}: {type(e).__name__}")
    if isinstance(e, ox.PreconditionError) and pin is not None:
        return pin.changed()
    from unistore.storage.location import _is_transient

    if _is_transient(e):
        return e  # retried, then reported by retry_remote
    from unistore.errors import RemoteError

    first = str(e).split("\n", 1)[0]
    return RemoteError(f"reading {path} failed ({type(e).__name__}: {first[:300]}); check the endpoint and the "
                       "object, or read it with transport='fsspec'")


# ------------------------------------------------------------- options
#: s3fs options that change nothing about how bytes are read (caches of listings, block sizes for open())
_IGNORED = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "default_block_size",
            "default_fill_cache", "default_cache_type", "asynchronous", "loop", "use_ssl", "cache_regions",
            "version_aware"}


def obstore_config(protocol: str, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """obstore's store configuration for fsspec ``storage_options`` (``key``, ``secret``, ``token``,
    ``endpoint_url`` - also in ``client_kwargs`` -, ``region_name``, ``anon``, timeouts in ``config_kwargs``),
    or None when an option has no obstore counterpart (the ``"auto"`` transport then uses fsspec)."""
    kind = OBSTORE_PROTOCOLS.get(protocol)
    if kind is None:
        return None
    opts = dict(options)
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    if kind == "s3":
        client_kwargs = dict(opts.pop("client_kwargs", None) or {})
        endpoint = opts.pop("endpoint_url", None) or client_kwargs.pop("endpoint_url", None)
        region = opts.pop("region_name", None) or client_kwargs.pop("region_name", None) or opts.pop("region", None)
        if client_kwargs:
            return None
        for ours, theirs in (("key", "access_key_id"), ("secret", "secret_access_key"), ("token", "session_token")):
            value = opts.pop(ours, None)
            if value:
                config[theirs] = value
        if opts.pop("anon", False):
            config["skip_signature"] = True
        if endpoint:
            config["endpoint"] = str(endpoint)
        # obstore reads credentials, region and endpoint from the AWS_* environment as botocore does
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and str(endpoint).startswith("http://"):
            client["allow_http"] = True
        if region:
            config["region"] = str(region)
        config_kwargs = dict(opts.pop("config_kwargs", None) or {})
        config_kwargs.pop("retries", None)  # unistore retries
        for ours, theirs in (("connect_timeout", "connect_timeout"), ("read_timeout", "timeout")):
            if ours in config_kwargs:
                client[theirs] = f"{float(config_kwargs.pop(ours)):g}s"
        if config_kwargs:
            return None
    elif kind == "gs":
        token = opts.pop("token", None)
        if token == "anon" or opts.pop("anon", False):
            config["skip_signature"] = True
        elif isinstance(token, str) and os.path.isfile(token):
            config["service_account_path"] = token
        elif token is not None:
            return None
    elif kind == "az":
        for ours, theirs in (("account_name", "account_name"), ("account_key", "account_key"),
                             ("sas_token", "sas_key")):
            value = opts.pop(ours, None)
            if value:
                config[theirs] = value
        if opts.pop("anon", False):
            config["skip_signature"] = True
    elif kind == "http" and protocol == "http":
        client["allow_http"] = True
    if any(k not in _IGNORED for k in opts):
        return None
    if client:
        config["client_options"] = client
    return config


# ----------------------------------------------------------- choosing
#: the process in which obstore's runtime started (None: not yet); a forked child of it cannot use obstore
_RUNTIME_PID: list[int | None] = [None]
#: the last process that said it reads through fsspec for that reason (each says so once)
_FELL_BACK: list[int] = []
log = logging.getLogger("unistore")


def _started_here() -> None:
    if _RUNTIME_PID[0] is None:
        _RUNTIME_PID[0] = os.getpid()


def obstore_ready() -> bool:
    """Whether this process can read through obstore: it is installed, and this process was not forked from one
    whose obstore runtime had started (that runtime's threads do not exist in a forked child)."""
    if _RUNTIME_PID[0] not in (None, os.getpid()):
        return False
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


def transport_for(choice: str, protocol: str, path: str, options: Mapping[str, Any], fs: Any) -> Transport:
    """The transport a location with these settings reads through in this process (see the module docstring).

    ``fs`` is the location's fsspec filesystem, or a callable that makes it (called only when fsspec carries
    the bytes).

    Raises:
        MissingDependencyError: ``choice="obstore"`` without obstore installed.
        ValueError: an unknown choice, or ``"obstore"`` for a protocol or option obstore does not take.
    """
    def through_fsspec() -> Transport:
        return FsspecTransport(fs() if callable(fs) else fs, protocol)

    choice = choice or os.environ.get("UNISTORE_TRANSPORT", "auto")
    if choice not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {choice!r}")
    if choice == "fsspec" or protocol == "file":
        return through_fsspec()
    config = obstore_config(protocol, options)
    if config is None:
        if choice == "obstore":
            raise ValueError(f"the obstore transport does not take {protocol}:// with these storage_options "
                             f"({', '.join(sorted(options)) or 'none'}); use transport='fsspec' or 'auto'")
        return through_fsspec()
    if not obstore_ready():
        if choice == "obstore" and _RUNTIME_PID[0] is None:
            raise MissingDependencyError("transport='obstore' needs obstore; pip install 'unistore[s3]'")
        if _RUNTIME_PID[0] is not None and _FELL_BACK[-1:] != [os.getpid()]:
            _FELL_BACK.append(os.getpid())
            log.info("process %d was forked from one that read through obstore, whose runtime does not survive "
                     "fork(): it reads through fsspec (start DataLoader workers with multiprocessing_context="
                     "'forkserver' or 'spawn' to keep obstore)", os.getpid())
        return through_fsspec()  # not installed, or forked from a process that used it
    kind = OBSTORE_PROTOCOLS[protocol]
    if kind in ("http", "https"):
        from urllib.parse import urlsplit

        parts = urlsplit(f"{protocol}://{path}" if "://" not in path else path)
        return ObstoreTransport(protocol, f"{parts.scheme}://{parts.netloc}", config)
    return ObstoreTransport(protocol, path.split("/", 1)[0], config)

