"""Credentials that never leave the machine in a pickle or a log line.

A pickled :class:`~unistore.storage.location.Location` carries its
``storage_options`` *without* their secrets (any string value whose key
contains ``secret``, ``token``, ``password``, ``key``, ``credential`` or
``session``), plus a random token. The secrets themselves are handed to the
processes that unpickle it - DataLoader workers under fork, spawn or
forkserver - through:

- this process's memory (forked children inherit it), and
- a file named by the token in a directory only this user can open
  (``$TMPDIR/unistore-secrets-<uid>/``, mode 0700, files 0600), read by
  spawned and forkserver children. The process that wrote a file removes it
  at exit; files whose writer died are removed by the next process that hands
  secrets off.

A pickle sent to another machine therefore carries no credentials: a process
there must get them its own way (environment, instance role, its own
``storage_options``).

Log records of the libraries unistore drives (botocore, aiobotocore, s3fs,
fsspec, urllib3, aiohttp) are scrubbed of every secret unistore knows and of
the credential fields of signed requests (``Authorization``,
``X-Amz-Security-Token``, ``Credential=``) once a remote filesystem is used.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import secrets as _random
import stat
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from unistore.storage.leftovers import sweep

__all__ = ["split_secrets", "merge_secrets", "hand_off", "take", "install_log_redaction", "is_secret_key"]

_SECRET_HINTS = ("secret", "token", "password", "key", "credential", "session")
_LOCK = threading.Lock()
#: token -> secrets, in this process (and, by inheritance, in its forked children)
_HELD: dict[str, list[tuple[list[str], str]]] = {}
#: secret values this process knows, for scrubbing log records
_KNOWN: set[str] = set()
#: (pid, path) of the hand-off files this process wrote
_WRITTEN: list[tuple[int, str]] = []
_SWEPT = False
#: the secrets (as JSON) -> (token, pid of the process that handed them off)
_BY_CONTENT: dict[str, tuple[str, int]] = {}


def is_secret_key(name: str) -> bool:
    """Whether an option named ``name`` holds a credential."""
    return any(h in name.lower() for h in _SECRET_HINTS)


def split_secrets(options: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[list[str], str]]]:
    """``(options without secrets, [(path of keys, secret)])``; nested mappings are searched too."""
    public: dict[str, Any] = {}
    found: list[tuple[list[str], str]] = []
    for k, v in options.items():
        if isinstance(v, Mapping):
            inner, deeper = split_secrets(v)
            public[k] = inner
            found.extend(([k, *path], value) for path, value in deeper)
        elif isinstance(v, str) and is_secret_key(str(k)):
            found.append(([k], v))
        else:
            public[k] = v
    return public, found


def merge_secrets(public: Mapping[str, Any], found: list[tuple[list[str], str]]) -> dict[str, Any]:
    """The options :func:`split_secrets` split, whole again."""
    out = _copy(public)
    for path, value in found:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _copy(value: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in value.items()}


def _folder() -> str:
    """This user's private hand-off directory (made on first use; refused if anyone else could read it)."""
    from unistore.errors import UnistoreError

    folder = os.path.join(tempfile.gettempdir(), f"unistore-secrets-{os.getuid()}")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UnistoreError(f"{folder} is not a directory that only this user can open; unistore will not hand "
                            "credentials to worker processes through it - remove it (or set TMPDIR elsewhere)")
    return folder


def hand_off(found: list[tuple[list[str], str]]) -> str:
    """A token that processes unpickling a location exchange for ``found`` (see the module docstring)."""
    content = json.dumps(found)
    with _LOCK:
        if _BY_CONTENT.get(content, ("", -1))[1] == os.getpid():
            return _BY_CONTENT[content][0]  # one hand-off per set of credentials, however many locations use it
        token = _random.token_hex(16)
        _BY_CONTENT[content] = (token, os.getpid())
        _HELD[token] = found
        _KNOWN.update(value for _, value in found if len(value) >= 4)
        folder = _folder()
        _sweep(folder)
        path = os.path.join(folder, f"{os.getpid()}-{token}.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(found, f)
        _WRITTEN.append((os.getpid(), path))
    return token


def take(token: str) -> list[tuple[list[str], str]] | None:
    """The secrets a token stands for: from this process's memory, else from its hand-off file, else None."""
    with _LOCK:
        if token in _HELD:
            return _HELD[token]
        try:
            folder = _folder()
            name = next((n for n in os.listdir(folder) if n.endswith(f"-{token}.json")), None)
            if name is None:
                return None
            with open(os.path.join(folder, name)) as f:
                found = [(list(p), str(v)) for p, v in json.load(f)]
        except (OSError, ValueError):
            return None
        _HELD[token] = found
        _KNOWN.update(value for _, value in found if len(value) >= 4)
        return found


def _sweep(folder: str) -> None:
    """Remove hand-off files whose writer process is gone (killed before it could remove them)."""
    global _SWEPT
    if not _SWEPT:
        _SWEPT = True
        sweep(folder, _HAND_OFF)


_HAND_OFF = re.compile(r"^(\d+)-[0-9a-f]+\.json$")


@atexit.register
def _remove_written() -> None:
    for pid, path in _WRITTEN:
        if pid == os.getpid():  # a forked child inherits the list; only the writer removes its files
            try:
                os.unlink(path)
            except OSError:
                pass


# ------------------------------------------------------------------ logs
_DRIVEN = ("botocore", "aiobotocore", "boto3", "s3fs", "fsspec", "urllib3", "aiohttp", "obstore", "gcsfs", "adlfs")
_PATTERNS = (
    re.compile(r"(Credential=)[^/,\s'\"]+"),
    re.compile(r"((?:X-Amz-Security-Token|x-amz-security-token)['\"]?\s*[:=]\s*b?['\"]?)[^'\",\s}&]+"),
    re.compile(r"((?:Authorization|authorization)['\"]?\s*[:=]\s*b?['\"])[^'\"]+"),
    re.compile(r"((?:aws_session_token|aws_secret_access_key|SessionToken|SecretAccessKey|Token)['\"]?\s*[:=]\s*"
               r"b?['\"]?)[^'\",\s}&]+"),
)
_INSTALLED = False


def scrub(text: str) -> str:
    """``text`` with every known secret and signed-request credential field replaced by ``***``."""
    for value in _KNOWN:
        if value in text:
            text = text.replace(value, "***")
    for pattern in _PATTERNS:
        text = pattern.sub(r"\g<1>***", text)
    return text


def install_log_redaction() -> None:
    """Scrub the log records of the libraries unistore drives (once per process; safe to call often)."""
    global _INSTALLED
    if _INSTALLED:
        return
    with _LOCK:
        if _INSTALLED:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if record.name.startswith(_DRIVEN):
                try:
                    message = record.getMessage()
                except Exception:  # noqa: BLE001 - a record that cannot format itself is left to logging
                    return record
                clean = scrub(message)
                if clean != message:
                    record.msg, record.args = clean, None
            return record

        logging.setLogRecordFactory(factory)
        _INSTALLED = True
