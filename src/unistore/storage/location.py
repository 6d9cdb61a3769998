"""Layer 1: ``(url, storage_options)`` -> an fsspec filesystem and a path.

A :class:`Location` is an address: where the bytes are (URL, path, the
version of the object its store was opened at) and how to reach them
(storage options, transport, deadline).  What is done with the bytes - a
disk cache, mappings - belongs to the byte sources above it
(:mod:`unistore.storage.sources`).  A location is cheap, picklable and
secret-free in every text form.  The filesystem and transport are built
lazily in each process (so forked or spawned DataLoader workers never share
an event loop or socket with their parent).  Local paths are recognised so
the read engine can ``mmap`` real files.
"""

from __future__ import annotations

import contextvars
import errno
import os
import posixpath
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from unistore.errors import InvalidKeyError, RemoteError, UnistoreError
from unistore.storage.secrets import is_secret_key

__all__ = ["Location", "validate_key", "retry_remote", "RetryPolicy", "one_retry_budget", "one_deadline",
           "precondition_failed"]

T = TypeVar("T")



#: Longest key, deepest key and longest component (in UTF-8 bytes) a store accepts: every format turns key
#: components into file or object names, which file systems cap at 255 bytes (with room for an extension).
MAX_KEY_LENGTH = 1024
MAX_KEY_DEPTH = 32
MAX_KEY_PART_BYTES = 200


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative store key, else raise.

    Keys use ``/`` as separator.  Rejected: empty keys or components, ``.`` and
    ``..`` components, absolute paths, NUL bytes and backslashes, so a key can
    never address anything outside its store; components starting with ``.``
    (directory stores skip hidden names, so such an array could never be read
    back); keys longer than :data:`MAX_KEY_LENGTH`, deeper than
    :data:`MAX_KEY_DEPTH` or with a component over :data:`MAX_KEY_PART_BYTES`
    bytes (file names cannot hold them).

    Raises:
        InvalidKeyError: naming the key and what is wrong with it.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"array keys are strings, got {type(key).__name__} {key!r}")
    problem = None
    if not key:
        problem = "it is empty"
    elif "\x00" in key:
        problem = "it contains a NUL byte"
    elif "\\" in key:
        problem = "it contains a backslash; use '/' to separate groups"
    elif key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        problem = "it is an absolute path"
    elif len(key) > MAX_KEY_LENGTH:
        problem = f"it is {len(key)} characters long; keys have at most {MAX_KEY_LENGTH}"
    else:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            problem = "it has an empty, '.' or '..' component"
        elif len(parts) > MAX_KEY_DEPTH:
            problem = f"it is {len(parts)} levels deep; keys have at most {MAX_KEY_DEPTH}"
        elif any(len(p.encode("utf-8", "surrogatepass")) > MAX_KEY_PART_BYTES for p in parts):
            problem = (f"a component is longer than {MAX_KEY_PART_BYTES} bytes (file names on disk and in buckets "
                       "cannot hold it)")
        elif any(p.startswith(".unistore") or p == "unistore.json" for p in parts):
            problem = "names starting with '.unistore' and 'unistore.json' are reserved"
        elif any(p.startswith(".") for p in parts):
            problem = ("a component starts with '.'; directory stores hide such names, so the array could never be "
                       "read back - rename it (e.g. drop the dot)")
    if problem:
        raise InvalidKeyError(f"invalid array key {key!r}: {problem}")
    return key


class Location:
    """Where a store lives: a URL plus fsspec ``storage_options``, how its bytes are reached (``transport``,
    ``deadline``), and the versions of the objects found when it was opened (the object's identity, ``listed``).

    >>> loc = Location("s3://bucket/run1.zarr", {"key": "AKIA...", "secret": "..."})
    >>> loc
    Location('s3://bucket/run1.zarr', storage_options=<2 keys hidden>)
    """

    __slots__ = ("url", "protocol", "path", "_options", "_fs", "_pid", "_identity", "_token",
                 "_missing_secrets", "deadline", "listed", "transport_choice", "_transport", "__weakref__")

    def __init__(self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None,
                 transport: str | None = None):
        import fsspec.core

        if not isinstance(url, (str, os.PathLike)):
            from unistore.errors import ArgumentTypeError

            raise ArgumentTypeError(f"a store is named by a path or URL string (or os.PathLike), got "
                                    f"{type(url).__name__} {url!r:.80}")
        url = os.fspath(url)
        if isinstance(url, bytes):
            url = os.fsdecode(url)
        if "\x00" in url:
            raise InvalidKeyError("store URL contains a NUL byte")
        protocol, path = fsspec.core.split_protocol(url)
        self.protocol: str = protocol or "file"
        if self.protocol in ("file", "local"):
            self.protocol = "file"
            path = os.path.abspath(os.path.expanduser(path))
        else:
            try:
                path = fsspec.get_filesystem_class(self.protocol)._strip_protocol(url)
            except (ImportError, ValueError):
                path = path.rstrip("/")
        self.url = url if protocol else path
        self.path: str = path
        self._options: dict[str, Any] = dict(storage_options or {})
        self._fs: Any = None
        self._pid = -1
        self._identity: tuple[str, int] | None = None
        self._token: tuple[Any, str] | None = None  # (secrets, hand-off token) once pickled
        self._missing_secrets = False
        #: seconds a remote read may take, retries included (None: ``UNISTORE_RETRY_DEADLINE``, else 60)
        self.deadline: float | None = None
        #: identities of the objects below a remote directory, from the listing that found them (never pickled)
        self.listed: dict[str, tuple[str, int]] = {}
        #: how object bytes travel: "auto", "obstore" or "fsspec" (None: ``$UNISTORE_TRANSPORT``, else "auto"); see
        #: :mod:`unistore.storage.transport`
        self.transport_choice = transport
        self._transport: Any = None

    # -- pickling: handles do not travel, and secrets travel outside the pickle (a token in it names them,
    # see unistore.storage.secrets); the object identity travels, so every process caches the bytes of the
    # object its opener saw
    def __getstate__(self) -> tuple[Any, ...]:
        from unistore.storage.secrets import hand_off, split_secrets

        public, found = split_secrets(self._options)
        token = None
        if found:
            if self._token is None or self._token[0] != found:
                self._token = (found, hand_off(found))
            token = self._token[1]
        return (self.url, self.protocol, self.path, public, self._identity, token, self.deadline,
                self.transport_choice)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        from unistore.storage.secrets import merge_secrets, take

        self.url, self.protocol, self.path, self._options, self._identity, token, self.deadline, \
            self.transport_choice = state
        self._transport = None
        self._token = None
        self._missing_secrets = False
        if token:
            found = take(token)
            if found is None:
                self._missing_secrets = True
            else:
                self._options = merge_secrets(self._options, found)
                self._token = (found, token)
        self._fs = None
        self._pid = -1
        self.listed = {}

    def identity(self) -> tuple[str, int]:
        """``(identity, size)`` of the remote object: URL, ETag or version id (else mtime), and size.

        Asked once per opened location (a HEAD request, or the listing fsspec
        already holds); a rewritten object has a new identity the next time a
        store is opened.
        """
        if self._identity is None:
            info = retry_remote(lambda: self.fs.info(self.path), self)
            self._identity = identity_from(self.protocol, self.path, info)
        return self._identity

    @property
    def known_identity(self) -> tuple[str, int] | None:
        """:meth:`identity` if this location already learned it, else None (nothing is asked)."""
        return self._identity

    def __repr__(self) -> str:
        hidden = f", storage_options=<{len(self._options)} keys hidden>" if self._options else ""
        return f"Location({self.url!r}{hidden})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.protocol, self.path, self._options) == (
            other.protocol,
            other.path,
            other._options,
        )

    def __hash__(self) -> int:
        return hash((self.protocol, self.path))

    @property
    def storage_options(self) -> dict[str, Any]:
        """The options passed to fsspec (contains secrets: never print it)."""
        return self._options

    @property
    def safe_options(self) -> dict[str, Any]:
        """``storage_options`` with every secret-looking value (nested ones too) replaced by ``'***'``."""
        return _redact(self._options)

    @property
    def is_local(self) -> bool:
        """True for real files on this machine (the engine may ``mmap`` them)."""
        return self.protocol == "file"

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, created on first use in each process (once: threads asking at the same time
        wait for the one making it)."""
        if self._fs is not None and self._pid == os.getpid():
            return self._fs
        with _MAKING:
            return self._make_fs()

    def _before_connecting(self) -> None:
        """Refuse to connect without the credentials this location was pickled with, and scrub the logs of the
        libraries that will connect."""
        if self._missing_secrets:
            raise RemoteError(
                f"{self.url} was pickled with credentials in storage_options, and they were not handed to "
                "this process (they never travel inside a pickle); pass storage_options again here, or "
                "supply credentials from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        if not self.is_local:
            from unistore.storage.secrets import install_log_redaction

            install_log_redaction()

    def _make_fs(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            self._before_connecting()
            try:
                self._fs = one_retry_budget(fsspec.filesystem(self.protocol, **_one_try(self.protocol, self._options)))
            except ImportError as e:
                from unistore.errors import MissingDependencyError

                hint = "pip install 'unistore[s3]'" if self.protocol in ("s3", "s3a") else "install its fsspec backend"
                raise MissingDependencyError(
                    f"the {self.protocol}:// filesystem is not installed ({e}); {hint}"
                ) from e
            self._pid = os.getpid()
        return self._fs

    @property
    def transport(self) -> Any:
        """This process's :class:`~unistore.storage.transport.Transport` for the object bytes below this location
        (chosen on first use in each process: a forked child of a process that used obstore reads through
        fsspec)."""
        made = self._transport
        if made is not None and made[0] == os.getpid():
            return made[1]
        from unistore.storage.transport import transport_for

        with _MAKING:  # one per process: the read-ahead's threads all start by asking for it
            if self._transport is None or self._transport[0] != os.getpid():
                self._before_connecting()
                # the filesystem is made only if fsspec carries the bytes: an obstore reader never needs it
                self._transport = (os.getpid(), transport_for(self.transport_choice or "", self.protocol,
                                                              self.path, self._options, self._make_fs))
            return self._transport[1]

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def exists(self) -> bool:
        return bool(retry_remote(lambda: self.fs.exists(self.path), self))

    def isdir(self) -> bool:
        return bool(retry_remote(lambda: self.fs.isdir(self.path), self))


#: held while a location's filesystem or transport is made (reentrant: making a transport may make the filesystem)
_MAKING = threading.RLock()


def _fresh_making_lock() -> None:
    """In a forked child: a parent's thread may have held the lock at the fork."""
    global _MAKING
    _MAKING = threading.RLock()


os.register_at_fork(after_in_child=_fresh_making_lock)


def identity_from(protocol: str, path: str, info: Mapping[str, Any]) -> tuple[str, int]:
    """``(identity, size)`` of a remote object from its fsspec info (a HEAD answer or a listing entry): URL,
    ETag or version id (else modification time), and size."""
    tag = next((str(info[k]) for k in ("ETag", "etag", "VersionId", "version_id", "LastModified", "mtime",
                                        "last_modified") if info.get(k)), "")
    size = int(info.get("size") or 0)
    return (f"{protocol}://{path}|{tag}|{size}", size)


def _one_try(protocol: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """s3fs options with botocore's own retries off (unless the user set them): botocore retries a refused
    connection four times with backoff inside every attempt (13 s each), where :func:`retry_remote` should judge."""
    if protocol not in ("s3", "s3a"):
        return dict(options)
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
    return {**options, "config_kwargs": config}


def one_retry_budget(fs: Any) -> Any:
    """``fs`` with s3fs's own retry loop reduced to one try: unistore's retries (:func:`retry_remote`) are then the
    one budget a read spends, within its deadline, instead of s3fs retrying inside every attempt."""
    if type(fs).__module__.startswith("s3fs"):
        fs.retries = 1
    return fs


def _redact(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ("***" if is_secret_key(k) else
                _redact(v) if isinstance(v, Mapping) else v) for k, v in options.items()}


class RetryPolicy:
    """How hard remote reads try before giving up.

    ``attempts`` tries in total, exponential backoff from ``base_delay`` seconds,
    and never longer than ``deadline`` seconds overall - a read whose answer
    does not come (a server that accepts and stays silent, a body that
    trickles in) is abandoned at the deadline too.  The defaults mean every
    remote read ends, one way or the other, within about 60 s.  Tune with
    ``UNISTORE_RETRY_ATTEMPTS`` / ``UNISTORE_RETRY_DEADLINE``, or per store with
    ``open_store(..., deadline=seconds)``.
    """

    def __init__(self, attempts: int | None = None, deadline: float | None = None, base_delay: float = 0.1):
        self.attempts = attempts or int(os.environ.get("UNISTORE_RETRY_ATTEMPTS", "8"))
        self.deadline = deadline or default_deadline()
        self.base_delay = base_delay


def default_deadline() -> float:
    """Seconds a remote read may go without progress when its store sets none (``UNISTORE_RETRY_DEADLINE``)."""
    return float(os.environ.get("UNISTORE_RETRY_DEADLINE", "60"))


# s3fs maps 503 SlowDown to EBUSY and throttling to EAGAIN
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                     errno.ECONNREFUSED, errno.EPIPE}


_TRANSIENT_MARKERS = ("SlowDown", "reduce your request rate", "InternalError", "ServiceUnavailable", "Throttl",
                      "ConnectionReset", "Connection reset", "EndpointConnectionError", "ReadTimeout",
                      "IncompleteRead", "ResponseStreamingError", "ClientPayloadError", "ServerDisconnected",
                      "ConnectionClosedError", "Connection was closed", "ReadTimeoutError", "ConnectTimeout",
                      "FSTimeoutError", "TimeoutError",
                      # obstore (object_store / reqwest / hyper)
                      "error sending request", "HTTP error", "error decoding response body",
                      "error reading a body", "operation timed out", "connection closed before message completed",
                      "IncompleteMessage", "unexpected end of file")
# status codes as whole numbers only: a bucket or key name may contain "500"
_TRANSIENT_STATUS = re.compile(r"(?<![\w-])(500|502|503|504)(?![\w-])")


def precondition_failed(exc: BaseException) -> bool:
    """Whether S3 refused a conditional request (HTTP 412: ``If-Match`` / ``If-Unmodified-Since`` no longer
    hold, the object was rewritten): a GET says so by error code, a HEAD by status only."""
    text = f"{type(exc).__name__} {exc} {exc.__cause__}"
    return "PreconditionFailed" in text or "Precondition Failed" in text or "(412)" in text


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, UnistoreError):  # unistore's own verdict on the data (truncated, corrupt, ...): final
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, ShortReadError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    text = f"{type(exc).__name__} {exc}"
    return (any(m in text for m in _TRANSIENT_MARKERS) or _TRANSIENT_STATUS.search(text) is not None
            or (isinstance(exc, OSError) and exc.errno is None))


class ShortReadError(OSError):
    """A ranged read returned fewer bytes than asked (retried, never returned)."""


_WATCHED = threading.local()
#: ``[time]`` (``time.monotonic()``) by which the current batch's remote reads must next make progress, if set;
#: a list, so the threads reading for one batch (copies of its context) share and move it
_BATCH_DEADLINE: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("unistore_batch_deadline",
                                                                                       default=None)


class one_deadline:  # noqa: N801 - used as a function: ``with one_deadline(location):``
    """The remote reads made inside (in this context) share one deadline without progress: it starts at the
    store's deadline from here and moves on each time one of them completes.  A batch whose reads make no
    progress - several of them waiting one after another on a silent server - ends within one deadline, not one
    per read; a batch that keeps completing reads is never cut short.

    Threads that read on the batch's behalf run in a copy of this context (see
    :func:`unistore.storage.engine._load_runs`).  A class rather than a generator: every remote batch enters
    one, including batches the disk cache answers without a request.
    """

    __slots__ = ("where", "token")

    def __init__(self, where: Location | None):
        self.where = where
        self.token: contextvars.Token[list[float] | None] | None = None

    def __enter__(self) -> None:
        where = self.where
        if where is None or where.is_local or _BATCH_DEADLINE.get() is not None:
            return
        self.token = _BATCH_DEADLINE.set([time.monotonic() + (where.deadline or default_deadline())])

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            _BATCH_DEADLINE.reset(self.token)
            self.token = None


def retry_remote(fn: Callable[[], T], where: Location, policy: RetryPolicy | None = None) -> T:
    """Call ``fn`` with bounded retries for transient remote failures, within the policy's deadline.

    Local locations call ``fn`` once.  Non-transient errors (missing object,
    permission denied) propagate at once.  Remotely, the outermost call runs
    ``fn`` on a watched thread: an attempt still unanswered at the deadline is
    abandoned (left to finish or fail on its own) and reported.

    Raises:
        RemoteError: the failure persisted past the policy's attempts or deadline, naming the URL, the last
            fault and the settings that bound it.
    """
    if where.is_local:
        return fn()
    policy = policy or RetryPolicy(deadline=where.deadline)
    start = time.monotonic()
    batch = _BATCH_DEADLINE.get()
    end = min(start + policy.deadline, batch[0] if batch else float("inf"))
    delay = policy.base_delay
    last = ""
    refused_since: float | None = None
    for attempt in range(1, policy.attempts + 1):
        try:
            # a call nested inside a watched one runs here: the outermost watch bounds them all
            result = fn() if getattr(_WATCHED, "active", False) else _watched(fn, end - time.monotonic())
            if batch:  # progress: the batch's other reads get a full deadline from now
                batch[0] = max(batch[0], time.monotonic() + policy.deadline)
            return result
        except _Unanswered:
            before = f"; before it: {last}" if last else ""
            raise RemoteError(
                f"reading {where.url} failed: no complete answer within the {policy.deadline:g}s deadline "
                f"(attempt {attempt} was still waiting - a server that accepts and stays silent, or sends too "
                f"slowly{before}); check the endpoint, or raise the deadline: UNISTORE_RETRY_DEADLINE or "
                "open_store(..., deadline=seconds)"
            ) from None
        except Exception as e:
            typed = _final_remote_error(e, where)
            if typed is not None:
                raise typed from e
            if not _is_transient(e):
                raise
            last = f"{type(e).__name__}: {_scrub(str(e), where)[:200]}"
            elapsed = time.monotonic() - start
            if _refused(e):
                refused_since = refused_since if refused_since is not None else time.monotonic()
                if time.monotonic() - refused_since + delay > REFUSED_WINDOW or attempt == policy.attempts:
                    raise RemoteError(
                        f"cannot read {where.url}: the connection to {_endpoint_of(where)} was refused {attempt} "
                        f"times in {elapsed:.1f}s (nothing listens there); check the endpoint (storage_options "
                        "endpoint_url, or AWS_ENDPOINT_URL) and that the server is running") from e
            else:
                refused_since = None
            if attempt == policy.attempts or time.monotonic() + delay > end:
                raise RemoteError(
                    f"reading {where.url} failed {attempt} times in {elapsed:.1f}s "
                    f"(last error: {type(e).__name__}: {_scrub(str(e), where)}); check that the "
                    "endpoint is reachable and the credentials are valid, or raise "
                    "UNISTORE_RETRY_ATTEMPTS / UNISTORE_RETRY_DEADLINE (or open_store(..., deadline=seconds))"
                ) from e
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


#: seconds over which a refused connection is retried: long enough for a server that is restarting, short enough
#: that a wrong endpoint is reported at once instead of after the whole retry budget
REFUSED_WINDOW = 3.0


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _refused(exc: BaseException) -> bool:
    """Whether the connection was refused (no server at the endpoint), by errno or by the text obstore and
    botocore give it."""
    for e in _chain(exc):
        if isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED:
            return True
        text = str(e)
        if "Connection refused" in text or "ConnectionRefused" in text:
            return True
    return False


def _endpoint_of(where: Location) -> str:
    options = where.storage_options
    endpoint = (options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
                or options.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    return str(endpoint) if endpoint else f"the default {where.protocol}:// endpoint"


#: how to supply credentials, by protocol
_CREDENTIALS_HINT = {
    "s3": "storage_options={'key': ..., 'secret': ...} (with 'token' for temporary credentials), or "
          "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment; for a public bucket "
          "pass storage_options={'anon': True}",
    "gs": "storage_options={'token': 'path/to/service-account.json'}, or GOOGLE_APPLICATION_CREDENTIALS in the "
          "environment; for a public bucket storage_options={'token': 'anon'}",
    "az": "storage_options={'account_name': ..., 'account_key': ...} (or 'sas_token'), or AZURE_STORAGE_ACCOUNT_NAME "
          "and AZURE_STORAGE_ACCOUNT_KEY in the environment",
}
_CREDENTIALS_HINT.update({"s3a": _CREDENTIALS_HINT["s3"], "gcs": _CREDENTIALS_HINT["gs"],
                          "abfs": _CREDENTIALS_HINT["az"], "abfss": _CREDENTIALS_HINT["az"]})


def _final_remote_error(exc: BaseException, where: Location) -> BaseException | None:
    """The typed error for a remote failure no retry can mend (no credentials, credentials refused), else None."""
    from unistore.errors import CredentialsError

    if isinstance(exc, UnistoreError):
        return None
    names = " ".join(f"{type(e).__name__} {e}" for e in _chain(exc))
    hint = _CREDENTIALS_HINT.get(where.protocol, "the credentials its fsspec backend takes in storage_options")
    if "NoCredentialsError" in names or "Unable to locate credentials" in names \
            or "DefaultCredentialsError" in names:
        return CredentialsError(f"no credentials for {where.url}: none were passed and none were found in the "
                                f"environment; supply them as {hint}")
    if any(code in names for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                                      "InvalidToken")):
        code = next(c for c in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken")
                    if c in names)
        return CredentialsError(f"{where.url}: the server refused the credentials ({code}); check the key and "
                                f"secret, or supply others as {hint}")
    return None


class _Unanswered(Exception):
    """An attempt did not finish before the deadline."""


def _watched(fn: Callable[[], T], remaining: float) -> T:
    """``fn()`` on a thread of its own, abandoned with :class:`_Unanswered` after ``remaining`` seconds."""
    if remaining <= 0:
        raise _Unanswered
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        _WATCHED.active = True
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="unistore-remote-read", daemon=True).start()
    if not done.wait(remaining):
        raise _Unanswered
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _scrub(text: str, where: Location) -> str:
    """Remove any storage-option secret (nested ones too) that a library echoed into ``text``."""
    stack: list[Mapping[str, Any]] = [where.storage_options]
    while stack:
        for k, v in stack.pop().items():
            if isinstance(v, Mapping):
                stack.append(v)
            elif isinstance(v, str) and len(v) >= 4 and is_secret_key(k):
                text = text.replace(v, "***")
    return text
