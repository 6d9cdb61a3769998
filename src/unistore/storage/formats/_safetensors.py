"""``safetensors``: one file (header metadata -> attrs) or a directory of them.

The header (8-byte length + JSON) *is* the byte layout, so reads never decode
anything: every tensor is a :class:`ContiguousLayout`.  In a plain directory,
keys are ``<file stem>/<tensor name>``.  A Hugging Face checkpoint directory
(``save_pretrained`` output: ``model.safetensors``, or shards listed by
``model.safetensors.index.json``; a PEFT adapter folder with
``adapter_config.json``) is one store whose keys are the checkpoint's tensor
names; its ``config.json`` / ``adapter_config.json`` become the attrs
``config`` / ``adapter_config``.  Files are written with the ``safetensors``
library itself, their data starting at a multiple of 64 bytes (as in a
``.npy``), so a row read out of a mapping spans no more cache lines than it
must.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import TYPE_CHECKING, Any

import numpy as np

from unistore.errors import CorruptDataError, TruncatedDataError, UnsupportedError
from unistore.storage.formats.base import (
    META_KEY,
    ArrayInfo,
    Format,
    FormatWriter,
    OpenedStore,
    apply_meta,
    bfloat16,
    checked_nbytes,
    file_location,
    head_bytes,
    list_members,
    loads_meta,
    object_size,
    read_dir_meta,
    read_range,
)
from unistore.storage.layout import ContiguousLayout
from unistore.storage.location import Location, retry_remote

if TYPE_CHECKING:
    from unistore.storage.cache import DiskCache

_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "U64": np.uint64,
    "I32": np.int32, "U32": np.uint32, "I16": np.int16, "U16": np.uint16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "C64": np.complex64,
}
if bfloat16 is not None:
    _DTYPES["BF16"] = bfloat16
_MAX_HEADER = 100 * 1024 * 1024
_FIRST_READ = 64 * 1024
#: JSON files that mark a directory as a Hugging Face checkpoint, and the attr each becomes
_CHECKPOINT_CONFIGS = {"config.json": "config", "adapter_config.json": "adapter_config"}
_INDEX_SUFFIX = ".safetensors.index.json"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(ValueError):
    pass


def parse_header(head: bytes, size: int, where: str) -> tuple[dict[str, Any], int]:
    """(header dict, data start offset) of a safetensors file, validated against ``size``.

    The returned header maps tensor names to entries whose ``dtype``,
    ``shape`` and ``data_offsets`` are checked later (see :func:`_entry`),
    plus ``__metadata__`` (a dict of strings) when the file has one.

    Raises:
        TruncatedDataError: the file ends inside its header.
        CorruptDataError: a header that is not a JSON object, repeats a key, has a ``__metadata__``
            that is not string -> string, or an entry that cannot be read.
    """
    if len(head) < 8:
        raise TruncatedDataError(f"{where} is {len(head)} bytes long, too short for a safetensors header")
    n = int.from_bytes(head[:8], "little")
    if n > _MAX_HEADER or 8 + n > size:
        raise CorruptDataError(f"{where} claims a {n}-byte safetensors header in a {size}-byte file; "
                               "the file is corrupt or not safetensors")
    if len(head) < 8 + n:
        raise TruncatedDataError(f"{where} ends inside its safetensors header; re-create or re-download it")
    try:
        header = json.loads(head[8:8 + n], object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CorruptDataError(f"{where}: the safetensors header names {e.args[0]!r} twice; the file is corrupt "
                               "(re-save it with the safetensors library)") from None
    except (ValueError, RecursionError) as e:
        raise CorruptDataError(f"{where} has a safetensors header that is not valid JSON "
                               f"({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise CorruptDataError(f"{where}: safetensors header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise CorruptDataError(f"{where}: the safetensors __metadata__ must be an object of strings, got "
                               f"{type(meta).__name__}; re-save the file with the safetensors library")
    return header, 8 + n


def _entry(name: str, entry: Any, where: str) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field checked."""
    def bad(problem: str) -> CorruptDataError:
        return CorruptDataError(f"{where}: tensor {name!r} has {problem} in the safetensors header "
                                f"({str(entry)[:120]}); the file is corrupt")

    if not isinstance(entry, dict):
        raise bad("an entry that is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in _DTYPES:
        raise bad(f"dtype {code!r}, which is not one of {', '.join(sorted(_DTYPES))}")
    if not isinstance(shape, list):
        raise bad("a shape that is not a list")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(x) is int and x >= 0 for x in offsets) or offsets[0] > offsets[1]):
        raise bad("data_offsets that are not [begin, end] with 0 <= begin <= end")
    dtype = np.dtype(_DTYPES[code])
    nbytes = checked_nbytes(shape, dtype, f"{where}: tensor {name!r}")
    begin, end = offsets
    if end - begin != nbytes:
        raise CorruptDataError(f"{where}: tensor {name!r} spans {end - begin} bytes but shape {tuple(shape)} "
                               f"{code} needs {nbytes}; the file is corrupt")
    return dtype, tuple(shape), begin, end


def _tensor_infos(header: dict[str, Any], data_start: int, size: int, floc: Location, stamp: int,
                  key_of: Any, cache: DiskCache | None) -> dict[str, ArrayInfo]:
    """Every tensor of a parsed header as an :class:`ArrayInfo` (keyed by ``key_of(name)``), read through
    ``cache`` when remote.

    Raises:
        CorruptDataError: an entry cannot be read, or two tensors share bytes.
        TruncatedDataError: a tensor ends past the end of the file.
    """
    spans = []
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(name, entry, floc.url)
        if data_start + end > size:
            raise TruncatedDataError(f"{floc.url} is truncated: tensor {name!r} ends at byte {data_start + end} "
                                     f"of a {size}-byte file; re-create or re-download it")
        if end > begin:
            spans.append((begin, end, name))
        key = key_of(name)
        layout = ContiguousLayout(floc, data_start + begin, shape, dtype, stamp, cache=cache)
        out[key] = ArrayInfo(key, shape, dtype, layout, stored_nbytes=end - begin)
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CorruptDataError(f"{floc.url}: tensors {first!r} and {second!r} share bytes in the safetensors "
                                   "header (overlapping data_offsets); the file is corrupt")
    # the format's rule: the tensors tile the data exactly, no holes, nothing after the last one
    covered = sum(end - begin for begin, end, _ in spans)
    if covered != size - data_start:
        raise CorruptDataError(f"{floc.url}: the safetensors header places {covered} bytes of tensors, but the file "
                               f"holds {size - data_start} after the header; the file is corrupt or was cut or "
                               "extended")
    return out


class SafetensorsFormat(Format):
    name = "safetensors"
    extensions = (".safetensors",)
    store_suffix = ".safetensors"
    library = "safetensors"
    install_hint = "pip install 'unistore[safetensors]'"

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        """An 8-byte little-endian header length, then the JSON header."""
        if len(head) < 9:
            return False
        n = int.from_bytes(head[:8], "little")
        return 2 <= n < 100_000_000 and head[8:9] == b"{"

    def open(self, location: Location, cache: DiskCache | None = None, **options: Any) -> OpenedStore:
        if options:
            raise TypeError(f"safetensors stores take no options {sorted(options)}")
        checkpoint: dict[str, Any] | None = None
        if location.isdir():
            meta = read_dir_meta(location)
            members = list_members(location, ".safetensors")
            prefixed = True
            if not meta:
                checkpoint = _checkpoint_layout(location, members)
            if checkpoint is not None:
                members, prefixed = checkpoint["members"], False
        else:
            size = object_size(location)
            members = {"": (location.path, size)}
            meta, prefixed = {}, False
        keys = list(members)
        heads = head_bytes(location, [members[k][0] for k in keys], _FIRST_READ, cache)
        opened = OpenedStore(self.name, {})
        for stem, (head, stamp) in zip(keys, heads):
            path, size = members[stem]
            floc = file_location(location, path)
            end = 8 + int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
            if len(head) < end <= min(size, _MAX_HEADER + 8):
                head = read_range(floc, 0, end, stamp)
            header, data_start = parse_header(head, size, floc.url)
            file_meta = dict(header.get("__metadata__") or {})
            if checkpoint is not None:
                opened.attrs.update({k: v for k, v in file_meta.items() if k != META_KEY})
            elif not prefixed:
                meta = loads_meta(file_meta.pop(META_KEY, None))
                opened.attrs.update({k: v for k, v in file_meta.items()})
            infos = _tensor_infos(header, data_start, size, floc, stamp,
                                  lambda name, stem=stem: f"{stem}/{name}" if prefixed else name, cache)
            for key, info in infos.items():
                if checkpoint is not None:
                    _check_checkpoint_tensor(checkpoint, key, floc)
                opened.arrays[key] = info
        if checkpoint is not None:
            _check_index_complete(checkpoint, opened, location)
            opened.attrs.update(checkpoint["attrs"])
        return apply_meta(opened, meta)

    def writer(self, path: str, **options: Any) -> FormatWriter:
        return _SafetensorsWriter(path, self)


def _checkpoint_layout(location: Location, members: dict[str, tuple[str, int]]) -> dict[str, Any] | None:
    """How a Hugging Face checkpoint directory maps tensor names to files, or None for a plain directory.

    A directory is a checkpoint when it holds a ``*.safetensors.index.json``
    (sharded ``save_pretrained``: only the shards it lists are read), or a
    ``config.json`` / ``adapter_config.json`` beside its top-level
    ``.safetensors`` files.  Returns ``members`` (the files to read),
    ``where`` (tensor name -> file stem, from an index) and ``attrs``.

    Raises:
        CorruptDataError: an index or config file is not valid JSON, or an index names no file.
    """
    root = location.path.rstrip("/")
    top = {stem: v for stem, v in members.items() if "/" not in stem}
    names = {posixpath.basename(p) for p in retry_remote(lambda: location.fs.ls(root, detail=False), location)}
    indexes = sorted(n for n in names if n.endswith(_INDEX_SUFFIX))
    configs = [n for n in _CHECKPOINT_CONFIGS if n in names]
    if not indexes and not (configs and top):
        return None
    parsed = {}
    for name in configs + indexes[:1]:
        raw = read_range(file_location(location, f"{root}/{name}"))
        try:
            parsed[name] = json.loads(raw)
        except ValueError as e:
            raise CorruptDataError(f"{location.url}/{name} is not valid JSON ({e}); "
                                   "re-save the checkpoint (save_pretrained) or fix the file") from e
    attrs = {_CHECKPOINT_CONFIGS[n]: parsed[n] for n in configs}
    where: dict[str, str] | None = None
    if indexes:
        index_name = indexes[0]
        weight_map = parsed[index_name].get("weight_map") if isinstance(parsed[index_name], dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CorruptDataError(f"{location.url}/{index_name} has no weight_map of tensor name -> file name; "
                                   "re-save the checkpoint (save_pretrained) or fix the file")
        where = {name: file[: -len(".safetensors")] for name, file in weight_map.items()}
        missing = sorted({stem for stem in where.values() if stem not in members})
        if missing:
            raise CorruptDataError(f"{location.url}/{index_name} lists {missing[0]}.safetensors, which is not in "
                                   "the directory; copy the missing shard or re-save the checkpoint")
        top = {stem: members[stem] for stem in sorted(set(where.values()))}
        if isinstance(parsed[index_name].get("metadata"), dict):
            attrs["index_metadata"] = parsed[index_name]["metadata"]
    return {"members": top, "where": where, "attrs": attrs, "seen": set()}


def _check_checkpoint_tensor(checkpoint: dict[str, Any], name: str, floc: Location) -> None:
    """A tensor name must be unique across a checkpoint's files and lie in the file its index says."""
    where = checkpoint["where"]
    stem = posixpath.basename(floc.path)[: -len(".safetensors")]
    if where is not None and where.get(name) not in (None, stem):
        raise CorruptDataError(f"{floc.url} holds tensor {name!r}, which the checkpoint index places in "
                               f"{where[name]}.safetensors; re-save the checkpoint")
    if name in checkpoint["seen"]:
        raise CorruptDataError(f"tensor {name!r} appears in more than one file of the checkpoint "
                               f"(again in {floc.url}); keep one copy or re-save the checkpoint")
    checkpoint["seen"].add(name)


def _check_index_complete(checkpoint: dict[str, Any], opened: OpenedStore, location: Location) -> None:
    """Drop tensors a sharded checkpoint's index does not list; fail on listed tensors no shard holds."""
    where = checkpoint["where"]
    if where is None:
        return
    absent = sorted(set(where) - set(opened.arrays))
    if absent:
        raise CorruptDataError(f"the index of checkpoint {location.url} lists tensor {absent[0]!r} "
                               f"({len(absent)} in all) but {where[absent[0]]}.safetensors does not hold it; "
                               "the shard is truncated or from another save")
    for key in set(opened.arrays) - set(where):
        del opened.arrays[key]


#: the tensors' data in a file unistore writes starts at a multiple of this many bytes
DATA_ALIGNMENT = 64


def _numbers(values: Any) -> str:
    return ",".join(str(int(v)) for v in values)


def _alignment_padding(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> int:
    """Spaces to add inside a metadata value so that the data of the file safetensors writes for ``tensors``
    and ``metadata`` starts at a multiple of :data:`DATA_ALIGNMENT`.

    The header's length is measured, not modelled: safetensors serializes
    stand-ins of no size (same names, dtypes and ranks, hence the same order
    and metadata), and the digits the real shapes and data offsets add are
    counted on top.  Should a later safetensors write the header otherwise,
    the file is as valid, only not aligned.
    """
    from safetensors import TensorSpec, serialize

    stand_ins = {k: np.zeros((0,) * v.ndim, v.dtype) for k, v in tensors.items()}
    head = serialize({k: TensorSpec(dtype=v.dtype.name, shape=v.shape, data_ptr=v.ctypes.data, data_len=v.nbytes)
                      for k, v in stand_ins.items()}, metadata=metadata)
    n = int.from_bytes(head[:8], "little")
    length = len(head[8:8 + n].rstrip(b" "))
    at = 0
    for name, entry in json.loads(head[8:8 + n]).items():
        if name == "__metadata__":
            continue
        size = tensors[name].nbytes
        length += len(_numbers(tensors[name].shape)) - len(_numbers(stand_ins[name].shape))
        length += len(_numbers((at, at + size))) - len(_numbers(entry["data_offsets"]))
        at += size
    return -(8 + length) % DATA_ALIGNMENT


class _SafetensorsWriter(FormatWriter):
    """Collects tensors and writes one file with ``safetensors.serialize_file`` on finish."""

    def __init__(self, path: str, fmt: Format):
        super().__init__(path, fmt)
        self.tensors: dict[str, np.ndarray] = {}

    def write_array(self, key: str, data: np.ndarray, chunks: tuple[int, ...] | None,
                    compression: str | None, attrs: dict[str, Any]) -> None:
        self.check_compression(compression)
        if not any(np.dtype(data.dtype) == np.dtype(d) for d in _DTYPES.values()):
            raise UnsupportedError(f"safetensors cannot store dtype {data.dtype} (array {key!r}); "
                                   "use npy, hdf5 or zarr, or cast it")
        self.keep_attrs(key, attrs)
        # np.asarray, not np.ascontiguousarray: that makes a 0-d array 1-d
        self.tensors[key] = np.asarray(data, order="C").astype(data.dtype.newbyteorder("<"), copy=False)

    def finish(self, attrs: dict[str, Any], checksums: dict[str, str]) -> list[str]:
        from safetensors import TensorSpec, serialize_file

        meta = {META_KEY: self.meta_json(attrs, checksums)}
        meta.update({k: v for k, v in attrs.items() if isinstance(v, str) and k != META_KEY})
        # spaces at the end of unistore's own entry (JSON around its text) align the data
        meta[META_KEY] += " " * _alignment_padding(self.tensors, meta)
        specs = {
            k: TensorSpec(dtype=v.dtype.name, shape=v.shape, data_ptr=v.ctypes.data, data_len=v.nbytes)
            for k, v in self.tensors.items()
        }
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        serialize_file(specs, self.path, metadata=meta)
        return []

