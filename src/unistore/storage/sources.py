"""Byte sources: where an uncompressed array's bytes come from, one kind per place.

- :class:`LocalFile`: a file on this machine, mapped (``mmap``) once per
  process and checked to be the file its store described;
- :class:`RemoteObject`: an object read in ranges through the location's
  transport (:mod:`unistore.storage.transport`), with retries, length checks
  and the version pin;
- :class:`CachedObject`: a remote object read through the disk cache (a
  source wrapping a :class:`RemoteObject`): blocks fetched once, kept on
  local disk, and mapped side by side in each process.

Each answers what the engine and the loader ask of it - ``gather`` /
``read_rows`` (rows of an array stored in it), ``read_ranges``,
``prefetch``, ``is_cached``, ``prepare_for_workers``, ``release`` - and
calls only downwards: the engine plans (:mod:`unistore.storage.plan`) and
asks a source; a cached source asks its cache, then its remote source.

A layout finds its source with :func:`byte_source`: one per stored file, disk
cache and process, shared by every array stored in that file (a checkpoint's
tensors).  The disk cache is the store's (``open_store(..., cache=)``), handed
by the format to the layouts it builds; the :class:`~unistore.storage.location.Location`
stays an address.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import weakref
from collections import OrderedDict
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from unistore.errors import TruncatedDataError
from unistore.storage import budget
from unistore.storage.cache.entries import BlockWriter, CacheRefusedError
from unistore.storage.location import Location, retry_remote
from unistore.storage.plan import merge_ranges, plan_rows, scatter_rows, touched_blocks
from unistore.storage.transport import Pin

if TYPE_CHECKING:
    from unistore.storage.cache import DiskCache, MappedObject
    from unistore.storage.layout import ContiguousLayout, IOStats

__all__ = ["ByteSource", "LocalFile", "RemoteObject", "CachedObject", "byte_source"]


class ByteSource:
    """What the engine and the loader ask of the place an uncompressed array's bytes live (see the module)."""

    location: Location
    #: whether this is a remote object read through the disk cache
    cached_remote = False

    def gather(self, layout: ContiguousLayout, indices: np.ndarray, stats: IOStats) -> np.ndarray:
        """Rows ``indices`` (validated; any order, repeats allowed) of ``layout``, in that order."""
        raise NotImplementedError

    def read_rows(self, layout: ContiguousLayout, start: int, stop: int, stats: IOStats) -> np.ndarray:
        """Rows ``[start, stop)`` of ``layout`` as one read."""
        return self.gather(layout, np.arange(start, stop, dtype=np.int64), stats)

    def read_ranges(self, starts: np.ndarray, ends: np.ndarray, stats: IOStats) -> list[Any]:
        """Bytes ``[starts[i], ends[i])``, one bytes-like object per range (remote sources: local files are read
        through their mapping)."""
        raise NotImplementedError

    def prefetch(self, layout: ContiguousLayout, indices: np.ndarray, stats: IOStats) -> None:
        """Bring rows ``indices`` close without returning them: by default they are read and dropped, which
        fills the page cache."""
        self.gather(layout, indices, stats)

    def is_cached(self, layout: ContiguousLayout) -> bool:
        """Whether every row is in place in the disk cache, so reading ahead has nothing to do (False where there
        is no disk cache)."""
        return False

    def prepare_for_workers(self) -> None:
        """Learn now, in this process, what processes started from it would each ask storage for."""

    def release(self) -> None:
        """Let go of this process's per-process state (mappings); the next read makes it afresh."""


# ----------------------------------------------------------- local files
#: arrays over mapped files, by (pid, path, stamp, offset, shape, dtype), least recently used first
_MMAPS: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
#: one mapping per file, by (pid, path, stamp): every array of a file (a checkpoint's tensors) is a view of it
_FILE_MAPS: OrderedDict[tuple[Any, ...], tuple[mmap.mmap | None, int]] = OrderedDict()
_MMAP_LOCK = threading.Lock()
#: every local-file source of this process (each may remember the view it gave last)
_LOCAL_SOURCES: weakref.WeakSet[LocalFile] = weakref.WeakSet()


def _forget_views_after_fork() -> None:
    """In a forked child: the views the parent's sources remember belong to the parent's mappings (keyed by its
    pid), and a lock a parent's thread held at the fork would never be released."""
    global _MMAP_LOCK
    _MMAP_LOCK = threading.Lock()
    for source in list(_LOCAL_SOURCES):
        source._last = None


os.register_at_fork(after_in_child=_forget_views_after_fork)


class LocalFile(ByteSource):
    """A file on this machine, the very one described when its store was opened (``stamp``; see
    :func:`~unistore.storage.layout.open_described`).

    Mapped once per process (at most :data:`~unistore.storage.budget.MAX_MAPPED_FILES`
    files stay mapped; an evicted file is mapped again on its next read, and
    arrays already handed out keep their mapping alive).  Large sequential
    reads go through ``readinto`` instead, so the reading process holds the
    rows once, not the rows plus every page it mapped.
    """

    def __init__(self, location: Location, stamp: int):
        self.location, self.stamp = location, stamp
        #: the last array viewed, as (layout, view): batch after batch of one array costs no lookup; dropped when
        #: the file's mapping is evicted, so it never keeps an evicted mapping (and its descriptor) alive, and in
        #: a forked child, which maps the file afresh
        self._last: tuple[Any, np.ndarray] | None = None
        with _MMAP_LOCK:
            _LOCAL_SOURCES.add(self)

    def __getstate__(self) -> tuple[Location, int]:
        return (self.location, self.stamp)

    def __setstate__(self, state: tuple[Location, int]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def _file_map(self) -> tuple[mmap.mmap | None, int]:
        """This process's mapping of the file and its size (lock held)."""
        from unistore.storage.layout import open_described

        key = (os.getpid(), self.location.path, self.stamp)
        found = _FILE_MAPS.get(key)
        if found is not None:
            _FILE_MAPS.move_to_end(key)
            return found
        with open_described(self.location, self.stamp) as f:
            size = os.fstat(f.fileno()).st_size
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        found = _FILE_MAPS[key] = (mapping, size)
        while len(_FILE_MAPS) > budget.MAX_MAPPED_FILES:
            evicted, _ = _FILE_MAPS.popitem(last=False)
            for k in [k for k in _MMAPS if k[:3] == evicted]:
                del _MMAPS[k]
            for source in list(_LOCAL_SOURCES):
                if (source.location.path, source.stamp) == evicted[1:]:
                    source._last = None
        return found

    def array(self, layout: ContiguousLayout) -> np.ndarray:
        """The array of ``layout`` as a read-only view of this process's mapping of the file."""
        last = self._last
        if last is not None and last[0] is layout:
            return last[1]
        mm = self._view(layout)
        self._last = (layout, mm)
        return mm

    def _view(self, layout: ContiguousLayout) -> np.ndarray:
        key = (os.getpid(), self.location.path, self.stamp, layout.offset, layout.shape, layout.dtype.str)
        mm = _MMAPS.get(key)
        if mm is None:
            with _MMAP_LOCK:
                mm = _MMAPS.get(key)
                if mm is None:
                    if 0 in layout.shape:
                        mm = np.empty(layout.shape, layout.dtype)
                    else:
                        mapping, size = self._file_map()
                        need = layout.offset + layout.row_nbytes * layout.shape[0]
                        if size < need:
                            raise TruncatedDataError(
                                f"{self.location.url} is truncated: {size} bytes, but the header "
                                f"promises {need}; re-create or re-download the file")
                        assert mapping is not None  # only an empty file has none, and it failed the check above
                        # a plain ndarray over the mapping: np.memmap's subclass hooks cost
                        # more per gather than the copy itself for small batches
                        count = int(np.prod(layout.shape, dtype=np.int64))
                        mm = np.frombuffer(mapping, dtype=layout.dtype, count=count,
                                           offset=layout.offset).reshape(layout.shape)
                    _MMAPS[key] = mm
        return mm

    def gather(self, layout: ContiguousLayout, indices: np.ndarray, stats: IOStats) -> np.ndarray:
        out = self.array(layout).take(indices, axis=0)
        stats.add_read(1, out.nbytes)
        return out

    def read_rows(self, layout: ContiguousLayout, start: int, stop: int, stats: IOStats) -> np.ndarray:
        if (stop - start) * layout.row_nbytes >= budget.PREAD_MIN_BYTES:
            out = self._read_into(layout, start, stop)
        else:
            out = np.array(self.array(layout)[start:stop])
        stats.add_read(1, out.nbytes)
        return out

    def _read_into(self, layout: ContiguousLayout, start: int, stop: int) -> np.ndarray:
        from unistore.storage.layout import open_described

        out = np.empty((stop - start,) + layout.shape[1:], layout.dtype)
        view = out.reshape(-1).view(np.uint8).data
        with open_described(self.location, self.stamp) as f:
            f.seek(layout.offset + start * layout.row_nbytes)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise TruncatedDataError(
                        f"{self.location.url} is truncated: rows {start}:{stop} end past the end of the file; "
                        "re-create or re-download it")
                done += got
        return out


# ---------------------------------------------------------- remote objects
class RemoteObject(ByteSource):
    """An object read in ranges through its location's transport: retried within the store's deadline, every
    range checked for length, and pinned (``If-Match``) to the version the location learned, where it learned
    one (a disk-cached or HDF5 read asks it once, a directory listing finds it): bytes of a rewritten object are
    never mixed with the old ones or cached under the old identity."""

    def __init__(self, location: Location):
        self.location = location

    def __getstate__(self) -> Location:
        return self.location

    def __setstate__(self, state: Location) -> None:
        self.__init__(state)  # type: ignore[misc]

    def pin(self) -> Pin | None:
        loc = self.location
        known = loc.known_identity
        if loc.protocol not in ("s3", "s3a") or known is None:
            return None
        tag = known[0].split("|")[1]
        if not (tag.startswith('"') and tag.endswith('"')):
            return None  # a version id or a modification time: not an ETag to match
        return Pin(loc.url, etag=tag)

    def read_ranges(self, starts: np.ndarray, ends: np.ndarray, stats: IOStats) -> list[Any]:
        n = len(starts)
        if n == 0:
            return []
        loc = self.location
        # a short read is retried like any transient failure (the transport checks every length)
        blobs: list[Any] = retry_remote(partial(loc.transport.get_ranges, loc.path, [int(s) for s in starts],
                                                [int(e) for e in ends], self.pin()), loc)
        stats.add(requests=n, nbytes=sum(len(b) for b in blobs))
        return blobs

    def stream_into(self, start: int, end: int, writer: BlockWriter, stats: IOStats) -> int:
        """Bytes ``[start, end)`` (``writer`` starts at ``start``) handed to ``writer`` as they arrive, in one
        request, retried within the store's deadline from the first block the writer has not completed; returns
        the bytes received by the attempt that completed."""
        loc = self.location
        try:
            received: int = retry_remote(partial(loc.transport.stream_to, loc.path, end, writer, self.pin()), loc)
        finally:
            writer.discard()
        stats.add(requests=1, nbytes=received)
        return received

    def gather(self, layout: ContiguousLayout, indices: np.ndarray, stats: IOStats) -> np.ndarray:
        row = layout.row_nbytes
        if len(indices) == 0 or row == 0:
            return np.empty((len(indices),) + layout.shape[1:], layout.dtype)
        plan = plan_rows(layout.offset, row, indices, budget.MERGE_GAP_BYTES, budget.MAX_REQUEST_BYTES)
        rows = scatter_rows(plan, self.read_ranges(plan.starts, plan.ends, stats))
        return rows.view(layout.dtype).reshape((len(indices),) + layout.shape[1:])


class CachedObject(ByteSource):
    """A remote object read through a :class:`~unistore.storage.cache.DiskCache`: the cache answers from its
    blocks and fetches the ones it lacks from the object (down, never back up).

    This process maps the object's cached blocks side by side as they are
    first used (:class:`~unistore.storage.cache.MappedObject`), so once a
    batch's blocks are in place its rows are one gather, as from a local
    ``memmap``; where that cannot be done, rows are copied block by block.
    """

    cached_remote = True

    def __init__(self, location: Location, cache: DiskCache):
        self.location = location
        #: where the blocks the cache lacks are fetched from
        self.remote = RemoteObject(location)
        self.cache = cache
        #: this process's mapping of the object's blocks (False: none can be made), made on first use
        self._mapped: MappedObject | bool | None = None

    def __getstate__(self) -> tuple[Location, DiskCache]:
        return (self.location, self.cache)

    def __setstate__(self, state: tuple[Location, DiskCache]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def read_ranges(self, starts: np.ndarray, ends: np.ndarray, stats: IOStats) -> list[Any]:
        identity, size = self.location.identity()
        blobs, counts = self.cache.read_ranges(identity, size, np.asarray(starts, np.int64), np.asarray(ends, np.int64),
                                               partial(self.remote.read_ranges, stats=stats))
        stats.add(disk_hits=counts["hits"], disk_misses=counts["misses"], bytes_local=counts["bytes_local"])
        return blobs

    @property
    def mapped(self) -> MappedObject | bool | None:
        """This process's :class:`~unistore.storage.cache.MappedObject` of the object if one was made (False: none
        can be made here; None: not yet)."""
        return self._mapped

    def whole(self) -> MappedObject | None:
        """This process's mapping of the object's cached blocks (made on first use), or None where none can be
        made."""
        from unistore.storage.cache import MappedObject

        whole = self._mapped
        if whole and whole.stale:  # type: ignore[union-attr]
            whole = self._mapped = None  # unmapped, and its evicted blocks' disk space freed, once no read uses it
        if whole is None:
            identity, size = self.location.identity()
            made = MappedObject.create(self.cache, identity, size)
            if made is not None:
                made.holder = weakref.ref(self)
            whole = self._mapped = made or False
        return whole or None  # type: ignore[return-value]

    def gather(self, layout: ContiguousLayout, rows: np.ndarray, stats: IOStats) -> np.ndarray:
        """Rows out of the cached blocks (missing ones fetched first): one gather over the mapped object
        where its blocks are in place, else copied block by block."""
        row, base = layout.row_nbytes, layout.offset
        if len(rows) == 0 or row == 0:
            return np.empty((len(rows),) + layout.shape[1:], layout.dtype)
        shape = (len(rows),) + layout.shape[1:]
        identity, size = self.location.identity()
        bs = self.cache.block_bytes
        starts = base + rows * row
        whole = self.whole()
        missed = fetched = 0  # blocks (and bytes) written as they arrived, below
        if whole is not None:
            need = touched_blocks(len(whole.mapped), starts, row, bs)
            if not whole.covers(need):
                # blocks nobody is fetching are written to the cache as their bytes arrive and mapped here (no
                # buffer holds them); blocks another reader is fetching, or the cache refused, are read below
                with contextlib.suppress(CacheRefusedError):
                    counts = self.cache.ensure(identity, size, starts, starts + row,
                                               partial(self.remote.stream_into, stats=stats))
                    missed, fetched = counts["misses"], counts["bytes_remote"]
                whole.add(need[~whole.mapped[need]])
            if whole.covers(need):
                held = int(np.minimum(bs, size - need * bs).sum())
                stats.add(disk_hits=len(need) - missed, disk_misses=missed, bytes_local=max(0, held - fetched))
                return whole.rows(base, row, layout.shape[0]).take(rows, axis=0).view(layout.dtype).reshape(shape)
        blocks, counts = self.cache.blocks(identity, size, starts, starts + row,
                                           partial(self.remote.read_ranges, stats=stats))
        # blocks written above are found here: counted as the misses they were
        stats.add(disk_hits=max(0, counts["hits"] - missed), disk_misses=counts["misses"] + missed,
                  bytes_local=max(0, counts["bytes_local"] - fetched))
        if whole is not None:
            whole.add(need[~whole.mapped[need]])
            if whole.covers(need):
                return whole.rows(base, row, layout.shape[0]).take(rows, axis=0).view(layout.dtype).reshape(shape)
        first, last = starts // bs, (starts + row - 1) // bs
        out = np.empty((len(rows), row), np.uint8)
        inside = first == last
        key = np.where(inside, first, -1)  # rows split between blocks go first, as one group
        by_block = np.argsort(key, kind="stable")
        bounds = np.flatnonzero(np.diff(key[by_block])) + 1
        for part in np.split(by_block, bounds):
            b = int(first[part[0]])
            if not inside[part[0]]:
                continue  # rows split between blocks: below
            block = blocks[b]
            # the whole rows in block b: row r0 is the first to start at or after the block's first byte
            r0 = max(0, -(-(b * bs - base) // row))
            skip = base + r0 * row - b * bs
            n = (len(block) - skip) // row
            view = np.frombuffer(block, np.uint8, count=n * row, offset=skip).reshape(n, row)
            out[part] = view.take(rows[part] - r0, axis=0)
        for i in np.flatnonzero(~inside).tolist():
            s, b0, b1 = int(starts[i]), int(first[i]), int(last[i])
            out[i] = np.frombuffer(b"".join(bytes(blocks[b]) for b in range(b0, b1 + 1)), np.uint8,
                                   count=row, offset=s - b0 * bs)
        return out.view(layout.dtype).reshape(shape)

    def prefetch(self, layout: ContiguousLayout, indices: np.ndarray, stats: IOStats) -> None:
        """Fetch only the blocks of rows ``indices`` the cache lacks, and map them here, off the reader's path
        (nothing is assembled, so the later read costs a page lookup)."""
        row = layout.row_nbytes
        if not len(indices) or row == 0:
            return
        identity, size = self.location.identity()
        whole, bs = self.whole(), self.cache.block_bytes
        if whole is not None and whole.complete:
            return  # the whole object is in place: nothing to read ahead
        if whole is not None:
            need = touched_blocks(len(whole.mapped), layout.offset + indices * row, row, bs)
            if whole.covers(need):
                return  # in place already: nothing to look up
        starts = layout.offset + np.unique(indices) * row
        run_starts, run_ends, _ = merge_ranges(starts, starts + row, budget.MERGE_GAP_BYTES,
                                               budget.MAX_REQUEST_BYTES)
        try:
            counts = self.cache.ensure(identity, size, run_starts, run_ends,
                                       partial(self.remote.stream_into, stats=stats))
        except CacheRefusedError:
            return  # a full or read-only cache: the rows are read when asked for, as without one
        stats.add(disk_hits=counts["hits"], disk_misses=counts["misses"])
        if whole is not None:
            whole.add(need[~whole.mapped[need]])

    def is_cached(self, layout: ContiguousLayout) -> bool:
        """Every block of the object is in the disk cache (listed, not read: a reader that finds one bad
        fetches it again, so a wrong answer costs only the read-ahead that was skipped)."""
        whole = self._mapped
        if whole and whole.complete and not whole.stale:  # type: ignore[union-attr]
            return True
        identity, size = self.location.identity()
        return size > 0 and bool(self.cache.holds_entries(identity, -(-size // self.cache.block_bytes)))

    def prepare_for_workers(self) -> None:
        """Learn the object's identity and map in place the blocks the cache holds of it, so forked workers
        inherit the mapping instead of each making its own."""
        whole = self.whole()
        if whole is not None and whole.evicted():
            whole.let_go()
            whole = self.whole()
        if whole is not None:
            whole.add_cached()

    def release(self) -> None:
        """Let go of this process's mapping (processes forked from it keep theirs): blocks evicted while it would
        have been kept free their disk space; the next read maps afresh."""
        self._mapped = None

    def let_go_of(self, whole: MappedObject) -> None:
        """Drop ``whole`` if it is still this source's mapping (its blocks were evicted: see
        :meth:`~unistore.storage.cache.MappedObject.let_go`)."""
        if self._mapped is whole:
            self._mapped = None


#: one source per stored file, disk cache and process: by (id of its Location, stamp, cache); a source holds its
#: Location, so the id is not reused while the entry lives
_SOURCES: weakref.WeakValueDictionary[tuple[int, int, DiskCache | None], ByteSource] = weakref.WeakValueDictionary()
_SOURCES_LOCK = threading.Lock()


def byte_source(location: Location, stamp: int = 0, cache: DiskCache | None = None) -> ByteSource:
    """The source of the bytes of the file at ``location``: a :class:`LocalFile`, or a remote object read through
    the disk cache ``cache`` (:class:`CachedObject`) or directly (:class:`RemoteObject`).  Every array stored in
    one file shares its source."""
    key = (id(location), stamp, cache)
    with _SOURCES_LOCK:
        found = _SOURCES.get(key)
        if found is None:
            if location.is_local:
                found = LocalFile(location, stamp)
            elif cache is not None:
                found = CachedObject(location, cache)
            else:
                found = RemoteObject(location)
            _SOURCES[key] = found
        return found
