"""One remote object's cached blocks mapped side by side into one address range of a process (Linux)."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from unistore.storage import budget

if TYPE_CHECKING:
    from unistore.storage.cache.entries import DiskCache

__all__ = ["MappedObject", "sweep_mapped"]


class MappedObject:
    """One remote object's cached blocks mapped side by side into one address range of this process.

    The range (the object's size, rounded up to whole blocks) is reserved
    without access; each block, once this process has found it intact in
    the cache (:meth:`DiskCache._get`), is mapped over its place read-only
    (``MAP_FIXED``).  Rows whose blocks are all in place are then gathered
    with one row gather over :attr:`buffer`, as from a local ``memmap``,
    instead of looking up and slicing each block for each batch.  Every
    process maps the same page-cache pages.

    A block is checked when it is mapped, not at each read: the object stays
    valid for the life of the open store that holds it (a store opened again
    checks its blocks again).  An evicted block's file stays on disk while
    it is mapped, so only objects that fit in the cache's budget are mapped
    whole, and an object some of whose blocks were evicted is let go
    (:func:`sweep_mapped`).  Linux only (:meth:`create` returns None
    elsewhere, or when blocks are not whole pages); readers fall back to
    block-by-block gathers.
    """

    def __init__(self, cache: DiskCache, identity: str, size: int, libc: Any, address: int):
        self.cache, self.identity, self.size = cache, identity, size
        self._libc, self._address = libc, address
        self._nblocks = -(-size // cache.block_bytes)
        #: which blocks are mapped in place
        self.mapped = np.zeros(self._nblocks, dtype=bool)
        #: every block is mapped: rows are read with no lookup at all
        self.complete = False
        self.buffer = np.ctypeslib.as_array((ctypes.c_ubyte * size).from_address(address))
        #: the inode each block was mapped from, to tell when the cache has evicted or replaced it
        self._inodes = np.zeros(self._nblocks, dtype=np.uint64)
        #: some mapped block was evicted or replaced since: the holder lets this object go (its evicted blocks'
        #: disk space is freed once no read uses it), and its next read maps what the cache holds afresh
        self.stale = False
        #: the byte source this object maps for (a weak reference to a :class:`~unistore.storage.sources.CachedObject`)
        self.holder: Any = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        with _BUDGET_LOCK:
            _LIVE.add(self)

    @classmethod
    def create(cls, cache: DiskCache, identity: str, size: int) -> MappedObject | None:
        """Reserve the range for an object of ``size`` bytes; None where that cannot be done here, or when
        this process already maps :data:`~unistore.storage.budget.MAX_MAPPED_BLOCKS` blocks (each block is one
        kernel mapping, and a process may hold about 65,000: a larger cache block, ``UNISTORE_CACHE_BLOCK_BYTES``,
        maps more)."""
        libc = _libc()
        if libc is None or size <= 0 or cache.block_bytes % mmap.PAGESIZE or size > cache.max_bytes:
            return None  # a larger object has blocks evicted while mapped, and each keeps its disk space
        nblocks = -(-size // cache.block_bytes)
        with _BUDGET_LOCK:
            if _MAPPED[0] + nblocks > budget.MAX_MAPPED_BLOCKS:
                return None
            _MAPPED[0] += nblocks
        address = _reserve(libc, None, nblocks * cache.block_bytes)
        if address is None:
            with _BUDGET_LOCK:
                _MAPPED[0] -= nblocks
            return None
        return cls(cache, identity, size, libc, address)

    def rows(self, offset: int, row: int, n: int) -> np.ndarray:
        """The object's bytes ``[offset, offset + n * row)`` as ``n`` rows of ``row`` bytes (only rows whose
        blocks are in place may be read)."""
        return self.buffer[offset:offset + n * row].reshape(n, row)

    def covers(self, blocks: np.ndarray) -> bool:
        """Whether every block of ``blocks`` (numbers) is mapped in place."""
        return self.complete or bool(self.mapped[blocks].all())

    def add(self, blocks: np.ndarray) -> None:
        """Map blocks ``blocks`` in place, each one this process finds intact in the cache (others stay out)."""
        cache, bs = self.cache, self.cache.block_bytes
        folder = cache._dir(self.identity)
        if self._pid != os.getpid():  # a forked child: the parent's lock may have been held at the fork
            self._lock, self._pid = threading.Lock(), os.getpid()
        added = 0
        with self._lock:
            for b in blocks.tolist():
                if self.mapped[b]:
                    continue
                path, want = os.path.join(folder, str(b)), min(bs, self.size - b * bs)
                known = cache.checked(path, want)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    st = os.fstat(fd)
                    if known != (st.st_ino, st.st_size, st.st_mtime_ns):
                        continue  # replaced since it was checked: left to the block-by-block path
                    at = self._address + b * bs
                    got = self._libc.mmap(at, want, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
                    self.mapped[b] = got == at
                    if got == at:
                        self._inodes[b] = st.st_ino
                        added += want
                    else:  # a failed fixed mapping may have dropped the reservation there: put it back
                        _reserve(self._libc, at, bs)
                finally:
                    os.close(fd)
            self.complete = bool(self.mapped.all())
        if added:
            _mapped_more(added, cache)

    def evicted(self) -> bool:
        """Whether a block this object maps has been evicted from the cache, or replaced, since it was mapped
        (one listing of the object's folder)."""
        present = np.zeros(self._nblocks, dtype=np.uint64)
        for b, inode in self.cache.numbered_entries(self.identity).items():
            if b < self._nblocks:
                present[b] = inode
        return bool((self.mapped & (present != self._inodes)).any())

    def let_go(self) -> None:
        """Mark this object stale and drop its holder's reference to it: it is unmapped (freeing the disk space
        of its evicted blocks) once no read uses it, and the holder's next read maps afresh."""
        self.stale = True
        holder = self.holder() if self.holder is not None else None
        if holder is not None:
            holder.let_go_of(self)

    def add_cached(self) -> None:
        """Map in place every block of the object the cache holds now (for a process about to start workers,
        which inherit the mapping instead of each making its own; it lets go of its own once they have
        started, see :meth:`~unistore.storage.sources.CachedObject.release`)."""
        found = np.array(sorted(self.cache.numbered_entries(self.identity)), dtype=np.int64)
        found = found[found < len(self.mapped)]
        self.add(found[~self.mapped[found]])

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._libc.munmap(self._address, self._nblocks * self.cache.block_bytes)
            with _BUDGET_LOCK:
                _MAPPED[0] -= self._nblocks


def sweep_mapped() -> int:
    """Let go of every object this process maps some of whose blocks the cache has evicted or replaced since
    (:meth:`MappedObject.evicted`); returns how many.  A file deleted while mapped keeps its disk space until it
    is unmapped: an object let go is unmapped once no read uses it, and its next read maps afresh."""
    stale = 0
    with _BUDGET_LOCK:
        objects = list(_LIVE)
    for whole in objects:
        if not whole.stale and whole.evicted():
            whole.let_go()
            stale += 1
    return stale


def _mapped_more(nbytes: int, cache: DiskCache) -> None:
    """Count bytes this process has newly mapped; every 1/8 of the budget of them, look for evicted blocks
    still mapped (:func:`sweep_mapped`): what a process keeps of evicted entries stays about as small as what
    it reads between two looks, and each look (a listing per object) is rare."""
    with _BUDGET_LOCK:
        _SWEEP[0] += nbytes
        due = _SWEEP[0] >= max(cache.block_bytes, cache.max_bytes // budget.MAPS_SHARE)
        if due:
            _SWEEP[0] = 0
    if due:
        sweep_mapped()


_MAPPED = [0]
#: every object this process maps side by side, and bytes it mapped since it last looked for evicted blocks
_LIVE: weakref.WeakSet[MappedObject] = weakref.WeakSet()
_SWEEP = [0]
_BUDGET_LOCK = threading.RLock()  # re-entrant: a collection inside it may finalise a MappedObject
_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000  # Linux, every architecture unistore runs on
_MAP_FAILED = ctypes.c_void_p(-1).value
_LIBC: list[Any] = []


def _reserve(libc: Any, address: int | None, nbytes: int) -> int | None:
    """Reserve ``nbytes`` of address space with no access (at ``address`` exactly, when given); its address."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE | (_MAP_FIXED if address is not None else 0)
    got = libc.mmap(address, nbytes, 0, flags, -1, 0)  # protection 0: PROT_NONE
    return None if got in (None, _MAP_FAILED) else int(got)


def _libc() -> Any:
    """libc's ``mmap``/``munmap`` through ctypes (Python's ``mmap`` cannot place a mapping), or None off Linux."""
    if not _LIBC:
        lib = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                lib = ctypes.CDLL(None, use_errno=True)
                lib.mmap.restype = ctypes.c_void_p
                lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_long]
                lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _LIBC.append(lib)
    return _LIBC[0]
