"""What a killed process leaves behind, found and removed by the next one.

Every temporary entry unistore makes carries its owner's process id in its
name: a conversion's spill folder (``$TMPDIR/unistore-convert-<pid>-*``), a
store's staging entry beside its destination
(``.<name>.unistore-tmp-<pid>-<token>``) or in ``$TMPDIR`` for remote stores
(``unistore-<pid>-*``), a replaced store on its way out
(``<name>.unistore-old-<pid>-<token>``), a credential hand-off file. A
``kill -9`` leaves them; the next process that makes one of the same kind in
the same folder removes those whose owner is gone.
"""

from __future__ import annotations

import os
import re
import shutil

__all__ = ["owner_alive", "sweep", "OWNED"]

#: names of owned temporary entries; group 1 is the owner's pid
OWNED = re.compile(r"^(?:unistore-convert-|unistore-|\..+\.unistore-tmp-|.+\.unistore-old-)(\d+)-[0-9a-zA-Z_]+$")


def owner_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(folder: str, pattern: re.Pattern[str] = OWNED) -> list[str]:
    """Remove the entries of ``folder`` matching ``pattern`` whose owner process is gone; returns their paths.

    Never raises: a folder that cannot be listed, or an entry another process
    removes first, is left alone.
    """
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match is None or owner_alive(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
        except OSError:
            continue
    return removed
