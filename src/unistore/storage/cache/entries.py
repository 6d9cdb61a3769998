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
  for concurrent DataLoader workers and ranks), and carries a checksum
  (XXH3-64: 10 GB/s here, where zlib's CRC-32 takes 2.2) of its bytes and
  of where it belongs (object and block): a corrupt or truncated entry, or
  one copied or linked into another's place, is deleted and fetched again,
  never served.  A process trusts an entry without reading it
  when an extended attribute says it was checked as it is now (inode, size,
  mtime) within ``UNISTORE_CACHE_REVERIFY_SECONDS`` (a day); after that it
  is checked again, so bit rot that keeps the mtime is found too;
- the cache stays within ``max_bytes``: every writer reserves an entry's
  bytes in a usage count shared through a file (under a file lock) before
  writing it, and the writer that would push the total over budget first
  evicts the least recently used entries (a process's first use of an entry
  refreshes its atime) down to :data:`~unistore.storage.budget.EVICT_TO` of the budget, so the next
  evictions are a tenth of the budget apart.  An entry deleted while a process maps it keeps its disk space
  until it is unmapped, so a process keeps at most 1/8 of the budget mapped
  entry by entry, maps an object's blocks side by side
  (:class:`~unistore.storage.cache.mapping.MappedObject`) only when the whole object fits in the budget,
  and every so often lets go of objects some of whose blocks were evicted
  (:func:`~unistore.storage.cache.mapping.sweep_mapped`).

>>> store = unistore.open_store("s3://bucket/run1.npy", cache="/scratch/unistore-cache")
>>> # or: export UNISTORE_CACHE_DIR=/scratch/unistore-cache  (UNISTORE_CACHE_BYTES, default 50 GiB)
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import numpy as np
import xxhash

from unistore.storage import budget
from unistore.storage.cache.claims import LOCKS_DIR, Claims
from unistore.storage.plan import block_runs, blocks_of

__all__ = ["DiskCache", "EntryFile", "BlockWriter", "CacheRefusedError", "default_cache"]

#: payload length, checksum (:meth:`DiskCache._checksum`); an entry with another trailer (another length) is not
#: this entry, and is fetched again
_TRAILER = struct.Struct("<QQ")
_LOCK_NAME = ".evict.lock"
#: the bytes held by entries, as the writers and the last eviction counted them (a shared estimate; each
#: eviction recounts it from the directory)
_USAGE_NAME = ".usage"


def default_cache(root: str | os.PathLike[str] | None = None) -> DiskCache | None:
    """The cache at ``root``, else the one named by ``$UNISTORE_CACHE_DIR`` (budget ``$UNISTORE_CACHE_BYTES``),
    or None when neither is given."""
    root = root or os.environ.get("UNISTORE_CACHE_DIR")
    if not root:
        return None
    return DiskCache(root, int(os.environ.get("UNISTORE_CACHE_BYTES", budget.DEFAULT_CACHE_BYTES)))


class DiskCache(Claims):
    """Blocks of remote objects on local disk, bounded in bytes (see the module docstring).

    Picklable (its settings travel, not its state), so DataLoader workers and
    Dask tasks share the same directory.
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = budget.DEFAULT_CACHE_BYTES,
                 block_bytes: int | None = None):
        if max_bytes <= 0 or (block_bytes is not None and block_bytes <= 0):
            raise ValueError(f"max_bytes and block_bytes must be positive, got {max_bytes}, {block_bytes}")
        self.root = os.path.abspath(os.fspath(root))
        self.max_bytes = int(max_bytes)
        self.block_bytes = int(block_bytes or budget.BLOCK_BYTES)
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

        An entry's checksum is checked over the mapping (no copy) the first time a
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
            n, checksum = _TRAILER.unpack_from(view, want)
            view = view[:want]
            trusted = _verified(path, st)
            if n != want or (not trusted and self._checksum(path, view) != checksum):
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

    def _checksum(self, path: str, payload: Any) -> int:
        """XXH3-64 of an entry's payload and of where it belongs (its path below the root: the object identity's
        digest and the block or chunk name), so an entry copied, linked or swapped into another's place fails its
        check like a corrupt one."""
        return self._seal(path, xxhash.xxh3_64(payload))

    def _seal(self, path: str, hasher: Any) -> int:
        """:meth:`_checksum` from a hasher that has taken the payload (piece by piece, as it was written)."""
        hasher.update(os.path.relpath(path, self.root).encode())
        return hasher.intdigest()

    def checked(self, path: str, want: int) -> tuple[int, int, int] | None:
        """The (inode, size, mtime) with which the entry at ``path`` was found intact (:meth:`_get`), or None."""
        if self._get(path, want) is None:
            return None
        with self._lock:
            known = self._maps.get(path)
        return None if known is None else known[0]

    def _remember(self, path: str, stamp: tuple[int, int, int], view: memoryview) -> memoryview:
        """Keep a verified entry's mapping for this process's later uses: the most recent ``budget.MAX_MAPS``, up to
        1/``budget.MAPS_SHARE`` of the budget (the latest one always)."""
        with self._lock:
            old = self._maps.pop(path, None)
            if old is not None:
                self._mapped_bytes -= old[1].nbytes
            self._maps[path] = (stamp, view)
            self._mapped_bytes += view.nbytes
            cap = self.max_bytes // budget.MAPS_SHARE
            while len(self._maps) > 1 and (len(self._maps) > budget.MAX_MAPS or self._mapped_bytes > cap):
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
        try:
            entry = EntryFile(self, path, len(payload))
            entry.write(payload)
            entry.seal()
        except CacheRefusedError:
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
            # rewritten in place at a fixed width: truncating would free and reallocate the file's block on every
            # entry written (dear on a filesystem mounted with ``discard``)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, f"{max(int(value), 0):>20}\n".encode(), 0)
            finally:
                os.close(fd)
            return value
        try:
            with open(path) as f:
                return int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return None

    def _reserve(self, nbytes: int, tmp: str | None = None) -> bool:
        """Count ``nbytes`` more (fewer, when negative) in the cache; when that would pass the budget, evict the
        least recently used entries first, down to :data:`~unistore.storage.budget.EVICT_TO` of it.  ``tmp``, the
        temporary file the entry will be written to, is created under the same lock, so an eviction meanwhile
        sees the entry is on its way.  False when the lock, the count or the file cannot be written (a read-only
        cache directory)."""
        try:
            with self._locked():
                used = self._usage()
                if nbytes > 0 and (used is None or used + nbytes > self.max_bytes):
                    used = self._evict_locked(int(self.max_bytes * budget.EVICT_TO) - nbytes, used)[0]
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

    # ------------------------------------------------------------- reads
    def read_ranges(self, identity: str, size: int, starts: np.ndarray, ends: np.ndarray,
                    fetch: Callable[[np.ndarray, np.ndarray], list[bytes]]) -> tuple[list[bytes], dict[str, int]]:
        """Bytes ``[starts[i], ends[i])`` of the object ``identity`` (``size`` bytes long).

        ``fetch(starts, ends)`` reads byte ranges of the object from where it
        lives (the byte source this cache wraps); it is called for the
        missing blocks only (neighbours merged).  Returns the ranges and
        ``{"hits", "misses", "bytes_local", "bytes_remote"}`` (blocks and bytes).
        """
        blocks, counts = self.blocks(identity, size, starts, ends, fetch)
        out = [self._slice(blocks, s, e) for s, e in zip(starts.tolist(), ends.tolist())]
        return out, counts

    def ensure(self, identity: str, size: int, starts: np.ndarray, ends: np.ndarray,
               stream: Callable[[int, int, BlockWriter], int]) -> dict[str, int]:
        """Make sure the blocks holding the ranges are cached, fetching only those that are not (read-ahead).

        ``stream(start, end, writer)`` hands the bytes of a run of missing
        blocks to ``writer`` (a :class:`BlockWriter`) as they arrive and
        returns how many it received: each block goes to its file straight
        from the pieces received, with no buffer holding the run.  Nothing is
        assembled or returned but the counts of :meth:`read_ranges`; cached
        blocks are only looked at (the reader that uses them checks them),
        and blocks another process or thread is fetching are left to it.
        """
        wanted, missing, present = self._look(identity, size, starts, ends, None)
        remote = 0
        for todo in self.producing(identity, missing, present, wait=False):
            for rs, re in zip(*(r.tolist() for r in self._runs(todo, size))):
                remote += stream(rs, re, BlockWriter(self, identity, size, rs, re))
        return {"hits": wanted - len(missing), "misses": len(missing), "bytes_local": 0, "bytes_remote": remote}

    def blocks(self, identity: str, size: int, starts: np.ndarray, ends: np.ndarray,
               fetch: Callable[[np.ndarray, np.ndarray], list[bytes]]) -> tuple[dict[int, Any], dict[str, int]]:
        """The blocks holding the ranges, ``{block number: payload}`` (mapped when cached; fetched with ``fetch``
        in merged runs and kept when missing; awaited when another process or thread is fetching them), and the
        counts of :meth:`read_ranges`: for readers that slice them themselves."""
        blocks: dict[int, Any] = {}
        wanted, missing, present = self._look(identity, size, starts, ends, blocks)
        local = sum(len(p) for p in blocks.values())  # payloads (bytes or mapped views)
        remote = 0
        for todo in self.producing(identity, missing, present):
            run_starts, run_ends = self._runs(todo, size)
            for rs, blob in zip(run_starts.tolist(), fetch(run_starts, run_ends)):
                remote += len(blob)
                blocks.update(self.store(identity, rs, blob))
        return blocks, {"hits": wanted - len(missing), "misses": len(missing), "bytes_local": local,
                        "bytes_remote": remote}

    def _look(self, identity: str, size: int, starts: np.ndarray, ends: np.ndarray, found: dict[int, Any] | None,
              ) -> tuple[int, list[str], Callable[[str], bool]]:
        """How many blocks hold the ranges, the names of those missing, and the test of whether a block is in
        place: which maps and checks it into ``found`` when given, else only looks for a file of its length."""
        bs = self.block_bytes
        wanted = blocks_of(starts, ends, bs).tolist()
        folder = self._dir(identity)

        def present(name: str) -> bool:
            path, want = os.path.join(folder, name), min(bs, size - int(name) * bs)
            if found is None:
                return self.has(path, want)
            payload = self._get(path, want)
            if payload is not None:
                found[int(name)] = payload
            return payload is not None

        return len(wanted), [str(b) for b in wanted if not present(str(b))], present

    def _runs(self, names: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
        """The byte ranges of runs of consecutive blocks ``names``, each at most ``budget.MAX_RUN_BYTES``."""
        bs = self.block_bytes
        numbers = np.array(sorted(int(n) for n in names), dtype=np.int64)
        return block_runs(numbers, bs, size, max(1, budget.MAX_RUN_BYTES // bs))

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
                            (os.remove if top.name == LOCKS_DIR else os.rmdir)(leftover)
                    with contextlib.suppress(OSError):
                        os.rmdir(top.path)
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.root, _USAGE_NAME))  # recounted from the directory when next written
        return freed


class CacheRefusedError(Exception):
    """The disk cache could not take an entry (a full or read-only disk, or an entry larger than the budget)."""


class EntryFile:
    """One entry being written, whole or piece by piece: a temporary file reserved in the budget, its checksum taken
    as the bytes go in, then sealed (trailer, "checked" mark) and renamed into place by :meth:`seal`.  Every failure
    leaves nothing behind (no file, no reservation) and raises :class:`CacheRefusedError`."""

    def __init__(self, cache: DiskCache, path: str, want: int):
        self.cache, self.path, self.want = cache, path, want
        self.written = 0
        self._hasher = xxhash.xxh3_64()
        self._reserved = nbytes = want + _TRAILER.size
        self._tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if nbytes > cache.max_bytes or not cache._reserve(nbytes, self._tmp):
            raise CacheRefusedError(f"the disk cache at {cache.root} has no room for an entry of {nbytes} bytes")
        try:
            # created empty by ``_reserve``, opened without O_TRUNC: ext4 writes a truncated file back as it is
            # closed (its ``auto_da_alloc``), a synchronous cost on every entry
            self._file: Any = open(os.open(self._tmp, os.O_WRONLY | os.O_CREAT, 0o644), "wb")
        except OSError as e:
            self._file = None
            self._refused(e)

    def write(self, piece: Any) -> None:
        """Append ``piece`` (at most the bytes still missing)."""
        try:
            self._file.write(piece)
        except OSError as e:
            self._refused(e)
        self._hasher.update(piece)
        self.written += len(piece)

    def seal(self) -> None:
        """The entry is whole: its trailer, its mark, and into place."""
        try:
            self._file.write(_TRAILER.pack(self.want, self.cache._seal(self.path, self._hasher)))
            self._file.close()
            self._file = None
            _mark_verified(self._tmp)
            os.replace(self._tmp, self.path)
        except OSError as e:
            self._refused(e)
        self._reserved = 0  # the entry in place holds it now

    def discard(self) -> None:
        """Drop the entry: its temporary file and its reservation."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            os.remove(self._tmp)
        if self._reserved:
            self.cache._reserve(-self._reserved)
            self._reserved = 0

    def _refused(self, e: OSError) -> NoReturn:
        self.discard()
        raise CacheRefusedError(f"the disk cache at {self.cache.root} refused an entry ({e})") from None


class BlockWriter:
    """Writes the blocks of one run ``[start, end)`` of an object (block-aligned, or ending at the object's end)
    as its bytes arrive, each an :class:`EntryFile` put in place once whole.  Blocks completed stay in place
    when the stream fails; :meth:`begin` restarts at the first block not yet in place, so a retry fetches only
    what is missing.
    """

    def __init__(self, cache: DiskCache, identity: str, size: int, start: int, end: int):
        self.cache, self.size, self.end = cache, size, end
        self.folder = cache._dir(identity)
        #: the first byte of the first block not yet in place
        self.done = start
        self._pos = start
        self._entry: EntryFile | None = None

    def begin(self) -> int:
        """Start (again) at the first block not yet in place, dropping a block left half-written; returns its
        offset in the object."""
        self.discard()
        self._pos = self.done
        return self.done

    def write(self, piece: Any) -> None:
        """Write the next bytes of the run.

        Raises:
            CacheRefusedError: the cache cannot take the block (nothing of it is left behind).
            ShortReadError: more bytes than the run holds.
        """
        view = memoryview(piece).cast("B")
        if self._pos + len(view) > self.end:
            from unistore.storage.location import ShortReadError

            raise ShortReadError(f"asked {self.end - self.done} bytes at {self.done}, got more")
        bs = self.cache.block_bytes
        while len(view):
            entry = self._entry
            if entry is None:
                block = self._pos // bs
                entry = self._entry = EntryFile(self.cache, os.path.join(self.folder, str(block)),
                                                min(bs, self.size - block * bs))
            part = view[:entry.want - entry.written]
            try:
                entry.write(part)
                whole = entry.written == entry.want
                if whole:
                    entry.seal()
            except CacheRefusedError:
                self._entry = None
                raise
            self._pos += len(part)
            view = view[len(part):]
            if whole:
                self._entry = None
                self.done = self._pos

    def finish(self) -> None:
        """Check that the whole run arrived.

        Raises:
            ShortReadError: the stream ended early (retried; the blocks completed stay).
        """
        if self.done != self.end:
            from unistore.storage.location import ShortReadError

            at = self._pos
            self.discard()
            raise ShortReadError(f"asked {self.end - at} more bytes at {at}, the stream ended")

    def discard(self) -> None:
        """Drop a block left half-written (its temporary file and its reservation)."""
        if self._entry is not None:
            self._entry.discard()
            self._entry = None


_VERIFIED = "user.unistore.verified"


def _stamp(path: str, st: os.stat_result) -> bytes:
    """What a "checked" mark vouches for: this file (inode, size, mtime) at this place (its name and folder)."""
    place = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path).split(".tmp-")[0])
    return f"v2:{place}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()


def _verified(path: str, st: os.stat_result) -> bool:
    """Whether the entry was written or checked with exactly this inode, size and mtime at this place, recently
    enough (:data:`~unistore.storage.budget.REVERIFY_SECONDS`) to trust it without reading it (a file moved or
    linked elsewhere is not)."""
    try:
        mark = os.getxattr(path, _VERIFIED)
    except OSError:  # no mark, or a filesystem without user extended attributes: check the checksum
        return False
    stamp, _, when = mark.rpartition(b"@")
    try:
        return stamp == _stamp(path, st) and time.time() - float(when) < budget.REVERIFY_SECONDS
    except ValueError:
        return False


def _mark_verified(path: str, st: os.stat_result | None = None) -> None:
    with contextlib.suppress(OSError):
        os.setxattr(path, _VERIFIED, _stamp(path, st or os.stat(path)) + f"@{int(time.time())}".encode())
