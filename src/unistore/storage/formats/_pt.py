"""``pt``: a directory of ``.pt`` files, or one ``.pt`` holding a dict of tensors.

Every file is read with ``torch.load(weights_only=True)`` and never with
``weights_only=False``: a pickle that would run code raises
:class:`~unistore.errors.UnsafePickleError` and runs nothing.

Listing uses ``map_location="meta"``: torch then parses only the pickle and
reports where each storage starts inside the (uncompressed) zip, which gives
every contiguous tensor a :class:`ContiguousLayout` - read by ``mmap`` locally
and by byte ranges remotely, never by loading the file.

In a directory the key is the file's relative path without ``.pt`` (the
JASPER layout); a file holding a list of lists of ints is a ragged array.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from unistore.errors import (
    CorruptDataError,
    FormatError,
    RemoteError,
    TruncatedDataError,
    UnsafePickleError,
)
from unistore.storage.formats.base import (
    META_NAME,
    ArrayInfo,
    Format,
    FormatWriter,
    OpenedStore,
    RaggedInfo,
    apply_meta,
    bfloat16,
    file_location,
    list_members,
    loads_meta,
    read_dir_meta,
)
from unistore.storage.layout import ContiguousLayout, InMemoryLayout, file_stamp
from unistore.storage.location import Location, retry_remote

#: Key of the unistore metadata string inside a single-file ``.pt`` dict.
PT_META_KEY = "__unistore__"


def torch_to_numpy_dtype(dtype: Any) -> np.dtype[Any]:
    import torch

    if dtype == torch.bfloat16:
        if bfloat16 is None:
            raise FormatError("reading bfloat16 needs ml_dtypes: pip install ml_dtypes")
        return bfloat16
    return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)


def _load(floc: Location, meta: bool) -> Any:
    """``torch.load(weights_only=True)`` of one file, errors mapped to unistore's."""
    import torch

    map_location = "meta" if meta else "cpu"

    def run() -> Any:
        if floc.is_local:
            return torch.load(floc.path, map_location=map_location, weights_only=True)
        with floc.fs.open(floc.path, "rb", block_size=256 * 1024, cache_type="readahead") as f:
            return torch.load(f, map_location=map_location, weights_only=True)

    try:
        return retry_remote(run, floc)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text or "unsupported" in text.lower():
            raise UnsafePickleError(
                f"{floc.url} contains a pickle that would import or call code other than tensors and "
                "containers; unistore refuses it (torch.load weights_only=True). If you trust the file, "
                "re-save its tensors with torch.save(tensor) or safetensors"
            ) from e
        raise CorruptDataError(f"{floc.url} is not a readable .pt file ({e})") from e
    except (FileNotFoundError, PermissionError, RemoteError):
        raise
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptDataError(f"{floc.url} is truncated or corrupt: torch.load cannot read it ({text}); "
                               "re-create or re-download it") from e


def _tensor_info(key: str, t: Any, floc: Location, size: int) -> ArrayInfo | None:
    """Layout of a meta tensor, or None when its bytes are not one contiguous run."""
    storage = t.untyped_storage()
    offset = getattr(storage, "_checkpoint_offset", None)
    dtype = torch_to_numpy_dtype(t.dtype)
    shape = tuple(int(s) for s in t.shape)
    if offset is None or not t.is_contiguous():
        return None
    start = int(offset) + int(t.storage_offset()) * dtype.itemsize
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if start + nbytes > size:
        raise TruncatedDataError(f"{floc.url} is truncated: tensor {key!r} ends at byte {start + nbytes} of "
                                 f"{size}; re-create or re-download it")
    layout = ContiguousLayout(floc, start, shape, dtype, file_stamp(floc))
    return ArrayInfo(key, shape, dtype, layout, stored_nbytes=nbytes)


def _ragged_info(key: str, rows: list[Any]) -> RaggedInfo | ArrayInfo:
    from unistore.storage.store import as_ragged

    if all(isinstance(r, (int, float, bool)) for r in rows):
        data = np.asarray(rows)
        return ArrayInfo(key, data.shape, data.dtype, InMemoryLayout(data))
    values, offsets = as_ragged(rows)
    vinfo = ArrayInfo(f"{key}/values", values.shape, values.dtype, InMemoryLayout(values))
    oinfo = ArrayInfo(f"{key}/offsets", offsets.shape, offsets.dtype, InMemoryLayout(offsets))
    return RaggedInfo(key, vinfo, oinfo)


def _contains_tensor(obj: Any) -> bool:
    import torch

    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (list, tuple)):
        return any(_contains_tensor(o) for o in obj)
    if isinstance(obj, dict):
        return any(_contains_tensor(o) for o in obj.values())
    return False


def _to_plain(obj: Any) -> Any:
    """Tensors inside lists -> numpy, for ragged lists of 1-D tensors."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numpy() if obj.dtype != torch.bfloat16 else obj.view(torch.int16).numpy().view(bfloat16)
    if isinstance(obj, (list, tuple)):
        return [_to_plain(o) for o in obj]
    return obj


class PtFormat(Format):
    name = "pt"

    def open(self, location: Location, **options: Any) -> OpenedStore:
        if options:
            raise TypeError(f"pt stores take no options {sorted(options)}")
        if location.isdir():
            meta = read_dir_meta(location)
            members = list_members(location, ".pt")
            opened = OpenedStore(self.name, {})
            for key, (path, size) in members.items():
                floc = file_location(location, path)
                self._add_object(opened, key, _load(floc, meta=True), floc, size, top=True)
            return apply_meta(opened, meta)
        size = int(retry_remote(lambda: location.fs.size(location.path), location))
        obj = _load(location, meta=True)
        opened = OpenedStore(self.name, {})
        if isinstance(obj, dict):
            meta = loads_meta(obj.pop(PT_META_KEY, None))
            for key, value in obj.items():
                self._add_object(opened, str(key), value, location, size, top=False)
        else:
            meta = {}
            self._add_object(opened, os.path.splitext(location.name)[0], obj, location, size, top=False)
        return apply_meta(opened, meta)

    def _add_object(self, opened: OpenedStore, key: str, obj: Any, floc: Location, size: int, top: bool) -> None:
        import torch

        if isinstance(obj, torch.Tensor):
            info = _tensor_info(key, obj, floc, size)
            if info is None:  # non-contiguous view: load the real tensor once
                real = _load(floc, meta=False)
                for part in ([] if top else key.split("/")):
                    real = real[part]
                data = np.ascontiguousarray(_to_plain(real))
                info = ArrayInfo(key, data.shape, data.dtype, InMemoryLayout(data))
            opened.arrays[key] = info
        elif isinstance(obj, dict):
            for name, value in obj.items():
                self._add_object(opened, f"{key}/{name}", value, floc, size, top=False)
        elif isinstance(obj, (list, tuple)):
            if _contains_tensor(obj):
                obj = _to_plain(_load(floc, meta=False) if top else obj)
            opened.arrays[key] = _ragged_info(key, list(obj))
        else:
            opened.attrs[key] = obj

    def writer(self, path: str, single_file: bool | None = None, **options: Any) -> FormatWriter:
        """Directory of ``.pt`` files, or one dict file when the URL ends in ``.pt``/``.pth``."""
        if options:
            raise TypeError(f"pt writer takes no options {sorted(options)}")
        single = path.endswith((".pt", ".pth")) if single_file is None else single_file
        return _PtWriter(path, self, single)


class _PtWriter(FormatWriter):
    """Directory mode: one ``torch.save`` per array; file mode (``*.pt`` URL): one dict."""

    def __init__(self, path: str, fmt: Format, single: bool):
        super().__init__(path, fmt)
        self.single = single
        self.objects: dict[str, Any] = {}
        if not single:
            os.makedirs(path, exist_ok=True)

    def _put(self, key: str, obj: Any) -> None:
        import torch

        if self.single:
            self.objects[key] = obj
            return
        target = os.path.join(self.path, *key.split("/")) + ".pt"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        torch.save(obj, target)

    def write_array(self, key: str, data: np.ndarray, chunks: tuple[int, ...] | None,
                    compression: str | None, attrs: dict[str, Any]) -> None:
        from unistore.storage.array import to_tensor

        self.check_compression(compression)
        self.keep_attrs(key, attrs)
        self._put(key, to_tensor(data))  # shares memory (a memmap stays on disk)

    def write_ragged(self, key: str, values: np.ndarray, offsets: np.ndarray, attrs: dict[str, Any]) -> None:
        self.keep_attrs(key, attrs)
        self._put(key, [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)])

    def finish(self, attrs: dict[str, Any], checksums: dict[str, str]) -> list[str]:
        import torch

        if self.single:
            obj = dict(self.objects)
            obj[PT_META_KEY] = self.meta_json(attrs, checksums)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            torch.save(obj, self.path)
            return []
        with open(os.path.join(self.path, META_NAME), "w") as f:
            f.write(self.meta_json(attrs, checksums))
        return [META_NAME]

