"""A first open of a local HDF5 file in a child process, with a deadline.

A crafted HDF5 file (one byte changed is enough) can make libhdf5 spin
forever while holding the GIL, so no timeout in the reading process could
fire. Before a process opens a file it has not seen, a helper process (one
per reading process, started on first use) opens it the way
:class:`~unistore.storage.formats._hdf5.Hdf5Format` does - every dataset's
shape, type, layout, attributes, first and last row - and answers "ok" or
the error it met. A helper that does not answer within the deadline
(``UNISTORE_HDF5_PROBE_TIMEOUT``, 30 s) is killed, and so is one that crashes;
either way the file is corrupt, and the next probe starts a new helper.

Verdicts are kept per file identity (device, inode, size, mtime): a process
probes a file once, and processes forked from it (DataLoader workers) inherit
what it learned.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from typing import Any

__all__ = ["probe"]

_LOCK = threading.Lock()
_HELPER: subprocess.Popen[bytes] | None = None
_HELPER_PID = -1
_SEEN: dict[tuple[int, ...], tuple[str, str] | None] = {}


def _timeout() -> float:
    return float(os.environ.get("UNISTORE_HDF5_PROBE_TIMEOUT", "30"))


def probe(path: str) -> tuple[str, str] | None:
    """None if the local HDF5 file at ``path`` opens and lists cleanly in a helper process, else
    ``(kind, what)``: ``"error"`` (h5py raised; opening it here raises the same), ``"hang"`` (no answer within
    the deadline) or ``"crash"`` (the helper died)."""
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _LOCK:
        if ident in _SEEN:
            return _SEEN[ident]
        verdict = _ask(path)
        _SEEN[ident] = verdict
        return verdict


def _helper() -> subprocess.Popen[bytes]:
    global _HELPER, _HELPER_PID
    if _HELPER is None or _HELPER_PID != os.getpid() or _HELPER.poll() is not None:
        _HELPER = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, close_fds=True)
        _HELPER_PID = os.getpid()
    return _HELPER


def _kill() -> None:
    global _HELPER
    if _HELPER is not None:
        _HELPER.kill()
        _HELPER.wait()
        _HELPER = None


def _ask(path: str) -> tuple[str, str] | None:
    helper = _helper()
    assert helper.stdin is not None and helper.stdout is not None
    try:
        helper.stdin.write(json.dumps(path).encode() + b"\n")
        helper.stdin.flush()
    except OSError:
        _kill()
        return ("crash", "the HDF5 probe process died before it could read the file")
    deadline = _timeout()
    ready, _, _ = select.select([helper.stdout], [], [], deadline)
    if not ready:
        _kill()
        return ("hang", f"libhdf5 did not finish opening it within {deadline:g}s (UNISTORE_HDF5_PROBE_TIMEOUT)")
    line = helper.stdout.readline()
    if not line:
        code = helper.wait()
        _kill()
        return ("crash", f"libhdf5 crashed opening it (exit status {code})")
    answer: Any = json.loads(line)
    return None if answer == "ok" else ("error", str(answer))


_CHILD = r"""
import json, sys
import numpy as np
import h5py

def check(path):
    with h5py.File(path, "r") as f:
        dict(f.attrs)
        found = []
        f.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
        for ds in found:
            dict(ds.attrs)
            ds.shape, ds.dtype, ds.chunks, ds.compression, ds.external, ds.is_virtual
            if h5py.check_vlen_dtype(ds.dtype) is not None:
                ds[...]
                continue
            if ds.chunks is None and ds.shape != ():
                ds.id.get_offset()
            if ds.shape and ds.shape[0]:
                ds[:1]
                ds[-1:]
            elif ds.shape == ():
                ds[()]

for line in sys.stdin:
    try:
        check(json.loads(line))
        answer = "ok"
    except Exception as e:
        answer = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"""
