"""The calls a read makes from ``Array.take`` to its first byte: a stack taken at its first call into a client
library (obstore's compiled functions, or fsspec / s3fs / aiobotocore / botocore code).

Used by the test that bounds them and by ``benchmarks/trace_hops.py``, which prints them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

CLIENT_PACKAGES = ("fsspec", "s3fs", "aiobotocore", "botocore")
OBSTORE_CALLS = ("get", "get_async", "get_range", "get_ranges")


def calls_to_the_first_byte(read: Callable[[], Any]) -> list[str]:
    """The unistore calls on the stack (``module.qualname``, outermost first, from ``Array.take``) when
    ``read()`` first calls into a client library.  The deadline's watch thread is off meanwhile, so the whole
    read runs on this thread."""
    import obstore

    from unistore.storage import location

    clients = {id(getattr(obstore, name, None)) for name in OBSTORE_CALLS}
    found: list[list[str]] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if found or event not in ("call", "c_call"):
            return
        if event == "c_call":  # a compiled client (obstore): the caller's frame is the last hop
            hit, f = id(arg) in clients, frame
        else:
            name = frame.f_code.co_filename
            hit = "/unistore/" not in name and any(f"/{c}/" in name for c in CLIENT_PACKAGES)
            f = frame.f_back
        if hit:
            stack = []
            while f is not None:
                if "/unistore/" in f.f_code.co_filename:
                    module = f.f_code.co_filename.split("/unistore/")[-1].removesuffix(".py")
                    stack.append(f"{module}.{f.f_code.co_qualname}")
                f = f.f_back
            found.append(stack[::-1])

    location._WATCHED.active = True
    sys.setprofile(profile)
    try:
        read()
    finally:
        sys.setprofile(None)
        location._WATCHED.active = False
    assert found, "no call reached a client library"
    stack = found[0]
    return stack[next((i for i, s in enumerate(stack) if s.endswith("Array.take")), 0):]


def layer_of(call: str) -> str:
    """A call's layer: its module, or the class of it that it belongs to (a cached source calling the remote
    source it wraps goes down)."""
    return call.split(".<locals>")[0].rsplit(".", 1)[0]


def back_up(stack: list[str]) -> list[int]:
    """The positions of the calls in ``stack`` that go back into a layer passed on the way down."""
    layers = [layer_of(call) for call in stack]
    return [i for i, layer in enumerate(layers) if i and layer != layers[i - 1] and layer in layers[:i]]
