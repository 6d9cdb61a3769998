"""An HTTP proxy in front of the S3 server that injects cloud faults on demand.

Real sockets and real HTTP on 127.0.0.1: s3fs talks to the proxy exactly as
it would to a bucket that answers 503 SlowDown, 500, or drops connections.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyProxy:
    """Forwards to ``upstream``; the next ``fail_next`` ranged GETs fail with ``mode``.

    ``mode`` is ``"503"``, ``"500"``, ``"reset"`` (close without answering),
    ``"short"`` (send fewer body bytes than promised), ``"silence"`` (accept
    the request and never answer) or ``"trickle"`` (answer, then send the body
    a byte every 0.2 s).  ``fail_always`` makes every ranged GET fail.  Silent
    and trickling answers end when :meth:`close` is called.
    """

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.fail_next = 0
        self.fail_always = False
        self.mode = "503"
        self.failures = 0
        self.ranged_gets = 0
        #: PUTs of objects whose path ends with this fail with 500 (the network dies there)
        self.fail_put_suffix: str | None = None
        #: requests by HTTP method and response body bytes sent to the client (the wire figures)
        self.requests: Counter[str] = Counter()
        self.bytes_out = 0
        #: (method, path without query) of every request
        self.paths: Counter[tuple[str, str]] = Counter()
        #: seconds added before forwarding each request (a distant bucket)
        self.latency = 0.0
        self._lock = threading.Lock()
        self._released = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.requests[self.command] += 1
                    proxy.paths[(self.command, self.path.split("?")[0])] += 1
                if proxy.latency:
                    time.sleep(proxy.latency)
                ranged = self.command == "GET" and "Range" in self.headers
                fail = False
                if self.command == "PUT" and proxy.fail_put_suffix and \
                        self.path.split("?")[0].endswith(proxy.fail_put_suffix):
                    fail = True
                    proxy.failures += 1
                if ranged:
                    with proxy._lock:
                        proxy.ranged_gets += 1
                        if proxy.fail_always or proxy.fail_next > 0:
                            proxy.fail_next = max(0, proxy.fail_next - 1)
                            proxy.failures += 1
                            fail = True
                if fail and (proxy.mode in ("503", "500") or self.command == "PUT"):
                    code = 500 if self.command == "PUT" else int(proxy.mode)
                    payload = SLOWDOWN if code == 503 else b"<Error><Code>InternalError</Code></Error>"
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fail and proxy.mode == "reset":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fail and proxy.mode == "silence":
                    proxy._released.wait(300)
                    self.close_connection = True
                    return
                if fail and proxy.mode == "trickle":
                    self.send_response(206)
                    self.send_header("Content-Type", "application/octet-stream")
                    # the range asked (or a MiB from 0), as a slow server's answer states it before its body
                    asked = (self.headers.get("Range") or "bytes=0-1048575").split("=", 1)[1]
                    first, _, last = asked.partition("-")
                    a = int(first or 0)
                    b = int(last) if last else a + 1048575
                    self.send_header("Content-Length", str(b - a + 1))
                    self.send_header("Content-Range", f"bytes {a}-{b}/{b + 1}")
                    self.end_headers()
                    while not proxy._released.wait(0.2):
                        try:
                            self.wfile.write(b"\x00")
                            self.wfile.flush()
                        except OSError:
                            break
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{proxy.upstream_host}:{proxy.upstream_port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                length = resp.getheader("Content-Length")
                if self.command != "HEAD" and length is not None and not fail and "chunked" not in \
                        resp.getheader("Transfer-Encoding", ""):
                    self._stream(resp, int(length))
                    conn.close()
                    return
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but the object's length
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if fail and proxy.mode == "short":
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                with proxy._lock:  # counted before it is sent: a client that has its answer finds it counted
                    proxy.bytes_out += len(data)
                self.wfile.write(data)
                conn.close()

            def _stream(self, resp: http.client.HTTPResponse, length: int) -> None:
                # passed on as it arrives, as a network does, rather than stored whole and then sent: a large
                # body costs one transfer's time, not two, and the proxy copies it through one small buffer
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.end_headers()
                buf = memoryview(bytearray(min(length, 1 << 20) or 1))
                sent = 0
                while sent < length:
                    n = resp.readinto(buf[:min(len(buf), length - sent)])
                    if not n:
                        break
                    with proxy._lock:  # counted before it is sent (see above)
                        proxy.bytes_out += n
                    self.wfile.write(buf[:n])
                    sent += n
                if sent < length:
                    self.close_connection = True  # the server sent less than it promised: so does the proxy

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        class Server(ThreadingHTTPServer):
            # a listen backlog of 5 (socketserver's default) drops the connections of a burst of concurrent
            # requests, whose clients retry a second later: a stall no bucket has
            request_queue_size = 128

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.paths.clear()
            self.bytes_out = 0

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()
