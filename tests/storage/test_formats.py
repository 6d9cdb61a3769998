"""The shared suite, once per format x filesystem (local disk, memory://, S3 server)."""

from __future__ import annotations

import pytest

from .native import FORMATS
from .suite import StoreSuite

FILESYSTEMS = ("local", "memory", "s3")

for _fmt in FORMATS:
    for _fs in FILESYSTEMS:
        _name = f"Test_{_fmt}_{_fs}"
        _marks = [pytest.mark.s3] if _fs == "s3" else []
        _cls = type(_name, (StoreSuite,), {"fmt": _fmt, "fs_kind": _fs, "__module__": __name__,
                                           "pytestmark": _marks})
        globals()[_name] = _cls
