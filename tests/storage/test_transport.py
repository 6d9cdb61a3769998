"""The transports object bytes travel by (obstore, fsspec): options, choice, same bytes and requests, pins, fork.

Real S3 protocol throughout: moto's server over HTTP, with the counting proxy
between the client and it where requests are asserted.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore import errors
from unistore.storage.location import Location
from unistore.storage.transport import (
    FsspecTransport,
    ObstoreTransport,
    Pin,
    obstore_config,
    transport_for,
)

from ..conftest import S3_SECRET, s3_options
from .faulty_proxy import FaultyProxy
from .hops import back_up, calls_to_the_first_byte

pytestmark = pytest.mark.s3

DATA = np.random.default_rng(3).standard_normal((3000, 48)).astype(np.float32)


# ------------------------------------------------------------------ options (no server)
def test_s3_options_map_onto_obstore() -> None:
    config = obstore_config("s3", {
        "key": "AKID", "secret": "sek", "token": "tok",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 2, "read_timeout": 20},
        "skip_instance_cache": True,
    })
    assert config == {"access_key_id": "AKID", "secret_access_key": "sek", "session_token": "tok",
                      "endpoint": "http://127.0.0.1:9000", "region": "eu-west-1",
                      "client_options": {"allow_http": True, "connect_timeout": "2s", "timeout": "20s"}}
    assert obstore_config("s3", {"anon": True}) == {"skip_signature": True}
    assert obstore_config("s3", {"endpoint_url": "https://s3.example.com"}) == {"endpoint": "https://s3.example.com"}


def test_options_without_an_obstore_counterpart_leave_it_to_fsspec() -> None:
    assert obstore_config("s3", {"requester_pays": True}) is None
    assert obstore_config("s3", {"client_kwargs": {"verify": False}}) is None
    assert obstore_config("s3", {"config_kwargs": {"signature_version": "s3v4"}}) is None
    assert obstore_config("memory", {}) is None
    assert obstore_config("gs", {"token": "anon"}) == {"skip_signature": True}
    assert obstore_config("az", {"account_name": "acct", "sas_token": "sv=1"}) == {"account_name": "acct",
                                                                                  "sas_key": "sv=1"}


def test_the_choice_of_transport() -> None:
    options = {"key": "AKID", "secret": "sek"}
    assert isinstance(transport_for("auto", "s3", "bkt/x.npy", options, fs=None), ObstoreTransport)
    assert isinstance(transport_for("fsspec", "s3", "bkt/x.npy", options, fs=None), FsspecTransport)
    assert isinstance(transport_for("auto", "s3", "bkt/x.npy", {"requester_pays": True}, fs=None), FsspecTransport)
    assert isinstance(transport_for("obstore", "file", "/tmp/x.npy", {}, fs=None), FsspecTransport)
    with pytest.raises(ValueError, match="transport='fsspec'"):
        transport_for("obstore", "s3", "bkt/x.npy", {"requester_pays": True}, fs=None)
    with pytest.raises(ValueError, match="auto, obstore, fsspec"):
        transport_for("rust", "s3", "bkt/x.npy", {}, fs=None)
    with pytest.raises(ValueError, match="transport must be one of"):
        us.open_store("s3://bkt/x.npy", transport="rust")


def test_the_transport_keeps_secrets_out_of_every_text_form() -> None:
    loc = Location("s3://bkt/x.npy", {"key": "AKID", "secret": S3_SECRET}, transport="obstore")
    tr = transport_for("obstore", "s3", loc.path, loc.storage_options, fs=None)
    assert S3_SECRET not in repr(tr) and S3_SECRET not in str(tr)
    blob = pickle.dumps(loc)
    assert S3_SECRET.encode() not in blob
    assert pickle.loads(blob).transport_choice == "obstore"


def test_environment_transport_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISTORE_TRANSPORT", "fsspec")
    assert isinstance(transport_for("", "s3", "bkt/x.npy", {}, fs=None), FsspecTransport)


def test_threads_asking_at_once_share_one_transport_and_an_obstore_reader_makes_no_filesystem() -> None:
    from concurrent.futures import ThreadPoolExecutor

    loc = Location("s3://bkt/x.npy", {"key": "AKID", "secret": "sek"}, transport="obstore")
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: loc.transport, range(8)))
    assert isinstance(made[0], ObstoreTransport)
    assert all(t is made[0] for t in made)
    assert loc._fs is None  # metadata would make it; reading bytes through obstore does not
    fsspec_loc = Location("s3://bkt/x.npy", {"key": "AKID", "secret": "sek"}, transport="fsspec")
    assert fsspec_loc.transport.fs is fsspec_loc.fs


# ------------------------------------------------------------------ against S3
@pytest.fixture
def proxy(s3_server: str) -> Any:
    p = FaultyProxy(s3_server)
    yield p
    p.close()


def _settled(proxy: FaultyProxy) -> None:
    """Wait until the proxy has counted every byte it relayed (its threads count after the client has them)."""
    import time

    last = -1
    while proxy.bytes_out != last:
        last = proxy.bytes_out
        time.sleep(0.2)


def _write(s3: dict[str, Any], fmt: str) -> str:
    url = f"s3://{s3['bucket']}/emb_{fmt}"
    with us.create_store(url, format=fmt, storage_options=s3["options"]) as store:
        store.write_array("emb", DATA)
    return url


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "hdf5", "zarr", "pt"])
def test_both_transports_read_the_same_bytes_with_the_same_requests(fmt: str, s3: dict[str, Any],
                                                                    proxy: FaultyProxy) -> None:
    url = _write(s3, fmt)
    options = s3_options(proxy.endpoint)
    idx = np.random.default_rng(0).choice(len(DATA), 300)
    seen = {}
    for transport in ("fsspec", "obstore"):
        store = us.open_store(url, storage_options=options, transport=transport, cache=False)
        _settled(proxy)
        proxy.reset_counts()
        np.testing.assert_array_equal(store["emb"].take(idx), DATA[idx])
        np.testing.assert_array_equal(store["emb"][100:2100], DATA[100:2100])
        _settled(proxy)
        seen[transport] = (dict(proxy.requests), proxy.bytes_out)
    (fs_requests, fs_bytes), (ob_requests, ob_bytes) = seen["fsspec"], seen["obstore"]
    assert ob_requests.get("GET", 0) <= fs_requests.get("GET", 0), seen
    assert ob_bytes <= fs_bytes * 1.01, (seen, proxy.paths)


@pytest.mark.parametrize("transport", ["fsspec", "obstore"])
def test_a_pinned_read_of_a_rewritten_object_is_store_changed(transport: str, s3: dict[str, Any],
                                                              tmp_path: Any) -> None:
    from unistore.storage.cache import DiskCache

    url = _write(s3, "npy")
    cache = DiskCache(tmp_path / "cache", block_bytes=64 * 1024)  # the 576 KB object is 9 blocks
    store = us.open_store(url, storage_options=s3["options"], transport=transport, cache=cache)
    np.testing.assert_array_equal(store["emb"].take([5]), DATA[[5]])  # learns the ETag, caches block 0
    with us.create_store(url, format="npy", storage_options=s3["options"], overwrite=True) as again:
        again.write_array("emb", DATA[::-1].copy())
    with pytest.raises(errors.StoreChangedError, match="open the store again"):
        store["emb"].take([len(DATA) - 1])  # a block not cached yet: fetched with If-Match
    np.testing.assert_array_equal(us.open_store(url, storage_options=s3["options"], transport=transport,
                                                cache=cache)["emb"].take([0]), DATA[[-1]])


def test_a_missing_object_is_not_found_through_obstore(s3: dict[str, Any]) -> None:
    loc = Location(f"s3://{s3['bucket']}/nothing.npy", s3["options"], transport="obstore")
    assert loc.transport.name == "obstore"
    with pytest.raises(FileNotFoundError):
        loc.transport.get_ranges(loc.path, [0], [10])
    with pytest.raises(errors.StoreChangedError, match="no longer"):
        url = _write(s3, "npy")
        there = Location(f"{url}/emb.npy", s3["options"], transport="obstore")
        there.transport.get_ranges(there.path, [0], [10], Pin(there.url, etag='"0123"'))


def _read_in_child(url: str, options: dict[str, Any], queue: Any) -> None:
    store = us.open_store(url, storage_options=options, cache=False)
    rows = store["emb"].take([7, 2999])
    loc = store["emb"].layout.location
    queue.put((loc.transport.name, rows))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_read_after_their_parent_used_obstore(method: str, s3: dict[str, Any]) -> None:
    """obstore's runtime does not survive fork(): a forked child of a process that read through it reads through
    fsspec (and does not hang); a spawned one reads through obstore."""
    url = _write(s3, "npy")
    store = us.open_store(url, storage_options=s3["options"], cache=False)
    np.testing.assert_array_equal(store["emb"].take([1]), DATA[[1]])  # the parent starts obstore's runtime
    assert store["emb"].layout.location.transport.name == "obstore"
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(url, s3["options"], queue))
    child.start()
    name, rows = queue.get(timeout=120)
    child.join(30)
    assert child.exitcode == 0
    np.testing.assert_array_equal(rows, DATA[[7, 2999]])
    assert name == ("fsspec" if method == "fork" else "obstore")


# ------------------------------------------------------------------ plain HTTP(S) servers
@pytest.fixture
def http_files(tmp_path: Any) -> Any:
    """A local HTTP server answering GET and HEAD with byte ranges (as a web server or a CDN does) for the files of
    a directory; yields its base URL."""
    import http.server
    import re
    import threading

    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, body: bool) -> None:
            path = root / self.path.lstrip("/").split("?")[0]
            if not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = path.read_bytes()
            asked = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
            if asked:
                first = int(asked[1]) if asked[1] else max(0, len(data) - int(asked[2]))
                last = min(int(asked[2]), len(data) - 1) if asked[1] and asked[2] else len(data) - 1
                part = data[first:last + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
            else:
                part = data
                self.send_response(200)
            self.send_header("Content-Length", str(len(part)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{len(data)}-{path.stat().st_mtime_ns}"')
            self.end_headers()
            if body:
                self.wfile.write(part)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._answer(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(False)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("transport", ["fsspec", "obstore"])
def test_an_http_store_reads_through_either_transport(transport: str, http_files: Any) -> None:
    root, base = http_files
    np.save(root / "emb.npy", DATA)
    store = us.open_store(f"{base}/emb.npy", transport=transport, cache=False)
    arr = store["emb"]
    assert arr.layout.location.transport.name == transport
    idx = np.random.default_rng(5).choice(len(DATA), 100)
    np.testing.assert_array_equal(arr.take(idx), DATA[idx])
    np.testing.assert_array_equal(arr[10:20], DATA[10:20])


@pytest.mark.parametrize("transport", ["obstore", "fsspec"])
def test_a_cold_cached_batch_reaches_its_bytes_in_seven_calls_each_going_down(transport: str, s3: dict[str, Any],
                                                                              tmp_path: Any) -> None:
    from unistore.storage.cache import DiskCache

    url = _write(s3, "npy")
    cache = DiskCache(str(tmp_path / "cache"), block_bytes=4096)
    arr = us.open_store(url, storage_options=s3["options"], transport=transport, cache=cache)["emb"]
    arr.take([0])  # clients, connections and the mapping made; the rows below are in blocks not yet cached
    rows = [len(DATA) - 1, len(DATA) // 2]
    stack = calls_to_the_first_byte(lambda: np.testing.assert_array_equal(arr.take(rows), DATA[rows]))
    assert len(stack) <= 7, stack
    assert not back_up(stack), f"calls back up: {stack}"
