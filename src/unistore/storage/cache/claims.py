"""Claims: one process (or thread) fetches or decodes a cache entry while the others wait for it.

A claim is an exclusive ``flock`` on one file of a fixed pool below the cache
root, released by the kernel if its holder dies.  A forked child closes its
copies of the parent's lock files at once (an inherited copy would hold the
parent's claim for as long as the child lives).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from unistore.storage import budget

__all__ = ["Claims", "LOCKS_DIR"]

#: the folder below the cache root holding the pool of lock files
LOCKS_DIR = ".producing"


class Claims:
    """The claim methods of :class:`~unistore.storage.cache.DiskCache` (which holds ``root``)."""

    root: str

    # ------------------------------------------------------- who produces
    def _lock_path(self, identity: str, name: str) -> str:
        digest = hashlib.sha1(f"{identity}/{name}".encode()).digest()
        return os.path.join(self.root, LOCKS_DIR, str(int.from_bytes(digest[:4], "little") % budget.N_LOCKS))

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
            os.makedirs(os.path.join(self.root, LOCKS_DIR), exist_ok=True)
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

    def producing(self, identity: str, names: list[str], present: Callable[[str], bool],
                  wait: bool = True) -> Iterator[list[str]]:
        """Yield, each time, entries of ``names`` the caller must make now, until every one of them exists; each
        entry is made by one process or thread only.

        The caller makes (fetches or decodes and keeps) what is yielded, inside
        its loop: the calls go down from the caller, none come back up.  What
        is yielded is claimed and not found by ``present(name)`` (it may have
        appeared since the caller looked); the claims are released when the
        loop asks for more.  Entries someone else is making are awaited, then
        looked for again, and claimed in turn if they are still missing (their
        maker failed, or only shared a lock).  ``wait=False`` (read-ahead)
        does not wait: once its own are made it tries those others once more,
        without blocking, and makes the ones still missing whose lock is free
        by then (the lock was only shared with another entry, made meanwhile);
        the rest it leaves to their maker.

        >>> for todo in cache.producing(identity, missing, present):
        ...     fetch_and_keep(todo)
        """
        pending = list(names)
        tries = 2  # without waiting: the names first, then once more those whose lock was held
        while pending:
            mine, others, token = self.claim(identity, pending)
            try:
                todo = [name for name in mine if not present(name)]
                if todo:
                    yield todo
            finally:
                self.release(token)
            pending = []
            if not wait:
                tries -= 1
                pending = [name for name in others if tries and not present(name)]
                continue
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
