"""The lazy format registry and format detection.

Each name maps to ``module:Class`` plus an install hint; the module is
imported on first use.  Third-party formats register through the
``unistore.formats`` entry-point group; a broken plugin warns instead of
breaking ``import unistore``.
"""

from __future__ import annotations

import importlib
import posixpath
import warnings

from unistore.errors import MissingDependencyError, StoreNotFoundError, UnknownFormatError
from unistore.storage.formats.base import META_NAME, PENDING_NAME, Format, incomplete_error, loads_meta
from unistore.storage.location import Location, retry_remote

__all__ = ["get_format", "available_formats", "detect_format", "register_format", "missing_library"]

_REGISTRY: dict[str, tuple[str, str]] = {
    "npy": ("unistore.storage.formats._npy:NpyFormat", "numpy"),
    "pt": ("unistore.storage.formats._pt:PtFormat", "pip install 'unistore[torch]' (or pip install torch)"),
    "safetensors": ("unistore.storage.formats._safetensors:SafetensorsFormat", "pip install 'unistore[safetensors]'"),
    "hdf5": ("unistore.storage.formats._hdf5:Hdf5Format", "pip install 'unistore[hdf5]'"),
    "zarr": ("unistore.storage.formats._zarr:ZarrFormat", "pip install 'unistore[zarr]'"),
}
#: the library each built-in format reads with (imported only when a store of that format is read)
_LIBRARIES = {"pt": "torch", "safetensors": "safetensors", "hdf5": "h5py", "zarr": "zarr"}
_ALIASES = {"h5": "hdf5", "torch": "pt", "numpy": "npy", "memmap": "npy", "raw": "npy", "st": "safetensors"}
_LOADED: dict[str, Format] = {}
_PLUGINS_SCANNED = False


def register_format(name: str, target: str, hint: str = "") -> None:
    """Register a format class at ``"package.module:Class"`` under ``name``."""
    _REGISTRY[name] = (target, hint)
    _LOADED.pop(name, None)


def _scan_plugins() -> None:
    global _PLUGINS_SCANNED
    if _PLUGINS_SCANNED:
        return
    _PLUGINS_SCANNED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="unistore.formats"):
        try:
            register_format(ep.name, ep.value, f"reinstall the package providing {ep.value}")
        except Exception as e:  # a broken plugin must not break unistore
            warnings.warn(f"unistore format plugin {ep.name!r} failed to register: {e}", stacklevel=2)


def missing_library(name: str) -> MissingDependencyError | None:
    """The error opening a ``name`` store would raise because its library is not installed, else None
    (found without importing the library)."""
    import importlib.util

    name = _ALIASES.get(name, name)
    library = _LIBRARIES.get(name)
    try:
        if library is None or importlib.util.find_spec(library) is not None:
            return None
    except (ImportError, ValueError):  # a broken installation: not importable either
        pass
    return MissingDependencyError(f"format {name!r} needs {library}, which is not installed; "
                                  f"{_REGISTRY[name][1]}")


def available_formats() -> list[str]:
    """Names of every registered format (importable or not)."""
    _scan_plugins()
    return sorted(_REGISTRY)


def get_format(name: str) -> Format:
    """The format object registered as ``name`` (imported on first use).

    Raises:
        UnknownFormatError: no such format.
        MissingDependencyError: its library is not installed (with the pip command).
    """
    _scan_plugins()
    name = _ALIASES.get(name, name)
    missing = missing_library(name) if name in _REGISTRY else None
    if missing is not None:
        raise missing
    if name in _LOADED:
        return _LOADED[name]
    if name not in _REGISTRY:
        raise UnknownFormatError(f"unknown format {name!r}; choose one of {', '.join(available_formats())}")
    target, hint = _REGISTRY[name]
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MissingDependencyError(f"format {name!r} needs a library that is not installed ({e}); {hint}") from e
    fmt: Format = getattr(module, cls_name)()
    _LOADED[name] = fmt
    return fmt


_MAGIC = (
    (b"\x93NUMPY", "npy"),
    (b"\x89HDF\r\n\x1a\n", "hdf5"),
    (b"PK\x03\x04", "pt"),
)
_EXT = {".npy": "npy", ".pt": "pt", ".pth": "pt", ".safetensors": "safetensors", ".h5": "hdf5",
        ".hdf5": "hdf5", ".hdf": "hdf5", ".zarr": "zarr"}


def _sniff_head(head: bytes) -> str | None:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return None


def detect_format(location: Location) -> str:
    """Guess the format at ``location``: magic bytes first, names second.

    Raises:
        StoreNotFoundError: nothing exists at the location.
        UnknownFormatError: it exists but matches no format.
    """
    fs = location.fs
    if not location.exists():
        raise StoreNotFoundError(f"no store at {location.url}: the path does not exist")
    if location.isdir():
        names = [posixpath.basename(p.rstrip("/")) for p in retry_remote(lambda: fs.ls(location.path, detail=False),
                                                                         location)]
        if "zarr.json" in names or ".zgroup" in names or ".zarray" in names:
            return "zarr"
        if PENDING_NAME in names and META_NAME not in names:
            raise incomplete_error(location)
        if META_NAME in names:
            meta = loads_meta(retry_remote(lambda: fs.cat_file(posixpath.join(location.path, META_NAME)), location))
            if meta.get("format"):
                return str(meta["format"])
        counts: dict[str, int] = {}
        for n in names:
            ext = posixpath.splitext(n)[1].lower()
            if ext in _EXT:
                counts[_EXT[ext]] = counts.get(_EXT[ext], 0) + 1
        if counts:
            return max(counts, key=lambda k: counts[k])
        raise UnknownFormatError(
            f"{location.url} is a directory with no .npy, .pt, .safetensors or zarr metadata; "
            "pass format=... explicitly"
        )
    head = retry_remote(lambda: fs.cat_file(location.path, start=0, end=16), location)
    found = _sniff_head(head)
    if found:
        return found
    ext = posixpath.splitext(location.path)[1].lower()
    if ext in _EXT:
        return _EXT[ext]
    raise UnknownFormatError(f"cannot tell the format of {location.url} from its first bytes or its name; "
                             "pass format=... explicitly")
