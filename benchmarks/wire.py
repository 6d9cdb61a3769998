"""A moto S3 server behind the counting proxy, for benchmarks that report figures measured at the wire."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.storage.faulty_proxy import FaultyProxy  # noqa: E402


@dataclass
class Wire:
    """``bucket``; ``direct``: storage options straight to the server (uploads); ``options``: through
    ``proxy``, which counts requests and bytes and can add latency."""

    bucket: str
    proxy: FaultyProxy
    direct: dict[str, Any]
    options: dict[str, Any]

    def upload(self, local_dir: str, key: str) -> str:
        """Copy a local directory into the bucket; returns its ``s3://`` URL."""
        import s3fs

        s3fs.S3FileSystem(**self.direct).put(local_dir.rstrip("/") + "/", f"{self.bucket}/{key}", recursive=True)
        return f"s3://{self.bucket}/{key}"

    def stored(self, url: str) -> int:
        """Bytes stored under ``url`` in the bucket."""
        import s3fs

        return int(s3fs.S3FileSystem(**self.direct).du(url.removeprefix("s3://")))


@contextlib.contextmanager
def s3_behind_proxy(bucket: str = "bench") -> Iterator[Wire]:
    """A fresh moto server with ``bucket``, and a counting proxy in front of it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    proxy = FaultyProxy(endpoint)
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        direct = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint,
                                                                      "region_name": "us-east-1"}}
        options = {**direct, "client_kwargs": {"endpoint_url": proxy.endpoint, "region_name": "us-east-1"}}
        yield Wire(bucket, proxy, direct, options)
    finally:
        proxy.close()
        server.stop()
