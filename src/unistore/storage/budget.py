"""Every budget knob of the read path, and the eviction policy, in one place.

Each knob is read when it is used (``budget.NAME``), so a test or a user
setting it at runtime changes what the next read does; each has an
environment variable read at import.

Eviction policy (one rule per cache):

- **Disk cache** (:mod:`unistore.storage.cache`): bounded in bytes by
  ``max_bytes`` (``UNISTORE_CACHE_BYTES``, :data:`DEFAULT_CACHE_BYTES`).  A
  writer that would pass the budget first evicts the least recently used
  entries (by atime) down to :data:`EVICT_TO` of it.  An entry deleted while
  a process maps it keeps its disk space until it is unmapped, hence the two
  mapping bounds below.
- **Mapped cache entries**: a process keeps at most :data:`MAX_MAPS` entry
  mappings, holding at most 1/:data:`MAPS_SHARE` of the disk budget, least
  recently used dropped first; an object's blocks are mapped side by side
  only when the whole object fits in the disk budget, at most
  :data:`MAX_MAPPED_BLOCKS` blocks per process, and each 1/``MAPS_SHARE`` of
  the budget newly mapped, objects with evicted blocks are let go.
- **Decoded-chunk LRU** (:mod:`unistore.storage.cache.chunks`): per process,
  :data:`CHUNK_CACHE_BYTES`, least recently used first; an entry larger than
  the whole budget is used once and not kept.
- **Local file mappings**: at most :data:`MAX_MAPPED_FILES` files mapped per
  process, least recently used unmapped first.
- **Sample cache** of :class:`~unistore.datasets.ClusterLabeledDataset`: the
  ``cache_size`` samples its seed document specifies (an argument, not a knob
  here), least recently used first; the rows it copies come through the
  caches above.
"""

from __future__ import annotations

import os

# ------------------------------------------------------------- planning
#: two requested row ranges closer than this are fetched as one request
MERGE_GAP_BYTES = int(os.environ.get("UNISTORE_MERGE_GAP_BYTES", 16 * 1024))
#: at most this many bytes in one merged request
MAX_REQUEST_BYTES = 16 << 20
#: range requests of one read in flight at once (one connection each), where unistore schedules them
MAX_CONCURRENT_REQUESTS = 16
#: runs of consecutive chunks of one read decoded at once (threads)
MAX_CONCURRENT_RUNS = 16
#: a remote HDF5 file read without a disk cache is read ahead this far past what h5py asks for (its many small
#: metadata reads then cost one request)
HDF5_READ_AHEAD_BYTES = 1 << 20
#: local row ranges at least this large are read with ``readinto`` rather than copied out of the ``mmap``
PREAD_MIN_BYTES = 1 << 20

# ----------------------------------------------------------- disk cache
DEFAULT_CACHE_BYTES = 50 << 30
DEFAULT_BLOCK_BYTES = 2 << 20
#: block size of new caches (each block is a file and, when mapped, a kernel mapping)
BLOCK_BYTES = int(os.environ.get("UNISTORE_CACHE_BLOCK_BYTES", DEFAULT_BLOCK_BYTES))
#: missing blocks are fetched in requests of at most this many bytes
MAX_RUN_BYTES = 16 << 20
#: a read-ahead writes the bytes of a run into its blocks as they arrive, in pieces of at least this many bytes
STREAM_PIECE_BYTES = 256 << 10
#: an eviction leaves the cache at this share of its budget
EVICT_TO = 0.9
#: an entry's "checked" mark is trusted for this long; then its checksum is checked again (bit rot keeps the mtime)
REVERIFY_SECONDS = float(os.environ.get("UNISTORE_CACHE_REVERIFY_SECONDS", 24 * 3600))
#: lock files (a fixed pool) that let one process fetch or decode an entry while others wait for it
N_LOCKS = 4096

# ------------------------------------------------------------- mappings
#: verified entries a process keeps mapped: at most this many, holding at most 1/``MAPS_SHARE`` of the budget
MAX_MAPS = 4096
MAPS_SHARE = 8
#: blocks one process maps side by side at most, over all its objects (half the kernel's default limit on a
#: process's mappings, ``vm.max_map_count``); objects beyond it are read block by block
MAX_MAPPED_BLOCKS = 32768
#: files a process keeps mapped between reads; each mapping holds a file descriptor, so the number is bounded
#: well below the usual limit of 1024 open files
MAX_MAPPED_FILES = int(os.environ.get("UNISTORE_MAX_MAPPED_FILES", 256))

# ----------------------------------------------------------- read-ahead
#: rows of remote uncompressed arrays the loader's chunk-aware order keeps together: ranges this large keep a
#: bucket's bandwidth busy, where a request per row (or per small block) waits on latency
REMOTE_BLOCK_BYTES = 8 << 20
#: batches a read-ahead reads at once (each batch's missing blocks or chunks are themselves fetched concurrently)
MAX_READS_AHEAD = 8
#: blocks of the chunk-aware order a read-ahead reads at once: a few large requests keep a distant bucket's
#: bandwidth busy, and more only share it, delaying the blocks needed first
MAX_BLOCKS_AHEAD = 4

# -------------------------------------------------------- decoded chunks
#: bytes of decoded chunks one process keeps (``UNISTORE_CHUNK_CACHE_BYTES``)
CHUNK_CACHE_BYTES = int(os.environ.get("UNISTORE_CHUNK_CACHE_BYTES", 1 << 30))
