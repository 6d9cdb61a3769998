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

import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from unistore.errors import (
    CorruptDataError,
    FormatError,
    RemoteError,
    StoreChangedError,
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
    object_size,
    read_dir_meta,
)
from unistore.storage.layout import ContiguousLayout, InMemoryLayout, open_described, stamp_of
from unistore.storage.location import Location, retry_remote

if TYPE_CHECKING:
    from unistore.storage.cache import DiskCache

#: Key of the unistore metadata string inside a single-file ``.pt`` dict.
PT_META_KEY = "__unistore__"


def torch_to_numpy_dtype(dtype: Any) -> np.dtype[Any]:
    import torch

    if dtype == torch.bfloat16:
        if bfloat16 is None:
            raise FormatError("reading bfloat16 needs ml_dtypes: pip install ml_dtypes")
        return bfloat16
    return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)


def _load(floc: Location, meta: bool, describe: bool = False, stamp: int = 0) -> Any:
    """``torch.load(weights_only=True)`` of one file, errors mapped to unistore's.

    ``describe``: also return the tree of :class:`_TensorRef` and the zip
    records, ``(obj, refs, records)``, read from the same open file.
    """
    import torch

    map_location = "meta" if meta else "cpu"

    def run() -> Any:
        if floc.is_local:
            with open_described(floc, stamp) as f:
                return read(f)
        with floc.fs.open(floc.path, "rb", block_size=256 * 1024, cache_type="readahead") as f:
            return read(f)

    def read(f: Any) -> Any:
        obj = torch.load(f, map_location=map_location, weights_only=True)
        if not describe:
            return obj
        f.seek(0)
        _, records, data_pkl = _zip_records(f, floc.url)
        stamp = stamp_of(os.fstat(f.fileno())) if floc.is_local else 0  # the file read, not the path
        return obj, _tensor_refs(data_pkl), records, stamp

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
    except (FileNotFoundError, PermissionError, RemoteError, CorruptDataError, StoreChangedError):
        raise
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError, AttributeError, IndexError,
            zipfile.BadZipFile, struct.error) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptDataError(f"{floc.url} is truncated or corrupt: torch.load cannot read it ({text}); "
                               "re-create or re-download it") from e


@dataclass(frozen=True, slots=True)
class _Record:
    """Where one zip record's bytes are, read from the zip's own headers."""

    offset: int  # first byte of the record's data
    size: int  # uncompressed bytes
    stored: bool  # compression method 0 (stored): the data is the bytes themselves


@dataclass(frozen=True, slots=True)
class _StorageRef:
    key: str


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor as the pickle builds it: which storage record, and from which element."""

    key: str
    storage_offset: int


class _Inert:
    """What every global but the tensor rebuilders becomes in :class:`_KeyUnpickler`: absorbs any call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def _rebuild_tensor(storage: Any, storage_offset: Any, *args: Any) -> Any:
    if isinstance(storage, _StorageRef) and type(storage_offset) is int:
        return _TensorRef(storage.key, storage_offset)
    return _Inert()


def _first_arg(data: Any = None, *args: Any) -> Any:
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any = (), state: Any = None) -> Any:
    return func(*args) if callable(func) and isinstance(args, tuple) else _Inert()


class _KeyUnpickler(pickle.Unpickler):
    """Reads a checkpoint's ``data.pkl`` to learn which zip record each tensor's storage is.

    It runs no code of the file's: every global resolves to one of the inert
    stand-ins above (``torch.load(weights_only=True)`` has already refused
    pickles that reach for anything else).
    """

    _KNOWN = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
              ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
              ("torch._utils", "_rebuild_parameter"): _first_arg,
              ("torch._utils", "_rebuild_parameter_with_state"): _first_arg,
              ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
              ("collections", "OrderedDict"): dict}

    def find_class(self, module: str, name: str) -> Any:
        return self._KNOWN.get((module, name), _Inert)

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage":
            return _StorageRef(str(pid[2]))
        return _Inert()


def _zip_records(f: Any, where: str) -> tuple[str, dict[str, _Record], bytes]:
    """(record name prefix, storage records by key, ``data.pkl``) of a checkpoint open as ``f``.

    Offsets come from each record's local header, sizes and methods from the
    central directory, so a checkpoint zipped by any tool is read right.

    Raises:
        CorruptDataError: not a zip, no ``data.pkl``, or a record header that disagrees with the directory.
    """
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
        pkl = next((i for i in infos if i.filename.endswith("data.pkl") and i.filename.count("/") <= 1), None)
        if pkl is None:
            raise CorruptDataError(f"{where} is a zip file with no data.pkl: not a torch checkpoint")
        prefix = pkl.filename[: -len("data.pkl")]
        data_pkl = zf.read(pkl)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, EOFError, OSError) as e:
        if isinstance(e, (CorruptDataError, RemoteError, FileNotFoundError, PermissionError)):
            raise
        raise CorruptDataError(f"{where} has an unreadable zip directory ({type(e).__name__}: {e}); re-create or "
                               "re-download it") from e
    records = {}
    wanted = [i for i in infos if i.filename.startswith(f"{prefix}data/")]
    for info in wanted:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise CorruptDataError(f"{where}: zip record {info.filename!r} has no local header at byte "
                                   f"{info.header_offset}; the file is corrupt")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        if info.flag_bits & 0x1:
            raise CorruptDataError(f"{where}: zip record {info.filename!r} is encrypted; unistore reads plain "
                                   "checkpoints only")
        records[info.filename[len(prefix) + len("data/"):]] = _Record(
            info.header_offset + 30 + name_len + extra_len, int(info.file_size),
            info.compress_type == zipfile.ZIP_STORED and info.compress_size == info.file_size)
    return prefix, records, data_pkl


def _tensor_refs(data_pkl: bytes) -> Any:
    """The pickle's object tree with each tensor replaced by its :class:`_TensorRef` (None if unreadable)."""
    try:
        return _KeyUnpickler(io.BytesIO(data_pkl)).load()
    except Exception:  # noqa: BLE001 - torch already parsed this pickle; a tree we cannot follow maps nothing
        return None


class _Described:
    """One ``.pt`` file: torch's meta-load of it, the same tree with tensor refs, and its zip records; its
    tensors are read through ``cache`` when remote."""

    def __init__(self, floc: Location, size: int, cache: DiskCache | None):
        self.floc, self.size, self.cache = floc, size, cache
        self.obj, self.refs, self.records, self.stamp = _load(floc, meta=True, describe=True)
        self._real: Any = None

    def real(self) -> Any:
        """The file loaded for real (CPU tensors), once: for tensors that cannot be mapped in place."""
        if self._real is None:
            self._real = _load(self.floc, meta=False, stamp=self.stamp)
        return self._real


def _tensor_info(key: str, t: Any, ref: Any, file: _Described) -> ArrayInfo | None:
    """Layout of a meta tensor inside its zip record, or None when it must be loaded instead (a view
    that is not one contiguous run, a compressed record, a pickle this parser could not follow).

    Raises:
        CorruptDataError: the pickle names a record the zip lacks, or claims more bytes than its record holds.
    """
    floc = file.floc
    dtype = torch_to_numpy_dtype(t.dtype)
    shape = tuple(int(s) for s in t.shape)
    if not isinstance(ref, _TensorRef) or not t.is_contiguous() or ref.storage_offset != t.storage_offset():
        return None
    record = file.records.get(ref.key)
    if record is None:
        raise CorruptDataError(f"{floc.url}: tensor {key!r} uses storage record data/{ref.key}, which the zip "
                               "does not hold; the checkpoint is corrupt")
    storage_bytes = int(t.untyped_storage().nbytes())
    if storage_bytes > record.size:
        raise CorruptDataError(f"{floc.url}: tensor {key!r} claims {storage_bytes} bytes of storage, but record "
                               f"data/{ref.key} holds {record.size}; the checkpoint is corrupt")
    if not record.stored:
        return None
    start = record.offset + int(t.storage_offset()) * dtype.itemsize
    nbytes = math.prod(shape) * dtype.itemsize
    if start + nbytes > file.size:
        raise TruncatedDataError(f"{floc.url} is truncated: tensor {key!r} ends at byte {start + nbytes} of "
                                 f"{file.size}; re-create or re-download it")
    layout = ContiguousLayout(floc, start, shape, dtype, file.stamp, cache=file.cache)
    return ArrayInfo(key, shape, dtype, layout, stored_nbytes=nbytes)


def _child(ref: Any, name: Any) -> Any:
    return ref.get(name) if isinstance(ref, dict) else None


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
    extensions = (".pt", ".pth")
    magic = (b"PK\x03\x04",)
    store_suffix = ".pt"
    library = "torch"
    install_hint = "pip install 'unistore[torch]' (or pip install torch)"

    def open(self, location: Location, cache: DiskCache | None = None, **options: Any) -> OpenedStore:
        if options:
            raise TypeError(f"pt stores take no options {sorted(options)}")
        if location.isdir():
            meta = read_dir_meta(location)
            members = list_members(location, ".pt")
            opened = OpenedStore(self.name, {})
            for key, (path, size) in members.items():
                file = _Described(file_location(location, path), size, cache)
                self._add_object(opened, key, file.obj, file.refs, file, [])
            return apply_meta(opened, meta)
        size = object_size(location)
        file = _Described(location, size, cache)
        obj, refs = file.obj, file.refs
        opened = OpenedStore(self.name, {})
        if isinstance(obj, dict):
            meta = loads_meta(obj.pop(PT_META_KEY, None))
            for key, value in obj.items():
                self._add_object(opened, str(key), value, _child(refs, key), file, [key])
        else:
            meta = {}
            self._add_object(opened, os.path.splitext(location.name)[0], obj, refs, file, [])
        return apply_meta(opened, meta)

    def _add_object(self, opened: OpenedStore, key: str, obj: Any, ref: Any, file: _Described,
                    path: list[Any]) -> None:
        """Add ``obj`` (at ``path`` inside the file's object, ``ref`` the same place in its ref tree)."""
        import torch

        if isinstance(obj, torch.Tensor):
            info = _tensor_info(key, obj, ref, file)
            if info is None:  # a view, a compressed record, an unfollowed pickle: load the real tensor once
                real = file.real()
                for part in path:
                    real = real[part]
                data = np.ascontiguousarray(_to_plain(real))
                info = ArrayInfo(key, data.shape, data.dtype, InMemoryLayout(data))
            opened.arrays[key] = info
        elif isinstance(obj, dict):
            for name, value in obj.items():
                self._add_object(opened, f"{key}/{name}", value, _child(ref, name), file, path + [name])
        elif isinstance(obj, (list, tuple)):
            if _contains_tensor(obj):
                real = file.real()
                for part in path:
                    real = real[part]
                obj = _to_plain(real)
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

