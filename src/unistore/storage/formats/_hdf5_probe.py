"""A first open of an HDF5 file in a child process, with a deadline.

A crafted HDF5 file (one byte changed is enough) can make libhdf5 spin
forever while holding the GIL, so no timeout in the reading process could
fire. Before a process opens a file it has not seen, a helper process (one
per reading process, started on first use) opens it the way
:class:`~unistore.storage.formats._hdf5.Hdf5Format` does - every dataset's
shape, type, layout, attributes, first and last row - and answers "ok" or
the error it met. A helper that does not answer within the deadline
(``UNISTORE_HDF5_PROBE_TIMEOUT``, 30 s) is killed, and so is one that crashes;
either way the file is corrupt, and the next probe starts a new helper.

Verdicts are kept per file identity (device, inode, size and mtime locally;
URL, ETag and size remotely): a process
probes a file once, and processes forked from it (DataLoader workers) inherit
what it learned.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import select
import subprocess
import sys
import threading
from typing import Any

from unistore.storage.location import Location

__all__ = ["probe"]

_LOCK = threading.Lock()
_HELPER: subprocess.Popen[bytes] | None = None
_HELPER_PID = -1
_SEEN: dict[Any, tuple[str, str] | None] = {}


def _timeout() -> float:
    return float(os.environ.get("UNISTORE_HDF5_PROBE_TIMEOUT", "30"))


def probe(location: Location, cache: Any = None) -> tuple[str, str] | None:
    """None if the HDF5 file at ``location`` opens and lists cleanly in a helper process, else
    ``(kind, what)``: ``"error"`` (h5py raised; opening it here raises the same), ``"remote"`` (the storage
    failed the helper's reads), ``"hang"`` (no answer within the deadline) or ``"crash"`` (the helper died).

    A remote file is read by the helper through the same ranged reads (and disk cache ``cache``) as here; the
    location and cache travel to it pickled, its credentials through the hand-off of :mod:`unistore.storage.secrets`.
    """
    if location.is_local:
        st = os.stat(location.path)
        ident: Any = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        request = {"path": location.path}
    else:
        ident = location.identity()
        from unistore.storage.location import RetryPolicy

        # the helper's remote reads end within their own deadline: wait for that before calling it a hang
        request = {"location": base64.b64encode(pickle.dumps((location, cache))).decode(),
                   "deadline": str(RetryPolicy(deadline=location.deadline).deadline)}
    with _LOCK:
        if ident in _SEEN:
            return _SEEN[ident]
        verdict = _ask(request)
        _SEEN[ident] = verdict
        return verdict


def _helper() -> subprocess.Popen[bytes]:
    global _HELPER, _HELPER_PID
    if _HELPER is None or _HELPER_PID != os.getpid() or _HELPER.poll() is not None:
        _HELPER = subprocess.Popen([sys.executable, "-c", _CHILD, str(os.getpid())], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        _HELPER_PID = os.getpid()
    return _HELPER


def _kill() -> None:
    global _HELPER
    if _HELPER is not None:
        _HELPER.kill()
        _HELPER.wait()
        _HELPER = None


def _ask(request: dict[str, str]) -> tuple[str, str] | None:
    helper = _helper()
    assert helper.stdin is not None and helper.stdout is not None
    try:
        helper.stdin.write(json.dumps(request).encode() + b"\n")
        helper.stdin.flush()
    except OSError:
        _kill()
        return ("crash", "the HDF5 probe process died before it could read the file")
    deadline = _timeout() if "path" in request else max(_timeout(), float(request["deadline"]) + 15)
    try:
        # poll, not select: a training process may hold more than FD_SETSIZE (1024) descriptors
        poller = select.poll()
        poller.register(helper.stdout, select.POLLIN | select.POLLHUP | select.POLLERR)
        answered = bool(poller.poll(deadline * 1000))
    except BaseException:  # interrupted: the helper may be stuck in libhdf5, and must not outlive the wait
        _kill()
        raise
    if not answered:
        _kill()
        return ("hang", f"libhdf5 did not finish opening it within {deadline:g}s (UNISTORE_HDF5_PROBE_TIMEOUT)")
    line = helper.stdout.readline()
    if not line:
        code = helper.wait()
        _kill()
        return ("crash", f"libhdf5 crashed opening it (exit status {code})")
    answer: Any = json.loads(line)
    return None if answer == "ok" else (str(answer[0]), str(answer[1]))


_CHILD = r"""
import base64, json, os, pickle, sys
if sys.platform.startswith("linux"):  # killed when the process that started it ends: a helper stuck in libhdf5
    import ctypes                      # never reads the end of its input, and would outlive its parent, spinning
    ctypes.CDLL(None).prctl(1, 9)      # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != int(sys.argv[1]):
        sys.exit(0)                    # the parent ended before that took effect
import numpy as np
import h5py

def check(request):
    if "path" in request:
        target = request["path"]
    else:
        from unistore.storage.formats._hdf5 import _RemoteFile
        target = _RemoteFile(*pickle.loads(base64.b64decode(request["location"])))
    with h5py.File(target, "r") as f:
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
        from unistore.errors import RemoteError, StoreChangedError
        cause = getattr(e, "__context__", None)
        remote = next((x for x in (e, cause) if isinstance(x, (RemoteError, StoreChangedError))), None)
        shown = remote or e
        answer = ["remote" if remote else "error",
                  f"{type(shown).__name__}: {str(shown).splitlines()[0] if str(shown) else ''}"]
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"""
