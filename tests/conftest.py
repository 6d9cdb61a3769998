"""Shared fixtures: a real S3 protocol server (moto, over HTTP), catalogs on SQLite and PostgreSQL, locations."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

REQUIRE_SERVICES = os.environ.get("UNISTORE_REQUIRE_SERVICES") == "1"
S3_SECRET = "s3cr3t-DO-NOT-PRINT-4242"


def service_missing(reason: str) -> None:
    """Skip locally, fail in CI (``UNISTORE_REQUIRE_SERVICES=1``)."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


#: the session's own S3 server: its filesystems serve every module and are kept (see ``_fresh_filesystems``)
_SESSION_ENDPOINTS: list[str] = []


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; yields its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:  # pragma: no cover - moto is a dev dependency
        service_missing(f"moto[server] is not installed ({e})")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    _SESSION_ENDPOINTS.append(f"http://{host}:{port}")
    yield f"http://{host}:{port}"
    server.stop()


def s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "testing",
        "secret": S3_SECRET,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 2,
                          "read_timeout": 20},
    }


@pytest.fixture
def s3(s3_server: str) -> dict[str, Any]:
    """A fresh bucket: ``{"bucket", "options", "endpoint", "fs"}``."""
    import boto3
    import s3fs

    bucket = f"t-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key=S3_SECRET,
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    options = s3_options(s3_server)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    return {"bucket": bucket, "options": options, "endpoint": s3_server, "fs": fs}


@pytest.fixture
def memory_root() -> Iterator[str]:
    import fsspec

    root = f"/t-{uuid.uuid4().hex[:12]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


PG_ADMIN_URL = os.environ.get("UNISTORE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"unistore_t_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as e:
        admin.dispose()
        service_missing(f"PostgreSQL is not reachable at {PG_ADMIN_URL.split('@')[-1]} ({str(e).splitlines()[0]})")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(autouse=True)
def default_catalog_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test gets its own default catalog location (``$XDG_DATA_HOME/unistore/catalog.db``): nothing a
    test records lands in the user's real catalog, and no test sees another's."""
    home = str(tmp_path_factory.mktemp("xdg-data"))
    monkeypatch.setenv("XDG_DATA_HOME", home)
    monkeypatch.delenv("UNISTORE_CATALOG_URL", raising=False)
    return home


@pytest.fixture(autouse=True, scope="module")
def _fresh_filesystems() -> Iterator[None]:
    """When a test module ends, the s3fs filesystems it made for servers and proxies of its own are closed
    and forgotten (those of the session's server stay, for the next modules).

    fsspec keeps every filesystem instance it made, by its options, for the
    life of the process; the tests' proxies listen on ports of their own, so
    without this the session would keep hundreds of s3fs clients (each with
    botocore's S3 model loaded, about 20 MB), and the garbage collections at
    the end of the run would take tens of seconds.
    """
    yield
    import sys

    s3fs = sys.modules.get("s3fs")
    if s3fs is None:
        return
    cache = s3fs.S3FileSystem._cache
    for token, fs in list(cache.items()):
        if fs.client_kwargs.get("endpoint_url") in _SESSION_ENDPOINTS:
            continue
        if fs._s3 is not None:
            s3fs.S3FileSystem.close_session(fs._loop, fs._s3)  # s3fs's own close, as its finalizer does
            fs._s3 = None
        del cache[token]


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """An empty catalog database: a SQLite file or a fresh PostgreSQL database (every catalog test runs on both)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
    else:
        yield from _pg_database()

def pytest_configure(config: pytest.Config) -> None:
    """Fuzz tests run a few hundred examples each; a few thousand when the run selects ``-m slow``."""
    from . import helpers

    if "slow" in (config.getoption("markexpr", "") or ""):
        helpers.FUZZ_EXAMPLES = 3000


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run tests marked ``leaves_threads`` last.

    An embedded Chroma client and a dask.distributed client start threads
    that live as long as the process; forking a process that has such threads
    is unsafe (a lock held by one of them at fork time is never released in the
    child).  The DataLoader tests fork worker processes, so they run first.
    """
    items.sort(key=lambda item: item.get_closest_marker("leaves_threads") is not None)
