"""moto's S3 server for benchmarks, with range reads that cost the range, as on a real bucket.

moto keeps each object in a spooled temporary file and copies the whole
object out of it for every GET, ranged or not: a 1 MiB range of a 300 MB
``.npy`` then costs the server a 300 MB copy (about 0.2 s on a small
machine), which would be measured as if it were the reader's cost.  Here an
object's bytes are read out of its buffer once and kept (immutable ``bytes``),
so a range costs a slice; writing the object drops the kept copy.  Requests,
responses and headers are moto's own, over real HTTP.

    python benchmarks/s3_server.py -H 127.0.0.1 -p 5000
"""

from __future__ import annotations

import sys
from typing import Any


def patch_ranges() -> None:
    from moto.s3.models import FakeKey

    read_all, write_all = FakeKey.value.fget, FakeKey.value.fset

    def get_value(self: Any) -> bytes:
        kept = self.__dict__.get("_bench_value")
        if kept is None or len(kept) != self.contentsize:
            kept = read_all(self)
            self.__dict__["_bench_value"] = kept
        return kept

    def set_value(self: Any, new_value: Any) -> None:
        self.__dict__.pop("_bench_value", None)
        write_all(self, new_value)

    FakeKey.value = property(get_value, set_value)


if __name__ == "__main__":
    from moto.server import main

    patch_ranges()
    main(sys.argv[1:])
