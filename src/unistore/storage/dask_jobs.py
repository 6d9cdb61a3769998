"""Running unistore work on Dask (``dask.distributed``): clients and per-array tasks.

``scheduler`` everywhere means: ``None`` (no Dask, run here), ``"local"`` (a
:class:`~dask.distributed.LocalCluster` of worker *processes* for the
duration of the call), ``"tcp://host:port"`` (an existing scheduler), or a
``dask.distributed.Client``.  Tasks carry store handles (URL, storage
options and metadata), never data: each worker opens the store itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from unistore.errors import MissingDependencyError
from unistore.storage.checksums import sha256_hex

__all__ = ["dask_client", "checksum_task", "stage_block"]


@contextlib.contextmanager
def dask_client(scheduler: Any, n_workers: int | None = None) -> Iterator[Any]:
    """A ``dask.distributed.Client`` for ``scheduler``; a local cluster it started is closed on exit.

    Raises:
        MissingDependencyError: dask.distributed is not installed.
        ValueError: ``scheduler`` is none of the accepted forms.
    """
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as e:
        raise MissingDependencyError(f"running on Dask needs dask.distributed ({e}); "
                                     "pip install 'unistore[dask]'") from e
    if isinstance(scheduler, Client):
        yield scheduler
    elif scheduler == "local":
        workers = n_workers or max(1, min(4, os.cpu_count() or 1))
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            yield client
    elif isinstance(scheduler, str) and "://" in scheduler:
        with Client(scheduler) as client:
            yield client
    else:
        raise ValueError(f"scheduler must be None, 'local', 'tcp://host:port' or a dask Client, got {scheduler!r}")


def checksum_task(store: Any, key: str, block_rows: int | None) -> str:
    """The checksum of ``store[key]`` as stored now (run on a worker, which reads the array itself)."""
    from unistore.storage.array import RaggedArray
    from unistore.storage.checksums import checksum_of, stream_checksum

    arr = store[key]
    if isinstance(arr, RaggedArray):
        return checksum_of([arr.values.read(), arr.offsets])
    return stream_checksum(arr, block_rows)


# ----------------------------------------------------------------- convert
def stage_block(src: Any, key: str, start: int, stop: int, job: Any, name: str,
                array_path: str | None = None, fmt: str | None = None) -> tuple[str, int]:
    """Copy rows ``[start, stop)`` of ``src[key]`` into the job directory, and encode them (run on a worker).

    The block is stored as its raw bytes, then a ``.sha256`` marker holding
    their hash: a block whose marker is present and matches is *verified* and
    is not read from the source again by a rerun; a block cut short by a crash
    has no marker (or a wrong one) and is copied again.  With ``array_path``
    the rows are also written into that destination array by its format
    (``fmt``: :meth:`~unistore.storage.formats.base.Format.write_block`; the
    block covers whole chunks or shards of it, so workers never share one).
    Returns ``("skipped" | "copied", source bytes read)``.
    """
    import posixpath

    import numpy as np

    fs = job.fs
    path = f"{job.path}/{name}"
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    arr = src[key]
    block: np.ndarray | None = None
    try:
        raw = fs.cat_file(path)
        if sha256_hex(raw) == fs.cat_file(path + ".sha256").decode():
            block = np.frombuffer(raw, dtype=arr.dtype).reshape((stop - start,) + tuple(arr.shape[1:]))
    except FileNotFoundError:
        pass
    status, nbytes = "skipped", 0
    if block is None:
        before = src.io_stats()["bytes"]
        block = np.ascontiguousarray(arr[start:stop])
        raw_view = block.reshape(-1).view(np.uint8).data  # written and hashed without another copy
        with fs.open(path, "wb") as f:
            f.write(raw_view)
        fs.pipe_file(path + ".sha256", sha256_hex(raw_view).encode())
        status, nbytes = "copied", src.io_stats()["bytes"] - before
    if array_path is not None and fmt is not None:  # the destination format's own block writer
        from unistore.storage.formats import format_class

        format_class(fmt).write_block(array_path, start, block)
    return status, nbytes
