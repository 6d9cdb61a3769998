"""Small helpers shared by test modules."""

from __future__ import annotations

from typing import Any

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
