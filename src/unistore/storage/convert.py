"""``convert``: copy a store between any two formats and filesystems.

The copy streams row blocks through the read engine into a staged
destination that is published atomically at the end, so a failed or killed
conversion leaves the source untouched and the destination absent (or, with
``overwrite=True``, still the previous complete store).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from unistore.storage.array import Array, RaggedArray
from unistore.storage.layout import file_stamp, preallocate
from unistore.storage.leftovers import sweep
from unistore.storage.location import Location
from unistore.storage.store import create_store, open_store

__all__ = ["convert", "ConvertReport", "store_size"]

#: Rows are copied in blocks of about this many bytes.
BLOCK_BYTES = 64 << 20
#: Arrays larger than this are staged in a temporary file-backed memmap, not in RAM.
IN_MEMORY_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class ConvertReport:
    """What ``convert`` did: arrays copied and bytes at each end."""

    arrays: int
    logical_bytes: int
    src_bytes: int
    dst_bytes: int
    #: On Dask: row blocks copied by workers, blocks a rerun found staged and verified, source bytes the workers read.
    blocks_copied: int = 0
    blocks_skipped: int = 0
    source_bytes_read: int | None = None
    #: On Dask: destination blocks (whole chunks or shards) encoded and written by workers.
    blocks_encoded: int = 0

    @property
    def ratio(self) -> float:
        """Destination size / source size on storage."""
        return self.dst_bytes / self.src_bytes if self.src_bytes else float("nan")


def store_size(location: Location) -> int:
    """Bytes on storage under ``location`` (a file, or everything below a directory)."""
    fs = location.fs
    if fs.isdir(location.path):
        return int(sum(info.get("size") or 0 for info in fs.find(location.path, detail=True).values()))
    return int(fs.size(location.path))


def convert(src_url: str | os.PathLike[str] | Location, dst_url: str | os.PathLike[str] | Location, format: str,
            compression: str | None = None, chunks: Mapping[str, tuple[int, ...]] | tuple[int, ...] | None = None,
            storage_options: Mapping[str, Any] | None = None,
            src_storage_options: Mapping[str, Any] | None = None,
            dst_storage_options: Mapping[str, Any] | None = None, src_format: str = "auto",
            overwrite: bool = False, progress: bool = False, keys: Sequence[str] | None = None,
            rename: Mapping[str, str] | None = None, on_array: Callable[[str], None] | None = None,
            scheduler: Any = None, **src_options: Any) -> ConvertReport:
    """Copy every array and attr of the store at ``src_url`` into a new ``format`` store at ``dst_url``.

    ``storage_options`` apply to both ends unless ``src_storage_options`` /
    ``dst_storage_options`` are given.  ``chunks`` is one chunk shape for all
    arrays or a ``{key: chunks}`` mapping (source keys); ``compression`` applies to every
    dense array (zarr: ``zstd``, ``gzip``, ``blosc``, ``lz4``; hdf5: ``gzip``, ``lzf``).

    ``keys`` copies only those arrays, in that order; ``rename`` maps source keys
    to destination keys (``{"question_embs": "embeddings/questions"}``; keys not
    in it keep their name); ``on_array(key)`` is called before each array is copied.

    ``scheduler`` copies the row blocks of every dense array in parallel on
    Dask (``"local"``: a local cluster of worker processes; ``"tcp://host:port"``;
    or a ``dask.distributed.Client``): workers read their blocks from the
    source and stage them, with a SHA-256 marker each, in a job directory
    beside the destination (``.<name>.unistore-job-<id>``, the id derived from
    the source, the destination and the options, so a rerun finds it and skips
    the blocks already staged and verified).  Where the destination format
    stores an array as independently writable pieces (zarr chunks or shards)
    and the workers can reach the destination's staging path (a local
    destination, or a local cluster), the workers also encode and write the
    destination, whole chunks each; otherwise the array is assembled here.
    Either way the arrays are created by the same writer as the single-process
    path, checksums come from the staged bytes, and the store is published
    atomically: keys, dtypes, chunks, attrs and checksums are identical.  The
    job directory is removed after the commit.

    Raises:
        StoreNotFoundError: the source does not exist.
        ArrayNotFoundError: a key in ``keys`` is not in the source.
        InvalidKeyError: a ``rename`` target is not a valid key.
        StoreExistsError: the destination exists and ``overwrite`` is false.
        UnsupportedError: the destination format cannot hold some array as asked.

    >>> unistore.convert("run1_pt/", "s3://bucket/run1.zarr", format="zarr", compression="zstd")
    """
    src_opts = src_storage_options if src_storage_options is not None else storage_options
    dst_opts = dst_storage_options if dst_storage_options is not None else storage_options
    src = open_store(src_url, format=src_format, storage_options=src_opts, **src_options)
    copy = list(keys) if keys is not None else src.keys()
    arrays = {key: src[key] for key in copy}  # a missing key fails here, before anything is staged
    rename = dict(rename or {})
    dst = create_store(dst_url, format=format, storage_options=dst_opts, overwrite=overwrite)
    total = sum(a.nbytes for a in arrays.values())
    job: _DaskJob | None = None
    stack = contextlib.ExitStack()
    bar = _progress(total, f"convert -> {format}", progress)
    sweep(tempfile.gettempdir())  # spill folders of conversions that were killed
    spill = tempfile.TemporaryDirectory(prefix=f"unistore-convert-{os.getpid()}-")
    key_chunks = {key: chunks.get(key) if isinstance(chunks, Mapping) else _fit_chunks(chunks, a.shape)
                  for key, a in arrays.items() if isinstance(a, Array)}
    encoded: set[str] = set()
    try:
        if scheduler is not None:
            from unistore.storage.dask_jobs import dask_client

            job = _DaskJob(src, arrays, dst.location, format, compression, chunks, rename)
            client = stack.enter_context(dask_client(scheduler))
            # workers also encode the destination where its format allows and they can reach its staging path
            staging = dst.staging_path
            if staging is not None and all(client.run(os.path.isdir, os.path.dirname(staging)).values()):
                for key in job.blocks:
                    if on_array is not None:
                        on_array(key)
                    arr = arrays[key]
                    made = dst.create_array(rename.get(key, key), arr.shape, arr.dtype, key_chunks[key], compression,
                                            arr.attrs)
                    if made is not None:
                        job.encode_into(key, *made)
                        encoded.add(key)
            job.run(client, progress, bar)
        for key, arr in arrays.items():
            target = rename.get(key, key)
            if key in encoded:
                assert job is not None
                dst.record_checksum(target, job.checksums[key])
                continue
            if on_array is not None:
                on_array(key)
            if isinstance(arr, RaggedArray):
                dst.write_array(target, arr, attrs=arr.attrs)
                bar.update(arr.nbytes)
                continue
            data = job.assemble(key, bar, spill.name) if job is not None and key in job.blocks else \
                _read_blocks(arr, bar, spill.name)
            dst.write_array(target, data, chunks=key_chunks[key], compression=compression, attrs=arr.attrs)
        dst.attrs.update(src.attrs)
        dst.commit()
    except BaseException:
        dst.abort()
        raise
    finally:
        bar.close()
        spill.cleanup()
        stack.close()
    if job is None:
        return ConvertReport(len(arrays), total, store_size(src.location), store_size(dst.location))
    job.remove()
    return ConvertReport(len(arrays), total, store_size(src.location), store_size(dst.location), job.copied,
                         job.skipped, job.source_bytes_read, job.encoded)


def _fit_chunks(chunks: tuple[int, ...] | None, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """One chunk shape for every array: leading entries apply, missing axes are whole."""
    if chunks is None or not shape:
        return None
    return tuple(max(1, min(chunks[i], s or 1)) if i < len(chunks) else max(s, 1) for i, s in enumerate(shape))


def _allocate(shape: tuple[int, ...], dtype: np.dtype[Any], nbytes: int, spill_dir: str) -> np.ndarray:
    """An array to assemble into: in memory, or (large arrays) a file-backed memmap under ``spill_dir``.

    A memmap's pages are the kernel's to write back, so converting an array bigger than RAM works.
    Its disk blocks are allocated first: a full disk is a :class:`~unistore.errors.DiskFullError`
    naming the spill folder, not a crash halfway through.
    """
    if nbytes > IN_MEMORY_BYTES:
        path = os.path.join(spill_dir, f"{len(os.listdir(spill_dir))}.bin")
        out = np.memmap(path, dtype=dtype, mode="w+", shape=shape)
        preallocate(path, f"converting an array of {nbytes:,} bytes (spilled to disk; TMPDIR picks where)")
        return out
    return np.empty(shape, dtype)


def _read_blocks(arr: Array, bar: Any, spill_dir: str) -> np.ndarray:
    """The whole array, read in bounded row blocks so progress is visible."""
    if not arr.shape or arr.shape[0] == 0:
        out = arr.read()
        bar.update(out.nbytes)
        return out
    out = _allocate(arr.shape, arr.dtype, arr.nbytes, spill_dir)
    row = max(1, arr.nbytes // arr.shape[0])
    step = max(1, BLOCK_BYTES // row)
    for start in range(0, arr.shape[0], step):
        block = arr[start:start + step]
        out[start:start + len(block)] = block
        bar.update(block.nbytes)
    return out


class _DaskJob:
    """The row blocks of a conversion, staged by Dask workers in a job directory beside the destination."""

    def __init__(self, src: Any, arrays: Mapping[str, Array | RaggedArray], dst: Location, format: str,
                 compression: str | None, chunks: Any, rename: Mapping[str, str]):
        import json
        import posixpath

        self.src = src
        self.format = format
        self.arrays = {k: a for k, a in arrays.items() if isinstance(a, Array) and a.shape and a.shape[0]}
        ident = json.dumps({"src": src.location.url, "dst": dst.url, "format": format, "compression": compression,
                            "chunks": repr(chunks), "rename": sorted(rename.items()), "checksums": src.checksums,
                            # a replaced local source file (new inode, size or mtime) starts a new job
                            "stamp": file_stamp(src.location) if os.path.isfile(src.location.path) else 0,
                            "arrays": {k: [list(a.shape), str(a.dtype), a.stored_nbytes,
                                           getattr(a.layout, "stamp", None)]
                                       for k, a in self.arrays.items()}}, sort_keys=True, default=str)
        parent, name = posixpath.split(dst.url.rstrip("/"))
        digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
        self.location = Location(f"{parent}/.{name}.unistore-job-{digest}", dst.storage_options)
        self.blocks: dict[str, list[tuple[int, int, str]]] = {}
        for i, (key, arr) in enumerate(self.arrays.items()):
            step = arr.block_rows(BLOCK_BYTES)
            n = arr.shape[0]
            self.blocks[key] = [(start, min(start + step, n), f"a{i:04d}/{start:012d}")
                                for start in range(0, n, step)]
        self.copied = self.skipped = self.encoded = 0
        self.source_bytes_read = 0
        #: arrays the workers also encode: key -> destination array path; their checksums once run
        self.targets: dict[str, str] = {}
        self.checksums: dict[str, str] = {}

    def encode_into(self, key: str, array_path: str, align: int) -> None:
        """Have the workers also write array ``key`` into the destination array at ``array_path``.

        Its blocks are re-cut to whole multiples of ``align`` destination rows
        (a chunk or shard: no two workers write one) that are also whole
        source chunks where both fit in about ``BLOCK_BYTES``.
        """
        import math

        arr = self.arrays[key]
        row = max(1, arr.nbytes // arr.shape[0])
        unit = math.lcm(align, arr.chunks[0]) if arr.chunks else align
        if unit * row > 4 * BLOCK_BYTES:
            unit = align  # chunk grids too far apart to line up: some source chunks are read twice
        step = max(1, BLOCK_BYTES // (unit * row)) * unit
        prefix = self.blocks[key][0][2].split("/")[0]
        self.blocks[key] = [(start, min(start + step, arr.shape[0]), f"{prefix}/{start:012d}-{step}")
                            for start in range(0, arr.shape[0], step)]
        self.targets[key] = array_path

    def run(self, client: Any, progress: bool = False, bar: Any = None) -> None:
        """Stage (and, for arrays given to :meth:`encode_into`, encode) every block in parallel on Dask.

        A block staged and verified by an earlier run is not read from the
        source again.  The checksum of each encoded array is computed here from
        its staged blocks, in order, as they complete.
        """
        from dask.distributed import as_completed

        from unistore.storage.dask_jobs import stage_block

        order = [(key, i) for key, blocks in self.blocks.items() for i in range(len(blocks))]
        futures = {}
        for key, i in order:
            start, stop, name = self.blocks[key][i]
            futures[client.submit(stage_block, self.src, key, start, stop, self.location, name, self.targets.get(key),
                                  self.format, pure=False)] = (key, i)
        if progress and futures:
            from dask.distributed import progress as show_progress

            show_progress(list(futures))
        hashers = {key: hashlib.sha256() for key in self.targets}
        done: dict[str, set[int]] = {key: set() for key in self.targets}
        next_block = dict.fromkeys(self.targets, 0)
        for future in as_completed(futures):
            status, nbytes = future.result()
            self.copied += status == "copied"
            self.skipped += status == "skipped"
            self.source_bytes_read += nbytes
            key, i = futures[future]
            if key not in self.targets:
                continue
            self.encoded += 1
            done[key].add(i)
            while next_block[key] in done[key]:  # hash the finished prefix while the workers go on
                raw = self._verified(key, next_block[key])
                hashers[key].update(raw)
                if bar is not None:
                    bar.update(len(raw))
                next_block[key] += 1
        self.checksums = {key: "sha256:" + h.hexdigest() for key, h in hashers.items()}

    def _verified(self, key: str, i: int) -> bytes:
        """Staged block ``i`` of ``key``, checked against its marker."""
        from unistore.errors import ChecksumMismatchError
        from unistore.storage.checksums import sha256_hex as _sha256

        fs = self.location.fs
        name = self.blocks[key][i][2]
        raw = fs.cat_file(f"{self.location.path}/{name}")
        if _sha256(raw) != fs.cat_file(f"{self.location.path}/{name}.sha256").decode():
            raise ChecksumMismatchError(f"staged block {name} of {key!r} in {self.location.url} changed after "
                                        "it was written; run the conversion again")
        return bytes(raw)

    def assemble(self, key: str, bar: Any, spill_dir: str) -> np.ndarray:
        """Array ``key`` from its staged blocks (each checked against its marker)."""
        arr = self.arrays[key]
        out = _allocate(arr.shape, arr.dtype, arr.nbytes, spill_dir)
        for i, (start, stop, _) in enumerate(self.blocks[key]):
            raw = self._verified(key, i)
            out[start:stop] = np.frombuffer(raw, dtype=arr.dtype).reshape((stop - start,) + arr.shape[1:])
            bar.update(len(raw))
        return out

    def remove(self) -> None:
        if self.location.exists():
            self.location.fs.rm(self.location.path, recursive=True)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)
