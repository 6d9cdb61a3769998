"""Connections to the catalog: SQLite by default, PostgreSQL for shared use.

SQLite gets WAL, foreign keys, a busy timeout and ``BEGIN IMMEDIATE``
transactions, so concurrent writers queue instead of failing with "database
is locked".  PostgreSQL goes through psycopg 3.  After ``fork`` a child never
reuses its parent's pooled connections.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError, OperationalError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from unistore.errors import CatalogCorruptError, CatalogUnavailableError, UnistoreError

__all__ = ["Catalog", "make_engine", "resolve_url", "safe_url", "CatalogOutdatedError",
           "DEFAULT_CATALOG", "default_catalog_url", "default_catalog_dir"]

#: File name of the default SQLite catalog, in :func:`default_catalog_url`'s directory.
DEFAULT_CATALOG = "catalog.db"
SQLITE_BUSY_TIMEOUT_S = 60.0
#: How much of a SQLite catalog a read-only engine maps into memory (file pages, shared between processes).
SQLITE_READER_MMAP_BYTES = 1 << 30


class CatalogOutdatedError(UnistoreError, RuntimeError):
    """The catalog's schema is older (or newer) than this version of unistore."""


_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # the parent's pooled connections belong to the parent: drop them unclosed
    for engine in list(_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def default_catalog_dir() -> str:
    """Where the default SQLite catalog lives: ``$XDG_DATA_HOME/unistore`` (default ``~/.local/share/unistore``)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "unistore")


def default_catalog_url() -> str:
    """The catalog of every entry point that is given none: ``$UNISTORE_CATALOG_URL``, else
    ``catalog.db`` in :func:`default_catalog_dir` (its directory created).

    One rule for datasets, label corrections, dataset-usage records,
    experiments, histories and delta caches, wherever the data they describe
    lives: what one entry point records, every other finds.
    """
    url = os.environ.get("UNISTORE_CATALOG_URL")
    if url:
        return url
    directory = default_catalog_dir()
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, DEFAULT_CATALOG)


def resolve_url(url: str | os.PathLike[str] | None = None) -> str:
    """A SQLAlchemy URL from a URL, a path to a SQLite file, or the default (:func:`default_catalog_url`).

    ``postgresql://`` URLs use psycopg 3.
    """
    if url is None:
        url = default_catalog_url()
    url = os.fspath(url)
    if "://" not in url:
        return f"sqlite:///{os.path.abspath(url)}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def safe_url(url: str | Any) -> str:
    """The URL with its password hidden, for messages and logs."""
    return make_url(str(url)).render_as_string(hide_password=True)


def make_engine(url: str | os.PathLike[str] | None = None, *, write_lock: bool = True, **kwargs: Any) -> Engine:
    """An engine with unistore's connection settings (no schema check).

    ``write_lock=False`` suits an engine that only reads: on SQLite its
    transactions do not take the write lock up front, so many readers
    (DataLoader workers) never queue behind each other or behind a writer.
    """
    full = resolve_url(url)
    is_sqlite = full.startswith("sqlite")
    if is_sqlite:
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
    engine = create_engine(full, **kwargs)
    if is_sqlite:
        _configure_sqlite(engine, write_lock)
    _ENGINES.add(engine)
    return engine


def _configure_sqlite(engine: Engine, write_lock: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself, below
        cursor = dbapi_conn.cursor()
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        if not write_lock:
            # readers serve DataLoader batches: map the file instead of copying pages through read() calls
            cursor.execute(f"PRAGMA mmap_size={SQLITE_READER_MMAP_BYTES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # take the write lock up front: a deferred transaction that later writes
        # fails at once with "database is locked" instead of waiting its turn
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write_lock else "BEGIN")


class Catalog:
    """An open catalog: an engine plus a session factory.

    >>> catalog = unistore.catalog.connect("catalog.db")
    >>> with catalog.session() as s:
    ...     s.add(Dataset(name="run1", store_url="s3://bucket/run1.zarr"))
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        return safe_url(self.engine.url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success and rolled back on error.

        A unistore error raised while binding a value (e.g. an object array for
        an NDArray column) surfaces as itself, not wrapped by SQLAlchemy.
        """
        try:
            with self._sessions() as session, session.begin():
                yield session
        except StatementError as e:
            if isinstance(e.orig, UnistoreError):
                raise e.orig from e
            raise

    def close(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"<unistore.Catalog {self.url}>"

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextmanager
def unavailable_as_typed(engine: Engine) -> Iterator[None]:
    """Turn a failure to reach the database into :class:`CatalogUnavailableError` (password hidden)."""
    try:
        yield
    except OperationalError as e:
        reason = str(e.orig or e).splitlines()[0]
        if _not_a_database(reason):
            raise _corrupt_catalog(engine, reason) from e
        if engine.url.get_backend_name() == "sqlite":
            fix = ("check that the path names a file (not a directory) in a directory you can write, or pass another "
                   "catalog_url / UNISTORE_CATALOG_URL")
        else:
            fix = "check that the server is running and the URL (host, port, user, database) is right"
        raise CatalogUnavailableError(f"cannot open the catalog at {safe_url(engine.url)}: {reason}; {fix}") from e
    except DatabaseError as e:
        raise _corrupt_catalog(engine, str(e.orig or e).splitlines()[0]) from e


def _not_a_database(reason: str) -> bool:
    return any(m in reason for m in ("file is not a database", "database disk image is malformed",
                                     "file is encrypted", "malformed database schema"))


def _corrupt_catalog(engine: Engine, reason: str) -> CatalogCorruptError:
    return CatalogCorruptError(f"the catalog at {safe_url(engine.url)} is not a readable database ({reason}): the "
                               "file is corrupt, truncated or not a catalog - restore it from a backup, or point "
                               "UNISTORE_CATALOG_URL / --url at another catalog")
