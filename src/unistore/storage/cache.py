"""A persistent local cache of remote bytes, shared by every process on a machine.

Remote objects are cut into fixed blocks (``block_bytes``, 2 MiB by
default: each block is a file, so larger blocks cost fewer files, requests
and mappings, and smaller ones fetch less around a lone row); a read fetches
the blocks it lacks (neighbours merged into one range request) and keeps
them on local disk, so a second epoch over a store that fits reads nothing
remotely.

Why not fsspec's ``blockcache`` / ``filecache``: they neither bound the cache
in bytes with LRU eviction across processes nor checksum entries.  Here:

- entries are keyed by the object's identity (URL, ETag or version id, and
  size), so a changed object is never served from the cache;
- each entry is written to a temporary name and renamed into place (atomic
  for concurrent DataLoader workers and ranks), and carries a CRC-32 of its
  bytes and of where it belongs (object and block): a corrupt or truncated
  entry, or one copied or linked into another's place, is deleted and
  fetched again, never served.  A process trusts an entry without reading it
  when an extended attribute says it was checked as it is now (inode, size,
  mtime) within ``UNISTORE_CACHE_REVERIFY_SECONDS`` (a day); after that it
  is checked again, so bit rot that keeps the mtime is found too;
- the cache stays within ``max_bytes``: every writer reserves an entry's
  bytes in a usage count shared through a file (under a file lock) before
  writing it, and the writer that would push the total over budget first
  evicts the least recently used entries (a process's first use of an entry
  refreshes its atime) down to :data:`EVICT_TO` of the budget, so the next
  evictions are a tenth of the budget apart.  An entry deleted while a process maps it keeps its disk space
  until it is unmapped, so a process keeps at most 1/8 of the budget mapped
  entry by entry, maps an object's blocks side by side
  (:class:`MappedObject`) only when the whole object fits in the budget,
  and every so often lets go of objects some of whose blocks were evicted
  (:func:`sweep_mapped`).

>>> store = unistore.open_store("s3://bucket/run1.npy", cache="/scratch/unistore-cache")
>>> # or: export UNISTORE_CACHE_DIR=/scratch/unistore-cache  (UNISTORE_CACHE_BYTES, default 50 GiB)
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
import struct
import sys
import threading
import time
import uuid
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["DiskCache", "default_cache", "DEFAULT_CACHE_BYTES", "DEFAULT_BLOCK_BYTES"]

DEFAULT_CACHE_BYTES = 50 << 30
DEFAULT_BLOCK_BYTES = 2 << 20
#: missing blocks are fetched in requests of at most this many bytes
MAX_RUN_BYTES = 16 << 20
_TRAILER = struct.Struct("<QI")  # payload length, CRC-32
_LOCK_NAME = ".evict.lock"
#: the bytes held by entries, as the writers and the last eviction counted them (a shared estimate; each
#: eviction recounts it from the directory)
_USAGE_NAME = ".usage"
#: an eviction leaves the cache at this share of its budget
EVICT_TO = 0.9
#: lock files (a fixed pool) that let one process fetch or decode an entry while others wait for it
_LOCKS_DIR = ".producing"
_N_LOCKS = 4096
#: verified entries a process keeps mapped: at most this many, holding at most 1/``_MAPS_SHARE`` of the budget (an
#: entry evicted while mapped keeps its disk space until it is unmapped)
_MAX_MAPS = 4096
_MAPS_SHARE = 8


def default_cache(root: str | os.PathLike[str] | None = None) -> DiskCache | None:
    """The cache at ``root``, else the one named by ``$UNISTORE_CACHE_DIR`` (budget ``$UNISTORE_CACHE_BYTES``),
    or None when neither is given."""
    root = root or os.environ.get("UNISTORE_CACHE_DIR")
    if not root:
        return None
    return DiskCache(root, int(os.environ.get("UNISTORE_CACHE_BYTES", DEFAULT_CACHE_BYTES)))


class DiskCache:
    """Blocks of remote objects on local disk, bounded in bytes (see the module docstring).

    Picklable (its settings travel, not its state), so DataLoader workers and
    Dask tasks share the same directory.
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = DEFAULT_CACHE_BYTES,
                 block_bytes: int = int(os.environ.get("UNISTORE_CACHE_BLOCK_BYTES", DEFAULT_BLOCK_BYTES))):
        if max_bytes <= 0 or block_bytes <= 0:
            raise ValueError(f"max_bytes and block_bytes must be positive, got {max_bytes}, {block_bytes}")
        self.root = os.path.abspath(os.fspath(root))
        self.max_bytes = int(max_bytes)
        self.block_bytes = int(block_bytes)
        self._lock = threading.Lock()
        #: entries this process verified: path -> (inode, size, mtime), a read-only mapping of the payload
        self._maps: OrderedDict[str, tuple[tuple[int, int, int], memoryview]] = OrderedDict()
        self._mapped_bytes = 0

    def __getstate__(self) -> tuple[str, int, int]:
        return (self.root, self.max_bytes, self.block_bytes)

    def __setstate__(self, state: tuple[str, int, int]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DiskCache) and self.__getstate__() == other.__getstate__()

    def __hash__(self) -> int:
        return hash(self.__getstate__())

    def __repr__(self) -> str:
        return f"DiskCache({self.root!r}, max_bytes={self.max_bytes}, block_bytes={self.block_bytes})"

    # ------------------------------------------------------------- entries
    def _dir(self, identity: str) -> str:
        digest = hashlib.sha1(identity.encode()).hexdigest()
        return os.path.join(self.root, digest[:2], digest)

    def _get(self, path: str, want: int) -> Any:
        """An entry's payload, mapped read-only, if it is intact and ``want`` bytes long; a bad entry is deleted.

        An entry's CRC is checked over the mapping (no copy) the first time a
        process uses it, unless the file says (an extended attribute holding
        its inode, size and mtime) that it was written or checked as it is
        now; later uses of the same file take the mapping as it is, so hot
        blocks cost a page-cache lookup, and every process maps the same
        pages.  Use is recorded in the entry's atime (for LRU eviction); its
        mtime only changes if its bytes do, which makes every process check
        it again.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._maps.get(path)
            if known is not None and known[0] == stamp:
                self._maps.move_to_end(path)
                return known[1]
        view = None
        if st.st_size == want + _TRAILER.size:  # anything else is truncated or not this entry
            try:
                view = self._map(path, st.st_size)
            except (OSError, ValueError):
                return None
            n, crc = _TRAILER.unpack_from(view, want)
            view = view[:want]
            trusted = _verified(path, st)
            if n != want or (not trusted and self._crc(path, view) != crc):
                view = None
            elif not trusted:
                _mark_verified(path, st)
        if view is None:
            with contextlib.suppress(OSError):
                os.remove(path)  # corrupt or truncated: never served, fetched again
            return None
        with contextlib.suppress(OSError):
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))  # recently used
        return self._remember(path, stamp, view)

    def _crc(self, path: str, payload: Any) -> int:
        """CRC-32 of an entry's payload and of where it belongs (its path below the root: the object identity's
        digest and the block or chunk name), so an entry copied, linked or swapped into another's place fails its
        check like a corrupt one."""
        where = os.path.relpath(path, self.root).encode()
        return zlib.crc32(where, zlib.crc32(payload))

    def checked(self, path: str, want: int) -> tuple[int, int, int] | None:
        """The (inode, size, mtime) with which the entry at ``path`` was found intact (:meth:`_get`), or None."""
        if self._get(path, want) is None:
            return None
        with self._lock:
            known = self._maps.get(path)
        return None if known is None else known[0]

    def _remember(self, path: str, stamp: tuple[int, int, int], view: memoryview) -> memoryview:
        """Keep a verified entry's mapping for this process's later uses: the most recent ``_MAX_MAPS``, up to
        1/``_MAPS_SHARE`` of the budget (the latest one always)."""
        with self._lock:
            old = self._maps.pop(path, None)
            if old is not None:
                self._mapped_bytes -= old[1].nbytes
            self._maps[path] = (stamp, view)
            self._mapped_bytes += view.nbytes
            cap = self.max_bytes // _MAPS_SHARE
            while len(self._maps) > 1 and (len(self._maps) > _MAX_MAPS or self._mapped_bytes > cap):
                self._mapped_bytes -= self._maps.popitem(last=False)[1][1].nbytes
        return view

    @staticmethod
    def has(path: str, want: int) -> bool:
        """Whether an entry of the right length is there (no read: for read-ahead, whose reader checks it)."""
        try:
            return os.stat(path).st_size == want + _TRAILER.size
        except OSError:
            return False

    @staticmethod
    def _map(path: str, n: int) -> memoryview:
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(mapping)[:n]

    def _put(self, path: str, payload: Any) -> bool:
        """Write an entry (temporary name, then rename) within the budget; False when the disk refused it, or
        the entry alone is larger than the whole budget."""
        nbytes = len(payload) + _TRAILER.size
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if nbytes > self.max_bytes or not self._reserve(nbytes, tmp):
            return False
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
                f.write(_TRAILER.pack(len(payload), self._crc(path, payload)))
            _mark_verified(tmp)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            self._reserve(-nbytes)
            return False  # a full or read-only disk: the read still succeeds, uncached
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The cache-wide lock of eviction and of the usage count."""
        import fcntl

        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, _LOCK_NAME), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _usage(self, value: int | None = None) -> int | None:
        """Read (or, given ``value``, write) the shared usage count; None when there is none yet."""
        path = os.path.join(self.root, _USAGE_NAME)
        if value is not None:
            with open(path, "w") as f:
                f.write(str(max(int(value), 0)))
            return value
        try:
            with open(path) as f:
                return int(f.read() or 0)
        except (FileNotFoundError, ValueError):
            return None

    def _reserve(self, nbytes: int, tmp: str | None = None) -> bool:
        """Count ``nbytes`` more (fewer, when negative) in the cache; when that would pass the budget, evict the
        least recently used entries first, down to ``EVICT_TO`` of it.  ``tmp``, the temporary file the entry
        will be written to, is created under the same lock, so an eviction meanwhile sees the entry is on its
        way.  False when the lock, the count or the file cannot be written (a read-only cache directory)."""
        try:
            with self._locked():
                used = self._usage()
                if nbytes > 0 and (used is None or used + nbytes > self.max_bytes):
                    used = self._evict_locked(int(self.max_bytes * EVICT_TO) - nbytes, used)[0]
                if tmp is not None:
                    os.makedirs(os.path.dirname(tmp), exist_ok=True)
                    open(tmp, "wb").close()
                self._usage((used or 0) + nbytes)
        except OSError:
            return False
        return True

    # ------------------------------------------------------- whole entries
    def get_entry(self, identity: str, name: str, nbytes: int) -> memoryview | None:
        """The entry ``name`` of ``identity`` (exactly ``nbytes`` long) as a read-only mapping, or None.

        Every process that asks maps the same page-cache pages: decoded
        chunks kept here cost no anonymous memory, however many DataLoader
        workers read them.
        """
        view: memoryview | None = self._get(os.path.join(self._dir(identity), name), nbytes)
        return view

    def has_entry(self, identity: str, name: str, nbytes: int) -> bool:
        """Whether entry ``name`` of ``identity`` is there with the right length (not read or checked)."""
        return self.has(os.path.join(self._dir(identity), name), nbytes)

    def numbered_entries(self, identity: str) -> dict[int, int]:
        """``{number: inode}`` of the entries of ``identity`` named by a number (blocks, decoded chunks), as one
        listing finds them (not read or checked)."""
        found: dict[int, int] = {}
        with contextlib.suppress(OSError), os.scandir(self._dir(identity)) as entries:
            for e in entries:
                if e.name.isdigit():
                    found[int(e.name)] = e.inode()
        return found

    def holds_entries(self, identity: str, count: int) -> bool:
        """Whether entries ``"0"`` to ``str(count - 1)`` of ``identity`` are all there (listed, not read)."""
        return self.numbered_entries(identity).keys() >= set(range(count))

    def put_entry(self, identity: str, name: str, payload: Any) -> memoryview | None:
        """Keep ``payload`` (bytes-like) as entry ``name`` of ``identity``; returns its mapping, or None when the
        disk refused it (the caller keeps its own copy)."""
        path = os.path.join(self._dir(identity), name)
        payload = memoryview(payload).cast("B")
        if not self._put(path, payload):
            return None
        try:
            st = os.stat(path)
            view = self._map(path, len(payload))
        except (OSError, ValueError):
            return None
        return self._remember(path, (st.st_ino, st.st_size, st.st_mtime_ns), view)

    # ------------------------------------------------------- who produces
    def _lock_path(self, identity: str, name: str) -> str:
        digest = hashlib.sha1(f"{identity}/{name}".encode()).digest()
        return os.path.join(self.root, _LOCKS_DIR, str(int.from_bytes(digest[:4], "little") % _N_LOCKS))

    def claim(self, identity: str, names: list[str]) -> tuple[list[str], list[str], list[Any]]:
        """Split missing entries into ``(mine, others, token)`` so that one process fetches each.

        ``mine``: entries the caller now produces, each under an exclusive
        file lock (any process, any thread) until :meth:`release` of
        ``token``; ``others``: entries someone is producing right now, to be
        awaited with :meth:`wait` once the caller has released its own.
        Locks are ``flock`` on a fixed pool of files, released by the kernel
        if the holder dies; two entries sharing a lock file only cost a wait.
        """
        import fcntl

        mine: list[str] = []
        others: list[str] = []
        token: list[Any] = []
        try:
            os.makedirs(os.path.join(self.root, _LOCKS_DIR), exist_ok=True)
        except OSError:
            return list(names), [], token  # no lock directory: produce everything, as without a cache
        held = _held_here()
        for name in names:
            path = self._lock_path(identity, name)
            if path in held:
                # this thread holds that lock already (two entries sharing a lock file, or an entry produced
                # while producing another: a chunk's bytes read while decoding it): it produces this one too
                mine.append(name)
                continue
            try:
                f = open(path, "a")
            except OSError:
                mine.append(name)
                continue
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                others.append(name)
            else:
                mine.append(name)
                token.append(f)
                held.add(path)
                _HELD.add(f)
        return mine, others, token

    def produce(self, identity: str, names: list[str], present: Callable[[str], bool],
                make: Callable[[list[str]], None], wait: bool = True) -> None:
        """Make entries ``names`` of ``identity`` exist, each made by one process or thread only.

        ``make(names)`` fetches or decodes and keeps entries; it is called for
        entries this caller claimed that ``present(name)`` does not find (they
        may have appeared since the caller looked).  Entries someone else is
        making are awaited, then looked for again, and claimed in turn if
        they are still missing (their maker failed, or only shared a lock).
        ``wait=False`` (read-ahead) leaves those to their maker and returns:
        the reader that needs them waits, if it gets there first.
        """
        pending = list(names)
        while pending:
            mine, others, token = self.claim(identity, pending)
            try:
                todo = [name for name in mine if not present(name)]
                if todo:
                    make(todo)
            finally:
                self.release(token)
            pending = []
            if not wait:
                return
            for name in others:
                self.wait(identity, name)
                if not present(name):
                    pending.append(name)

    @staticmethod
    def release(token: list[Any]) -> None:
        """Give up the claims of :meth:`claim` (after the entries are written, or on failure)."""
        held = _held_here()
        for f in token:
            _HELD.discard(f)
            held.discard(f.name)
            f.close()  # closing the file drops its flock
        token.clear()

    def wait(self, identity: str, name: str) -> None:
        """Block until nobody is producing entry ``name`` of ``identity``."""
        import fcntl

        path = self._lock_path(identity, name)
        if path in _held_here():
            return  # this thread is the producer: nobody else is
        try:
            with open(path, "a") as f:
                _HELD.add(f)
                try:
                    fcntl.flock(f, fcntl.LOCK_SH)
                finally:
                    _HELD.discard(f)
        except OSError:
            pass

    # ------------------------------------------------------------- reads
    def read_ranges(self, identity: str, size: int, starts: np.ndarray, ends: np.ndarray,
                    fetch: Callable[[np.ndarray, np.ndarray], list[bytes]]) -> tuple[list[bytes], dict[str, int]]:
        """Bytes ``[starts[i], ends[i])`` of the object ``identity`` (``size`` bytes long).

        ``fetch(starts, ends)`` reads byte ranges remotely; it is called once,
        for the missing blocks (neighbours merged).  Returns the ranges and
        ``{"hits", "misses", "bytes_local", "bytes_remote"}`` (blocks and bytes).
        """
        blocks, counts = self._fill(identity, size, starts, ends, fetch)
        out = [self._slice(blocks, s, e) for s, e in zip(starts.tolist(), ends.tolist())]
        return out, counts

    def blocks(self, identity: str, size: int, starts: np.ndarray, ends: np.ndarray,
               fetch: Callable[[np.ndarray, np.ndarray], list[bytes]]) -> tuple[dict[int, Any], dict[str, int]]:
        """The blocks holding the ranges, ``{block number: payload}`` (mapped when cached), and the counts of
        :meth:`read_ranges`: for readers that slice them themselves."""
        return self._fill(identity, size, starts, ends, fetch)

    def ensure(self, identity: str, size: int, starts: np.ndarray, ends: np.ndarray,
               fetch: Callable[[np.ndarray, np.ndarray], list[bytes]]) -> dict[str, int]:
        """Make sure the blocks holding the ranges are cached, fetching only those that are not (read-ahead).

        Nothing is assembled or returned but the counts of :meth:`read_ranges`;
        cached blocks are only looked at (the reader that uses them checks them).
        """
        return self._fill(identity, size, starts, ends, fetch, check=False)[1]

    def _fill(self, identity: str, size: int, starts: np.ndarray, ends: np.ndarray,
              fetch: Callable[[np.ndarray, np.ndarray], list[bytes]],
              check: bool = True) -> tuple[dict[int, Any], dict[str, int]]:
        """The blocks holding the ranges (``{number: payload}``): cached ones as they are, missing ones fetched
        in merged runs and kept.  ``check=False`` only looks for cached blocks (and returns none of them)."""
        bs = self.block_bytes
        wanted = blocks_of(starts, ends, bs)
        folder = self._dir(identity)
        blocks: dict[int, Any] = {}
        missing = []
        for b in wanted.tolist():
            path, want = os.path.join(folder, str(b)), min(bs, size - b * bs)
            if not check:
                if not self.has(path, want):
                    missing.append(b)
                continue
            payload = self._get(path, want)
            if payload is None:
                missing.append(b)
            else:
                blocks[b] = payload
        local = sum(len(p) for p in blocks.values())  # payloads (bytes or mapped views)
        remote = 0

        def fetch_blocks(numbers: list[int]) -> None:
            nonlocal remote
            if not numbers:
                return
            run_starts, run_ends = _runs(np.array(numbers, dtype=np.int64), bs, size, max(1, MAX_RUN_BYTES // bs))
            for rs, blob in zip(run_starts.tolist(), fetch(run_starts, run_ends)):
                remote += len(blob)
                blocks.update(self.store(identity, rs, blob))

        if missing:
            def present(name: str) -> bool:
                path, want = os.path.join(folder, name), min(bs, size - int(name) * bs)
                if not check:
                    return self.has(path, want)
                payload = self._get(path, want)
                if payload is not None:
                    blocks[int(name)] = payload
                return payload is not None

            # blocks another process (or thread) is fetching right now are awaited (a read-ahead leaves them
            # to it), not fetched again
            self.produce(identity, [str(b) for b in missing], present,
                         lambda names: fetch_blocks(sorted(int(n) for n in names)), wait=check)
        return blocks, {"hits": len(wanted) - len(missing), "misses": len(missing), "bytes_local": local,
                        "bytes_remote": remote}

    def _slice(self, blocks: dict[int, Any], start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` out of the blocks holding them."""
        bs = self.block_bytes
        b0, b1 = start // bs, (max(end, start + 1) - 1) // bs
        at = b0 * bs
        if b0 == b1:
            return bytes(blocks[b0][start - at:end - at])
        return b"".join(blocks[b] for b in range(b0, b1 + 1))[start - at:end - at]

    def store(self, identity: str, block_start: int, blob: bytes) -> dict[int, memoryview]:
        """Keep ``blob``, fetched from block-aligned offset ``block_start``, as cache blocks; returns them (views
        of ``blob``, not copies)."""
        bs = self.block_bytes
        folder = self._dir(identity)
        view = memoryview(blob)
        kept = {}
        for off in range(0, len(blob), bs):
            b = (block_start + off) // bs
            kept[b] = view[off:off + bs]
            self._put(os.path.join(folder, str(b)), kept[b])
        return kept

    # ------------------------------------------------------------- upkeep
    def _files(self) -> Iterator[os.DirEntry[str]]:
        """Every file in the objects' folders: entries, and entries being written (temporary names)."""
        if not os.path.isdir(self.root):
            return
        for top in os.scandir(self.root):
            if not top.is_dir():
                continue
            for obj in os.scandir(top.path):
                if obj.is_dir():
                    yield from (e for e in os.scandir(obj.path) if e.is_file())

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        return (e for e in self._files() if ".tmp-" not in e.name)

    def info(self) -> dict[str, Any]:
        """``{"root", "entries", "bytes", "max_bytes", "block_bytes", "objects"}`` of the cache as it is now."""
        sizes: dict[str, int] = {}
        for e in self._entries():
            with contextlib.suppress(FileNotFoundError):  # evicted by another process while listed
                sizes[e.path] = e.stat().st_size
        return {"root": self.root, "entries": len(sizes), "bytes": sum(sizes.values()),
                "max_bytes": self.max_bytes, "block_bytes": self.block_bytes,
                "objects": len({os.path.dirname(p) for p in sizes})}

    def evict(self) -> int:
        """Delete least recently used entries until the cache is within ``max_bytes``; returns bytes freed."""
        with self._locked():
            held, freed = self._evict_locked(self.max_bytes, self._usage())
            self._usage(held)
        return freed

    def _evict_locked(self, target: int, used: int | None = None) -> tuple[int, int]:
        """Delete least recently used entries until at most ``target`` bytes remain (the lock held); returns the
        bytes counted as held afterwards and the bytes freed.

        Entries being written right now (reserved in ``used`` but not yet in
        place) count too: while any temporary file is there, the part of
        ``used`` the directory does not show is taken to be theirs.
        """
        stats, writing = [], False
        for e in self._files():
            if ".tmp-" in e.name:
                writing = True
                continue
            with contextlib.suppress(FileNotFoundError):
                st = e.stat()
                stats.append((st.st_atime_ns, st.st_size, e.path))
        total = sum(s for _, s, _ in stats)
        pending = max(0, (used or 0) - total) if writing else 0
        freed = 0
        for _, nbytes, path in sorted(stats):
            if total - freed + pending <= target:
                break
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                freed += nbytes
        return total - freed + pending, freed

    def clear(self) -> int:
        """Delete every entry, and the folders and lock files that held them; returns bytes freed.

        A process producing an entry meanwhile keeps its own lock; one that
        starts producing the same entry after the clear may fetch it again.
        """
        freed = 0
        for e in list(self._entries()):
            with contextlib.suppress(FileNotFoundError):
                freed += e.stat().st_size
                os.remove(e.path)
        if os.path.isdir(self.root):
            for top in os.scandir(self.root):
                if top.is_dir():
                    for leftover in (os.path.join(top.path, name) for name in os.listdir(top.path)):
                        with contextlib.suppress(OSError):
                            (os.remove if top.name == _LOCKS_DIR else os.rmdir)(leftover)
                    with contextlib.suppress(OSError):
                        os.rmdir(top.path)
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.root, _USAGE_NAME))  # recounted from the directory when next written
        return freed


class MappedObject:
    """One remote object's cached blocks mapped side by side into one address range of this process.

    The range (the object's size, rounded up to whole blocks) is reserved
    without access; each block, once this process has found it intact in
    the cache (:meth:`DiskCache._get`), is mapped over its place read-only
    (``MAP_FIXED``).  Rows whose blocks are all in place are then gathered
    with one fancy index over :attr:`buffer`, as from a local ``memmap``,
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
        #: who holds this object in its ``mapped`` attribute (a weak reference to a Location), if anyone
        self.holder: Any = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        with _BUDGET_LOCK:
            _LIVE.add(self)

    @classmethod
    def create(cls, cache: DiskCache, identity: str, size: int) -> MappedObject | None:
        """Reserve the range for an object of ``size`` bytes; None where that cannot be done here, or when
        this process already maps :data:`MAX_MAPPED_BLOCKS` blocks (each block is one kernel mapping, and
        a process may hold about 65,000: a larger cache block, ``UNISTORE_CACHE_BLOCK_BYTES``, maps more)."""
        libc = _libc()
        if libc is None or size <= 0 or cache.block_bytes % mmap.PAGESIZE or size > cache.max_bytes:
            return None  # a larger object has blocks evicted while mapped, and each keeps its disk space
        nblocks = -(-size // cache.block_bytes)
        with _BUDGET_LOCK:
            if _MAPPED[0] + nblocks > MAX_MAPPED_BLOCKS:
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
        if holder is not None and holder.mapped is self:
            holder.mapped = None

    def add_cached(self) -> None:
        """Map in place every block of the object the cache holds now (for a process about to start workers,
        which inherit the mapping instead of each making its own; it lets go of its own once they have
        started, see :func:`~unistore.storage.engine.release_mapped`)."""
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
        due = _SWEEP[0] >= max(cache.block_bytes, cache.max_bytes // _MAPS_SHARE)
        if due:
            _SWEEP[0] = 0
    if due:
        sweep_mapped()


#: blocks one process maps side by side at most, over all its objects (half the kernel's default limit on a
#: process's mappings, ``vm.max_map_count``); objects beyond it are read block by block
MAX_MAPPED_BLOCKS = 32768
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


#: lock files this process has open: a forked child (a DataLoader worker) would otherwise hold their locks,
#: shared with the parent's open file, for as long as it lives
_HELD: set[Any] = set()


#: per thread, the lock files it holds claims on (by path): a thread never waits on a lock it holds
_HELD_HERE = threading.local()


def _held_here() -> set[str]:
    held: set[str] | None = getattr(_HELD_HERE, "paths", None)
    if held is None:
        held = _HELD_HERE.paths = set()
    return held


def _close_inherited_locks() -> None:
    for f in list(_HELD):
        with contextlib.suppress(OSError):
            f.close()  # the child's copy only: the parent's claim stands until the parent releases it
    _HELD.clear()
    _held_here().clear()


os.register_at_fork(after_in_child=_close_inherited_locks)

_VERIFIED = "user.unistore.verified"
#: an entry's "checked" mark is trusted for this long; then its CRC is checked again (bit rot keeps the mtime)
REVERIFY_SECONDS = float(os.environ.get("UNISTORE_CACHE_REVERIFY_SECONDS", 24 * 3600))


def _stamp(path: str, st: os.stat_result) -> bytes:
    """What a "checked" mark vouches for: this file (inode, size, mtime) at this place (its name and folder)."""
    place = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path).split(".tmp-")[0])
    return f"v2:{place}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()


def _verified(path: str, st: os.stat_result) -> bool:
    """Whether the entry was written or CRC-checked with exactly this inode, size and mtime at this place, recently
    enough (:data:`REVERIFY_SECONDS`) to trust it without reading it (a file moved or linked elsewhere is not)."""
    try:
        mark = os.getxattr(path, _VERIFIED)
    except OSError:  # no mark, or a filesystem without user extended attributes: check the CRC
        return False
    stamp, _, when = mark.rpartition(b"@")
    try:
        return stamp == _stamp(path, st) and time.time() - float(when) < REVERIFY_SECONDS
    except ValueError:
        return False


def _mark_verified(path: str, st: os.stat_result | None = None) -> None:
    with contextlib.suppress(OSError):
        os.setxattr(path, _VERIFIED, _stamp(path, st or os.stat(path)) + f"@{int(time.time())}".encode())


def blocks_of(starts: np.ndarray, ends: np.ndarray, bs: int) -> np.ndarray:
    """Sorted unique numbers of the blocks that byte ranges ``[starts, ends)`` touch."""
    if not len(starts):
        return np.zeros(0, np.int64)
    first = starts // bs
    last = (np.maximum(ends, starts + 1) - 1) // bs
    if int((last - first).max()) <= 1:  # rows smaller than a block: each touches one or two
        return np.unique(np.concatenate([first, last]))
    return np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first.tolist(), last.tolist())]))


def _runs(blocks: np.ndarray, bs: int, size: int, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges covering consecutive runs of block numbers (sorted, unique), ``max_blocks`` at most each."""
    new = np.ones(len(blocks), dtype=bool)
    new[1:] = np.diff(blocks) != 1
    run_id = np.cumsum(new) - 1
    pos = np.arange(len(blocks)) - np.flatnonzero(new)[run_id]  # position within its run
    new |= pos % max_blocks == 0
    firsts = blocks[new]
    lasts = blocks[np.append(np.flatnonzero(new)[1:], len(blocks)) - 1]
    return firsts * bs, np.minimum((lasts + 1) * bs, size)
