"""Small helpers shared by test modules."""

from __future__ import annotations

import os
from typing import Any


def default_catalog() -> str:
    """The default catalog of this test (the ``default_catalog_home`` fixture points it at a fresh directory)."""
    return os.path.join(os.environ["XDG_DATA_HOME"], "unistore", "catalog.db")


#: examples per header-fuzz test (raised by ``-m slow``, see ``conftest.pytest_configure``)
FUZZ_EXAMPLES = 200


def fuzz_examples() -> int:
    return FUZZ_EXAMPLES


class Sentinel:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))
