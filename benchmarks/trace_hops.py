"""The calls from ``Array.take`` to the first byte of a cached remote batch: a trace.

Opens a ``.npy`` on moto's S3 server with an empty disk cache, takes one
batch, and prints the unistore frames on the stack at the first call into
the client library (s3fs / aiobotocore / obstore), outermost first, with
whether each call goes down (into a layer below: a module, or a class of
one) or back up (into a layer it was called from).  Runs against any checkout: ``PYTHONPATH=src python
benchmarks/trace_hops.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from wire import s3_behind_proxy  # noqa: E402

CLIENTS = ("s3fs", "aiobotocore", "obstore", "fsspec/asyn", "botocore")


def main() -> None:
    import unistore as us
    from unistore.storage.cache import DiskCache

    data = np.arange(4096 * 64, dtype=np.float32).reshape(4096, 64)
    with tempfile.TemporaryDirectory() as tmp, s3_behind_proxy("hops") as wire:
        local = os.path.join(tmp, "emb_npy")
        with us.create_store(local, format="npy") as store:
            store.write_array("emb", data)
        url = wire.upload(local, "emb_npy")
        # 64 KiB blocks: the warm-up batch (which makes the clients, connections and mappings) leaves the traced
        # batch's blocks uncached
        cache = DiskCache(os.path.join(tmp, "cache"), block_bytes=64 << 10)
        store = us.open_store(url, storage_options=wire.options, cache=cache)
        arr = store["emb"]
        arr.take([0])
        from unistore.storage import location

        location._WATCHED.active = True  # retry_remote's watch thread off: the whole call on this thread
        found: list[list[str]] = []

        def profile(frame: Any, event: str, arg: Any) -> None:
            if found or event not in ("call", "c_call"):
                return
            if event == "c_call":  # a call into a compiled client (obstore): the caller's frame is the last hop
                import obstore

                client = any(arg is getattr(obstore, name, None) for name in ("get_ranges", "get", "get_async"))
                f = frame
            else:
                name = frame.f_code.co_filename
                client = any(f"/{c}" in name for c in CLIENTS) and "unistore" not in name
                f = frame.f_back
            if client:
                stack = []
                while f is not None:
                    if "/unistore/" in f.f_code.co_filename:
                        module = f.f_code.co_filename.split("/unistore/")[-1].removesuffix(".py")
                        stack.append(f"{module}.{f.f_code.co_qualname}")
                    f = f.f_back
                found.append(stack[::-1])

        sys.setprofile(profile)
        try:
            rows = arr.take([4000, 2100, 3000])
        finally:
            sys.setprofile(None)
            location._WATCHED.active = False
        np.testing.assert_array_equal(rows, data[[4000, 2100, 3000]])
    stack = found[0] if found else []
    start = next((i for i, s in enumerate(stack) if s.endswith("Array.take")), 0)
    stack = stack[start:]
    modules: list[str] = []
    ups = 0
    print(f"{len(stack)} unistore calls from Array.take to the first byte (outermost first):\n")
    for call in stack:
        # a layer is a module, or a class of one: a cached source calling the remote source it wraps goes down
        module = call.split(".<locals>")[0].rsplit(".", 1)[0]
        direction = ""
        if modules and module != modules[-1]:
            if module in modules:
                direction = "  <- back up"
                ups += 1
        modules.append(module)
        print(f"  {call}{direction}")
    print(f"\nlayers: {' -> '.join(dict.fromkeys(modules))}; calls back up: {ups}")


if __name__ == "__main__":
    main()
