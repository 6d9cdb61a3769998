"""The calls from ``Array.take`` to the first byte of a cached remote batch: a trace.

Opens a ``.npy`` on moto's S3 server with an empty disk cache, takes one
batch, and prints the unistore frames on the stack at the first call into
the client library (obstore, or fsspec / s3fs / aiobotocore), outermost
first, with whether each call goes down (into a layer below: a module, or a
class of one) or back up (into a layer it was called from); the tracer is
``tests/storage/hops.py``, which the suite's bound on these calls uses too.

    python benchmarks/trace_hops.py [--transport obstore|fsspec]
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from wire import s3_behind_proxy  # noqa: E402

from tests.storage.hops import back_up, calls_to_the_first_byte, layer_of  # noqa: E402


def main() -> None:
    import argparse

    import unistore as us
    from unistore.storage.cache import DiskCache

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("obstore", "fsspec"), default="obstore")
    args = parser.parse_args()
    data = np.arange(4096 * 64, dtype=np.float32).reshape(4096, 64)
    with tempfile.TemporaryDirectory() as tmp, s3_behind_proxy("hops") as wire:
        local = os.path.join(tmp, "emb_npy")
        with us.create_store(local, format="npy") as store:
            store.write_array("emb", data)
        url = wire.upload(local, "emb_npy")
        # 64 KiB blocks: the warm-up batch (which makes the clients, connections and mappings) leaves the traced
        # batch's blocks uncached
        cache = DiskCache(os.path.join(tmp, "cache"), block_bytes=64 << 10)
        arr = us.open_store(url, storage_options=wire.options, cache=cache, transport=args.transport)["emb"]
        arr.take([0])
        rows = [4000, 2100, 3000]
        stack = calls_to_the_first_byte(lambda: np.testing.assert_array_equal(arr.take(rows), data[rows]))
    ups = back_up(stack)
    print(f"{len(stack)} unistore calls from Array.take to the first byte (outermost first, {args.transport}):\n")
    for i, call in enumerate(stack):
        print(f"  {call}{'  <- back up' if i in ups else ''}")
    layers = dict.fromkeys(layer_of(call) for call in stack)
    print(f"\nlayers: {' -> '.join(layers)}; calls back up: {len(ups)}")


if __name__ == "__main__":
    main()
