"""A moto S3 server behind the counting proxy, for benchmarks that report figures measured at the wire."""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))



@dataclass
class Wire:
    """``bucket``; ``direct``: storage options straight to the server (uploads); ``options``: through
    ``proxy``, which counts requests and bytes and can add latency."""

    bucket: str
    proxy: ProxyProcess
    direct: dict[str, Any]
    options: dict[str, Any]
    server_pid: int = 0

    def server_cpu_seconds(self) -> float:
        """CPU time the S3 server process has used so far."""
        with open(f"/proc/{self.server_pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def upload(self, local_dir: str, key: str) -> str:
        """Copy a local directory into the bucket; returns its ``s3://`` URL."""
        import s3fs

        s3fs.S3FileSystem(**self.direct).put(local_dir.rstrip("/") + "/", f"{self.bucket}/{key}", recursive=True)
        return f"s3://{self.bucket}/{key}"

    def stored(self, url: str) -> int:
        """Bytes stored under ``url`` in the bucket."""
        import s3fs

        return int(s3fs.S3FileSystem(**self.direct).du(url.removeprefix("s3://")))


class ProxyProcess:
    """The counting proxy (tests/storage/faulty_proxy.py) in a process of its own, as the network is not in
    the reader's process either: its threads do not compete with the reader's for the GIL.  Same figures:
    ``requests``, ``paths``, ``bytes_out``, ``total_requests``; ``latency`` is set in the proxy itself."""

    def __init__(self, upstream: str):
        import subprocess

        self._proc = subprocess.Popen([sys.executable, __file__, "--proxy", upstream], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self.endpoint: str = self._ask("endpoint")

    def _ask(self, *command: Any) -> Any:
        import json

        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        return json.loads(self._proc.stdout.readline())

    @property
    def latency(self) -> float:
        return float(self._ask("get", "latency"))

    @latency.setter
    def latency(self, seconds: float) -> None:
        self._ask("set", "latency", seconds)

    @property
    def requests(self) -> Counter[str]:
        return Counter(self._ask("get", "requests"))

    @property
    def paths(self) -> Counter[tuple[str, str]]:
        return Counter({(m, p): n for m, p, n in self._ask("get", "paths")})

    @property
    def bytes_out(self) -> int:
        return int(self._ask("get", "bytes_out"))

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def reset_counts(self) -> None:
        self._ask("reset")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._ask("close")
        self._proc.wait(timeout=30)


def _serve_proxy(upstream: str) -> None:
    """The proxy's process: answers one JSON command per line on stdin."""
    import json

    from tests.storage.faulty_proxy import FaultyProxy

    proxy = FaultyProxy(upstream)
    for line in sys.stdin:
        command, *args = json.loads(line)
        answer: Any = None
        if command == "endpoint":
            answer = proxy.endpoint
        elif command == "get" and args[0] == "paths":
            answer = [[m, p, n] for (m, p), n in proxy.paths.items()]
        elif command == "get":
            answer = getattr(proxy, args[0])
        elif command == "set":
            setattr(proxy, args[0], args[1])
        elif command == "reset":
            proxy.reset_counts()
        else:
            proxy.close()
            print("null", flush=True)
            return
        print(json.dumps(answer), flush=True)


def cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    return (sum(values) - idle) / tick, sum(values) / tick


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _moto_process() -> Iterator[tuple[str, int]]:
    """moto's S3 server (benchmarks/s3_server.py: range reads cost the range) in a process of its own, as a
    bucket is not in the reader's process either; yields its URL and pid."""
    import subprocess
    import time
    import urllib.request

    port = _free_port()
    server = os.path.join(os.path.dirname(__file__), "s3_server.py")
    proc = subprocess.Popen([sys.executable, server, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        yield endpoint, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def s3_behind_proxy(bucket: str = "bench") -> Iterator[Wire]:
    """A fresh moto S3 server (its own process) with ``bucket``, and a counting proxy (its own process too)
    in front of it."""
    import boto3

    with _moto_process() as (endpoint, pid):
        proxy = ProxyProcess(endpoint)
        try:
            boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                         region_name="us-east-1").create_bucket(Bucket=bucket)
            direct = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint,
                                                                          "region_name": "us-east-1"}}
            options = {**direct, "client_kwargs": {"endpoint_url": proxy.endpoint, "region_name": "us-east-1"}}
            yield Wire(bucket, proxy, direct, options, pid)
        finally:
            proxy.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--proxy"]:
    _serve_proxy(sys.argv[2])
