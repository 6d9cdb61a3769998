"""The caches of the read path, split by job.

- :mod:`~unistore.storage.cache.entries`: :class:`DiskCache`, remote blocks
  and decoded chunks as files on local disk - entries, their checksums, the
  shared usage count and eviction;
- :mod:`~unistore.storage.cache.claims`: one process fetches or decodes an
  entry while the others wait (``flock`` claims, the fork hook);
- :mod:`~unistore.storage.cache.mapping`: :class:`MappedObject`, an object's
  cached blocks mapped side by side in one process;
- :mod:`~unistore.storage.cache.chunks`: the per-process decoded-chunk LRU.

Every budget knob and the eviction policy: :mod:`unistore.storage.budget`.

>>> store = unistore.open_store("s3://bucket/run1.npy", cache="/scratch/unistore-cache")
>>> # or: export UNISTORE_CACHE_DIR=/scratch/unistore-cache  (UNISTORE_CACHE_BYTES, default 50 GiB)
"""

from unistore.storage.cache.chunks import ChunkCache, chunk_cache
from unistore.storage.cache.entries import BlockWriter, CacheRefusedError, DiskCache, default_cache
from unistore.storage.cache.mapping import MappedObject, sweep_mapped

__all__ = ["DiskCache", "default_cache", "BlockWriter", "CacheRefusedError", "MappedObject", "sweep_mapped",
           "ChunkCache", "chunk_cache"]
