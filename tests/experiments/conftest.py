"""A real Chroma server and per-test Chroma configurations (embedded and server)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real Chroma server (the ``chroma run`` command chromadb ships) on 127.0.0.1; yields (host, port)."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from ..conftest import service_missing

    exe = os.path.join(os.path.dirname(sys.executable), "chroma")
    if not os.path.exists(exe):
        exe = shutil.which("chroma") or ""
    if not exe:
        service_missing("the `chroma` command (pip install chromadb) is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("chroma-log") / "server.log", "w")
    proc = subprocess.Popen([exe, "run", "--path", str(tmp_path_factory.mktemp("chroma-server")), "--host",
                             "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                service_missing(f"the Chroma server did not start (see {log.name})")
            time.sleep(0.2)
    yield "127.0.0.1", port
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(params=["embedded", "server"])
def chroma_config(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """A ChromaConfig with a fresh collection: embedded in tmp_path, or on the running server."""
    import uuid

    from unistore.experiments import ChromaConfig

    name = f"exp-{uuid.uuid4().hex[:10]}"
    if request.param == "embedded":
        return ChromaConfig(persist_directory=str(tmp_path / "chroma"), collection_name=name)
    host, port = request.getfixturevalue("chroma_server")
    return ChromaConfig(host=host, port=port, collection_name=name)
