"""Layer 3: the read engine.  Every read is a batched gather.

``gather(layout, indices)`` maps row indices to byte ranges or chunks, fetches
them (``mmap`` locally; merged, concurrent range requests remotely; whole
chunks through a byte-bounded decoded-chunk LRU otherwise) and returns the
rows in the order asked for.
"""

from __future__ import annotations

import contextvars
import mmap
import os
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from unistore.errors import TruncatedDataError
from unistore.storage.cache import MappedObject, blocks_of
from unistore.storage.layout import (
    ChunkedLayout,
    ContiguousLayout,
    InMemoryLayout,
    IOStats,
    Layout,
    open_described,
)
from unistore.storage.location import Location, ShortReadError, one_deadline, retry_remote
from unistore.storage.transport import Pin

__all__ = ["gather", "prefetch", "map_cached", "release_mapped", "read_rows", "read_contiguous", "ChunkCache",
           "chunk_cache", "MERGE_GAP_BYTES"]

#: Two requested row ranges closer than this are fetched as one request.
MERGE_GAP_BYTES = int(os.environ.get("UNISTORE_MERGE_GAP_BYTES", 16 * 1024))
#: At most this many bytes in one merged request.
MAX_REQUEST_BYTES = 16 * 1024 * 1024


def _location_of(layout: Layout) -> Location | None:
    if isinstance(layout, ContiguousLayout):
        return layout.location
    if isinstance(layout, ChunkedLayout):
        return getattr(layout.reader, "location", None)
    return None


def gather(layout: Layout, indices: np.ndarray, stats: IOStats) -> np.ndarray:
    """Rows ``indices`` (validated, non-negative int64) of ``layout``, in that order; a remote batch's reads end
    within one deadline together."""
    loc = _location_of(layout)
    if loc is None or loc.is_local:  # the local hot path: no deadline to share
        return _gather(layout, indices, stats)
    with one_deadline(loc):
        return _gather(layout, indices, stats)


def _gather(layout: Layout, indices: np.ndarray, stats: IOStats) -> np.ndarray:
    if isinstance(layout, ContiguousLayout):
        if layout.location.is_local:
            return _gather_mmap(layout, indices, stats)
        return _gather_ranges(layout, indices, stats)
    if isinstance(layout, ChunkedLayout):
        return _gather_chunks(layout, indices, stats)
    if isinstance(layout, InMemoryLayout):
        return layout.data[indices]
    raise TypeError(f"gather() needs a ContiguousLayout, ChunkedLayout or InMemoryLayout, got {type(layout).__name__}")


#: Local row ranges at least this large are read with ``readinto`` rather than copied out of the ``mmap``.
PREAD_MIN_BYTES = 1 << 20


def read_rows(layout: Layout, start: int, stop: int, stats: IOStats) -> np.ndarray:
    """Rows ``[start, stop)`` as one read (a single range or a run of chunks)."""
    loc = _location_of(layout)
    if loc is None or loc.is_local:
        return _read_rows(layout, start, stop, stats)
    with one_deadline(loc):
        return _read_rows(layout, start, stop, stats)


def _read_rows(layout: Layout, start: int, stop: int, stats: IOStats) -> np.ndarray:
    if isinstance(layout, ContiguousLayout):
        if layout.location.is_local:
            if (stop - start) * layout.row_nbytes >= PREAD_MIN_BYTES:
                out = _read_into(layout, start, stop)
            else:
                out = np.array(_memmap(layout)[start:stop])
            stats.add(requests=1, nbytes=out.nbytes)
            return out
        return _gather_ranges(layout, np.arange(start, stop, dtype=np.int64), stats)
    if isinstance(layout, ChunkedLayout):
        return _gather_chunks(layout, np.arange(start, stop, dtype=np.int64), stats)
    if isinstance(layout, InMemoryLayout):
        return layout.data[start:stop]
    raise TypeError(f"read_rows() needs a layout record, got {type(layout).__name__}")


# ---------------------------------------------------------------- local mmap
#: arrays over mapped files, by (pid, path, stamp, offset, shape, dtype), least recently used first
_MMAPS: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
#: one mapping per file, by (pid, path, stamp): every array of a file (a checkpoint's tensors) is a view of it
_FILE_MAPS: OrderedDict[tuple[Any, ...], tuple[mmap.mmap | None, int]] = OrderedDict()
_MMAP_LOCK = threading.Lock()
#: files a process keeps mapped between reads; each mapping holds a file descriptor (Python's mmap keeps a
#: duplicate), so the number is bounded well below the usual limit of 1024 open files.  An evicted file is
#: mapped again on its next read; arrays already handed out keep their mapping alive.
MAX_MAPPED_FILES = int(os.environ.get("UNISTORE_MAX_MAPPED_FILES", 256))


def _file_map(layout: ContiguousLayout) -> tuple[mmap.mmap | None, int]:
    """This process's mapping of the layout's file (the one described at open) and its size (lock held)."""
    key = (os.getpid(), layout.location.path, layout.stamp)
    found = _FILE_MAPS.get(key)
    if found is not None:
        _FILE_MAPS.move_to_end(key)
        return found
    with open_described(layout.location, layout.stamp) as f:
        size = os.fstat(f.fileno()).st_size
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    found = _FILE_MAPS[key] = (mapping, size)
    while len(_FILE_MAPS) > MAX_MAPPED_FILES:
        evicted, _ = _FILE_MAPS.popitem(last=False)
        for k in [k for k in _MMAPS if k[:3] == evicted]:
            del _MMAPS[k]
    return found


def _memmap(layout: ContiguousLayout) -> np.ndarray:
    key = (os.getpid(), layout.location.path, layout.stamp, layout.offset, layout.shape, layout.dtype.str)
    mm = _MMAPS.get(key)
    if mm is None:
        with _MMAP_LOCK:
            mm = _MMAPS.get(key)
            if mm is None:
                if 0 in layout.shape:
                    mm = np.empty(layout.shape, layout.dtype)
                else:
                    mapping, size = _file_map(layout)
                    need = layout.offset + layout.row_nbytes * layout.shape[0]
                    if size < need:
                        raise TruncatedDataError(
                            f"{layout.location.url} is truncated: {size} bytes, but the header "
                            f"promises {need}; re-create or re-download the file"
                        )
                    assert mapping is not None  # only an empty file has none, and it failed the check above
                    # a plain ndarray over the mapping: np.memmap's subclass hooks cost
                    # more per gather than the copy itself for small batches
                    count = int(np.prod(layout.shape, dtype=np.int64))
                    mm = np.frombuffer(mapping, dtype=layout.dtype, count=count,
                                       offset=layout.offset).reshape(layout.shape)
                _MMAPS[key] = mm
    return mm


def _read_into(layout: ContiguousLayout, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` read from the file into a fresh array.

    Large sequential reads (whole-array copies, conversions) go through the
    page cache without mapping the file, so the reading process's resident
    memory holds the rows once, not the rows plus every page it mapped.
    """
    out = np.empty((stop - start,) + layout.shape[1:], layout.dtype)
    view = out.reshape(-1).view(np.uint8).data
    with open_described(layout.location, layout.stamp) as f:
        f.seek(layout.offset + start * layout.row_nbytes)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise TruncatedDataError(
                    f"{layout.location.url} is truncated: rows {start}:{stop} end past the end of the file; "
                    "re-create or re-download it")
            done += got
    return out


def _gather_mmap(layout: ContiguousLayout, indices: np.ndarray, stats: IOStats) -> np.ndarray:
    out = _memmap(layout)[indices]
    stats.add(requests=1, nbytes=out.nbytes)
    return out


# ------------------------------------------------------------ remote ranges
def _merge(starts: np.ndarray, ends: np.ndarray, gap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge sorted ranges whose gap is at most ``gap``; returns run starts, ends, run id per range."""
    new_run = np.empty(len(starts), dtype=bool)
    new_run[:1] = True
    new_run[1:] = (starts[1:] - ends[:-1]) > gap
    run_id = np.cumsum(new_run) - 1
    # cap run size so one request never balloons
    if len(starts):
        run_first = np.flatnonzero(new_run)
        span = ends - starts[run_first[run_id]]
        if span.max() > MAX_REQUEST_BYTES:
            new_run[1:] |= (span[1:] // MAX_REQUEST_BYTES) != (span[:-1] // MAX_REQUEST_BYTES)
            run_id = np.cumsum(new_run) - 1
    firsts = np.flatnonzero(new_run)
    lasts = np.append(firsts[1:], len(starts)) - 1
    return starts[firsts], ends[lasts], run_id


def fetch_ranges(loc: Location, starts: np.ndarray, ends: np.ndarray, stats: IOStats) -> list[bytes]:
    """Byte ranges of one remote object: from the location's disk cache where it has them, else fetched."""
    if loc.cache is None:
        return _fetch_remote(loc, starts, ends, stats)
    identity, size = loc.identity()
    blobs, counts = loc.cache.read_ranges(identity, size, np.asarray(starts, np.int64), np.asarray(ends, np.int64),
                                          lambda s, e: _fetch_remote(loc, s, e, stats))
    stats.add(disk_hits=counts["hits"], disk_misses=counts["misses"], bytes_local=counts["bytes_local"])
    return blobs


def _fetch_remote(loc: Location, starts: np.ndarray, ends: np.ndarray, stats: IOStats) -> list[bytes]:
    """Fetch byte ranges of one remote object through its transport, with retries and length checks; pinned to
    the version the location learned, where it learned one."""
    n = len(starts)
    if n == 0:
        return []
    s_list = [int(s) for s in starts]
    e_list = [int(e) for e in ends]
    pin = _pin(loc)

    def attempt() -> list[bytes]:
        blobs = loc.transport.get_ranges(loc.path, s_list, e_list, pin)
        for blob, s, e in zip(blobs, s_list, e_list):
            if len(blob) != e - s:
                raise ShortReadError(f"asked {e - s} bytes at {s}, got {len(blob)}")
        return blobs  # type: ignore[no-any-return]

    blobs = retry_remote(attempt, loc)  # a short read is retried like any transient failure
    stats.add(requests=n, nbytes=sum(len(b) for b in blobs))
    return blobs


def _pin(loc: Location) -> Pin | None:
    """The version reads of an S3 object ask for (``If-Match`` its ETag) once the location learned it (a
    disk-cached or HDF5 read asks it once, a directory listing finds it): bytes of a rewritten object are never
    mixed with the old ones or cached under the old identity.  None where no ETag is known."""
    known = loc.known_identity
    if loc.protocol not in ("s3", "s3a") or known is None:
        return None
    tag = known[0].split("|")[1]
    if not (tag.startswith('"') and tag.endswith('"')):
        return None  # a version id or a modification time: not an ETag to match
    return Pin(loc.url, etag=tag)


def read_contiguous(layouts: dict[str, ContiguousLayout], stats: IOStats) -> dict[str, np.ndarray]:
    """Whole remote arrays of one or more files, neighbours in a file fetched as one merged request.

    Small tensors stored side by side (a checkpoint's hundreds of LoRA
    matrices) cost one request per file rather than one per tensor.
    """
    by_file: dict[Location, list[tuple[str, ContiguousLayout]]] = {}
    for key, layout in layouts.items():
        by_file.setdefault(layout.location, []).append((key, layout))
    out: dict[str, np.ndarray] = {}
    for loc, members in by_file.items():
        members.sort(key=lambda m: m[1].offset)
        sizes = np.array([int(np.prod(lay.shape, dtype=np.int64)) * lay.dtype.itemsize for _, lay in members],
                         dtype=np.int64)
        starts = np.array([lay.offset for _, lay in members], dtype=np.int64)
        ends = starts + sizes
        nonempty = sizes > 0
        run_starts, run_ends, run_id = _merge(starts[nonempty], ends[nonempty], max(MERGE_GAP_BYTES, 0))
        blobs = fetch_ranges(loc, run_starts, run_ends, stats)
        runs = iter(range(len(run_id)))
        for (key, lay), start, size, filled in zip(members, starts, sizes, nonempty):
            if not filled:
                out[key] = np.empty(lay.shape, lay.dtype)
                continue
            r = int(run_id[next(runs)])
            at = int(start - run_starts[r])
            buf = np.frombuffer(blobs[r], dtype=np.uint8, count=int(size), offset=at)
            out[key] = buf.view(lay.dtype).reshape(lay.shape)
    return out


def prefetch(layout: Layout, indices: np.ndarray, stats: IOStats) -> None:
    """Bring rows ``indices`` close without returning them (read-ahead).

    With a disk cache, a remote uncompressed array only has the missing
    blocks fetched into it, and a chunked array only has its missing chunks
    decoded into it (nothing is assembled, so a later read costs a local
    page lookup); anything else is gathered and dropped, which fills this
    process's caches.
    """
    if isinstance(layout, ChunkedLayout) and len(indices):
        decoded = _decoded_cache(layout)
        if decoded is not None:
            _decoded_chunks(layout, np.unique(indices // layout.chunk_rows), stats, *decoded, check=False)
            return
    if isinstance(layout, ContiguousLayout) and not layout.location.is_local and layout.location.cache is not None:
        row, loc = layout.row_nbytes, layout.location
        if not len(indices) or row == 0:
            return
        identity, size = loc.identity()
        whole, bs = _mapped_object(loc), loc.cache.block_bytes
        if whole is not None and whole.complete:
            return  # the whole object is in place: nothing to read ahead
        if whole is not None:
            need = _touched(len(whole.mapped), layout.offset + indices * row, row, bs)
            if whole.covers(need):
                return  # in place already: nothing to look up
        uniq = np.unique(indices)
        starts = layout.offset + uniq * row
        run_starts, run_ends, _ = _merge(starts, starts + row, max(MERGE_GAP_BYTES, 0))
        counts = loc.cache.ensure(identity, size, run_starts, run_ends, lambda s, e: _fetch_remote(loc, s, e, stats))
        stats.add(disk_hits=counts["hits"], disk_misses=counts["misses"])
        if whole is not None:
            whole.add(need[~whole.mapped[need]])  # checked and mapped here, off the reader's path
        return
    gather(layout, indices, stats)


def _gather_ranges(layout: ContiguousLayout, indices: np.ndarray, stats: IOStats) -> np.ndarray:
    row = layout.row_nbytes
    if len(indices) == 0 or row == 0:
        return np.empty((len(indices),) + layout.shape[1:], layout.dtype)
    if layout.location.cache is not None:
        return _gather_cached(layout, indices, stats).view(layout.dtype).reshape((len(indices),) + layout.shape[1:])
    uniq, inverse = np.unique(indices, return_inverse=True)
    out_shape = (len(uniq),) + layout.shape[1:]
    starts = layout.offset + uniq * row
    ends = starts + row
    run_starts, run_ends, run_id = _merge(starts, ends, max(MERGE_GAP_BYTES, 0))
    blobs = fetch_ranges(layout.location, run_starts, run_ends, stats)
    if len(blobs) == 1:
        buf = np.frombuffer(blobs[0], dtype=np.uint8)
    else:
        buf = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    run_base = np.concatenate([[0], np.cumsum(run_ends - run_starts)[:-1]])
    pos = run_base[run_id] + (starts - run_starts[run_id])
    if np.all(np.diff(pos) == row) and pos[0] == 0 and len(buf) == row * len(uniq):
        rows = buf
    else:
        rows = buf[(pos[:, None] + np.arange(row)[None, :]).ravel()]
    result = rows.view(layout.dtype).reshape(out_shape)
    return result[inverse.ravel()]


def _gather_cached(layout: ContiguousLayout, rows: np.ndarray, stats: IOStats) -> np.ndarray:
    """Rows ``rows`` (any order, repeats allowed) of a remote array with a disk cache, as a
    ``(len(rows), row bytes)`` uint8 array gathered out of the cached blocks (missing blocks fetched first).

    Blocks are mapped side by side into one range of this process
    (:class:`~unistore.storage.cache.MappedObject`) as they are first used,
    so once a batch's blocks are all in place its rows are one fancy index,
    as from a local ``memmap``.  Where that cannot be done, each block is
    viewed as the run of whole rows it holds and rows are copied block by
    block.
    """
    loc, row, base = layout.location, layout.row_nbytes, layout.offset
    identity, size = loc.identity()
    bs = loc.cache.block_bytes
    starts = base + rows * row
    whole = _mapped_object(loc)
    if whole is not None:
        need = _touched(len(whole.mapped), starts, row, bs)
        if whole.covers(need):
            stats.add(disk_hits=len(need), bytes_local=int(np.minimum(bs, size - need * bs).sum()))
            return whole.rows(base, row, layout.shape[0])[rows]
    blocks, counts = loc.cache.blocks(identity, size, starts, starts + row,
                                      lambda s, e: _fetch_remote(loc, s, e, stats))
    stats.add(disk_hits=counts["hits"], disk_misses=counts["misses"], bytes_local=counts["bytes_local"])
    if whole is not None:
        whole.add(need[~whole.mapped[need]])
        if whole.covers(need):
            return whole.rows(base, row, layout.shape[0])[rows]
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
        out[part] = view[rows[part] - r0]
    for i in np.flatnonzero(~inside).tolist():
        s, b0, b1 = int(starts[i]), int(first[i]), int(last[i])
        out[i] = np.frombuffer(b"".join(bytes(blocks[b]) for b in range(b0, b1 + 1)), np.uint8,
                               count=row, offset=s - b0 * bs)
    return out


def _mapped_object(loc: Location) -> MappedObject | None:
    """This process's :class:`~unistore.storage.cache.MappedObject` of a cached remote object (made on first
    use), or None where none can be made."""
    if loc.mapped and loc.mapped.stale:
        loc.mapped = None  # unmapped, and its evicted blocks' disk space freed, once no read uses it
    if loc.mapped is None:
        identity, size = loc.identity()
        loc.mapped = MappedObject.create(loc.cache, identity, size) or False
        if loc.mapped:
            loc.mapped.holder = weakref.ref(loc)
    return loc.mapped or None


def map_cached(layout: ContiguousLayout) -> None:
    """Learn a cached remote object's identity and map in place the blocks the disk cache holds of it."""
    whole = _mapped_object(layout.location)
    if whole is not None and whole.evicted():
        whole.let_go()
        whole = _mapped_object(layout.location)
    if whole is not None:
        whole.add_cached()


def release_mapped(layout: Layout) -> None:
    """Let go of this process's mapping of a cached remote object (processes forked from it keep theirs): the
    blocks evicted while it would have been kept free their disk space; the next read maps afresh."""
    if isinstance(layout, ContiguousLayout) and not layout.location.is_local and layout.location.mapped:
        layout.location.mapped = None


def wholly_cached(layout: Layout) -> bool:
    """Whether every row of ``layout`` is in place locally, so that reading ahead has nothing to do: every block
    of a remote uncompressed object, or every decoded chunk of a chunked array, is in the disk cache.

    Entries are listed, not read (an object this process maps whole needs
    no listing): a reader that finds one bad fetches or decodes it again,
    so a wrong answer costs only the read-ahead that was skipped.
    """
    if isinstance(layout, ChunkedLayout):
        decoded = _decoded_cache(layout)
        if decoded is None or not layout.shape[0]:
            return False
        cache, ident = decoded
        return bool(cache.holds_entries(ident, -(-layout.shape[0] // layout.chunk_rows)))
    if not isinstance(layout, ContiguousLayout) or layout.location.is_local or layout.location.cache is None:
        return False
    loc = layout.location
    whole = loc.mapped
    if whole and whole.complete and not whole.stale:
        return True
    identity, size = loc.identity()
    return size > 0 and bool(loc.cache.holds_entries(identity, -(-size // loc.cache.block_bytes)))


def _touched(nblocks: int, starts: np.ndarray, row: int, bs: int) -> np.ndarray:
    """Sorted numbers of the blocks that rows of ``row`` bytes starting at ``starts`` touch, in an object of
    ``nblocks`` blocks of ``bs`` bytes."""
    if row > bs or nblocks > 1 << 16:
        return blocks_of(starts, starts + row, bs)
    seen = np.zeros(nblocks, dtype=bool)  # a mask of the object's blocks costs less than sorting the rows'
    seen[starts // bs] = True
    seen[(starts + row - 1) // bs] = True
    return np.flatnonzero(seen)


# ------------------------------------------------------------ chunk cache
class ChunkCache:
    """A per-process LRU of decoded chunks, bounded in bytes.

    Arrays that fit in the budget get a *dense* entry: one buffer the size of
    the array (pages are only touched as chunks arrive) plus a mask of which
    chunks are decoded, so a warm gather is a single fancy index at memmap
    speed.  Larger arrays keep individual chunks.  The budget defaults to
    1 GiB per process (``UNISTORE_CHUNK_CACHE_BYTES``); an entry larger than
    the whole budget is used for one read and not kept.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._sizes: dict[Any, int] = {}
        self._nbytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._data:
                self._nbytes -= self._sizes.pop(key)
                del self._data[key]
            self._data[key] = value
            self._sizes[key] = nbytes
            self._nbytes += nbytes
            while self._nbytes > self.max_bytes:
                old, _ = self._data.popitem(last=False)
                self._nbytes -= self._sizes.pop(old)

    def dense(self, token: str, shape: tuple[int, ...], dtype: np.dtype[Any], n_chunks: int) -> Any:
        """The (buffer, decoded-mask) entry of an array that fits in the budget."""
        key = ("dense", token)
        entry = self.get(key)
        if entry is None:
            entry = (np.empty(shape, dtype), np.zeros(n_chunks, dtype=bool))
            self.put(key, entry, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return entry

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()
            self._nbytes = 0

    @property
    def nbytes(self) -> int:
        return self._nbytes


chunk_cache = ChunkCache(int(os.environ.get("UNISTORE_CHUNK_CACHE_BYTES", 1 << 30)))


def _runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted chunk ids into runs of consecutive ids: [(first, last+1), ...]."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(ids, breaks)]


def _load_runs(layout: ChunkedLayout, chunk_ids: np.ndarray, stats: IOStats) -> list[tuple[int, np.ndarray]]:
    """Decode the given chunks, a run of consecutive chunks per read, runs concurrently when allowed."""
    cr, n = layout.chunk_rows, layout.shape[0]

    def load(run: tuple[int, int]) -> tuple[int, np.ndarray]:
        first, stop = run
        return first, layout.reader.read(first * cr, min(stop * cr, n))

    runs = _runs(chunk_ids)
    counter = getattr(layout.reader, "fetched", None)
    before = counter() if counter else None
    if len(runs) > 1 and layout.reader.concurrent:
        # each run in a copy of this context: the runs share the batch's deadline (one_deadline)
        contexts = [contextvars.copy_context() for _ in runs]
        with ThreadPoolExecutor(max_workers=min(16, len(runs))) as pool:
            slabs = list(pool.map(lambda job: job[0].run(load, job[1]), zip(contexts, runs)))
    else:
        slabs = [load(run) for run in runs]
    after = counter() if counter else None
    if before is not None and after is not None:  # the reader knows what it fetched from storage
        stats.add(requests=after[0] - before[0], nbytes=after[1] - before[1], chunks_decoded=len(chunk_ids))
    else:  # otherwise count one request per run and the decoded bytes
        stats.add(requests=len(runs), nbytes=sum(s.nbytes for _, s in slabs), chunks_decoded=len(chunk_ids))
    return slabs


def _gather_chunks(layout: ChunkedLayout, indices: np.ndarray, stats: IOStats) -> np.ndarray:
    cr = layout.chunk_rows
    if len(indices) == 0:
        return np.empty((0,) + layout.shape[1:], layout.dtype)
    chunk_of = indices // cr
    decoded = _decoded_cache(layout)
    if decoded is not None:
        return _assemble(layout, indices, chunk_of, _decoded_chunks(layout, np.unique(chunk_of), stats, *decoded))
    nbytes = int(np.prod(layout.shape, dtype=np.int64)) * layout.dtype.itemsize
    if nbytes <= chunk_cache.max_bytes:
        n_chunks = -(-layout.shape[0] // cr)
        buf, loaded = chunk_cache.dense(layout.token, layout.shape, layout.dtype, n_chunks)
        if loaded[chunk_of].all():  # warm: one fancy index, nothing else
            stats.add(cache_hits=1)
            return buf[indices]
        needed = np.unique(chunk_of)
        missing = needed[~loaded[needed]]
        stats.add(cache_hits=len(needed) - len(missing))
        for first, slab in _load_runs(layout, missing, stats):
            buf[first * cr:first * cr + len(slab)] = slab
            loaded[first:first + -(-len(slab) // cr)] = True
        return buf[indices]
    needed = np.unique(chunk_of)

    blocks: dict[int, np.ndarray] = {}
    missing_ids = []
    for cid in needed.tolist():
        block = chunk_cache.get((layout.token, cid))
        if block is None:
            missing_ids.append(cid)
        else:
            blocks[cid] = block
    stats.add(cache_hits=len(blocks))
    for first, slab in _load_runs(layout, np.asarray(missing_ids, dtype=np.int64), stats):
        for j in range(-(-len(slab) // cr)):
            block = np.ascontiguousarray(slab[j * cr:(j + 1) * cr])
            blocks[first + j] = block
            chunk_cache.put((layout.token, first + j), block, block.nbytes)
    return _assemble(layout, indices, chunk_of, blocks)


def _assemble(layout: ChunkedLayout, indices: np.ndarray, chunk_of: np.ndarray,
              blocks: dict[int, np.ndarray]) -> np.ndarray:
    """Rows ``indices`` out of the decoded chunks holding them."""
    cr = layout.chunk_rows
    if len(blocks) == 1:
        cid = int(chunk_of[0])
        return blocks[cid][indices - cid * cr]
    out = np.empty((len(indices),) + layout.shape[1:], layout.dtype)
    order = np.argsort(chunk_of, kind="stable")
    bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
    for part in np.split(order, bounds):
        cid = int(chunk_of[part[0]])
        out[part] = blocks[cid][indices[part] - cid * cr]
    return out


# ------------------------------------------------- decoded chunks on disk
def _decoded_cache(layout: ChunkedLayout) -> tuple[Any, str] | None:
    """``(disk cache, array identity)`` when the array's decoded chunks are kept in a disk cache, else None."""
    loc = getattr(layout.reader, "location", None)
    identity = getattr(layout.reader, "identity", None)
    if loc is None or loc.cache is None or identity is None or layout.dtype.itemsize == 0 or 0 in layout.shape[1:]:
        return None
    ident = identity()
    return None if ident is None else (loc.cache, f"decoded|{ident}|{layout.chunk_rows}")


def _decoded_chunks(layout: ChunkedLayout, needed: np.ndarray, stats: IOStats, cache: Any, ident: str,
                    check: bool = True) -> dict[int, np.ndarray]:
    """Decoded chunks ``needed`` (sorted ids): mapped from the disk cache where it has them, else decoded once
    and kept there as uncompressed files.

    Every process on the machine maps the same cached pages, so many
    DataLoader workers reading one array hold its decoded chunks once, in the
    page cache, not once each in their own memory; the process's own
    decoded-chunk LRU is not used for such arrays.  ``check=False``
    (read-ahead) only looks for cached chunks, returns the decoded ones and
    does not wait for chunks someone else is decoding.
    """
    cr, n = layout.chunk_rows, layout.shape[0]
    row_shape, row_nbytes = layout.shape[1:], int(np.prod(layout.shape[1:], dtype=np.int64)) * layout.dtype.itemsize
    blocks: dict[int, np.ndarray] = {}

    def present(name: str) -> bool:
        cid = int(name)
        rows = min(cr, n - cid * cr)
        if not check:
            return bool(cache.has_entry(ident, name, rows * row_nbytes))
        view = cache.get_entry(ident, name, rows * row_nbytes)
        if view is not None:
            blocks[cid] = np.frombuffer(view, layout.dtype).reshape((rows,) + row_shape)
        return view is not None

    def decode(names: list[str]) -> None:
        for first, slab in _load_runs(layout, np.array(sorted(int(c) for c in names), dtype=np.int64), stats):
            for j in range(-(-len(slab) // cr)):
                block = np.ascontiguousarray(slab[j * cr:(j + 1) * cr])
                view = cache.put_entry(ident, str(first + j), block)
                blocks[first + j] = block if view is None else np.frombuffer(view, layout.dtype).reshape(block.shape)

    missing = [str(cid) for cid in needed.tolist() if not present(str(cid))]
    local = sum(b.nbytes for b in blocks.values())
    if missing:
        # chunks another worker (or the read-ahead) is decoding right now are awaited, not decoded twice;
        # a read-ahead leaves them to whoever decodes them
        cache.produce(ident, missing, present, decode, wait=check)
    stats.add(disk_hits=len(needed) - len(missing), disk_misses=len(missing), bytes_local=local)
    return blocks
