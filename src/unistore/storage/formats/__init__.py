"""The lazy format registry and format detection.

Each name maps to ``module:Class``; the module is imported on first use
(format modules import their own libraries only when a store is read or
written).  Extensions, magic bytes, store suffixes and libraries are class
attributes of each format, and every table here is built from them: adding a
format is one module and one registry line.  Third-party formats register through the
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

__all__ = ["get_format", "available_formats", "detect_format", "register_format", "missing_library",
           "format_class", "store_suffix", "store_suffixes", "directory_markers"]

#: name -> ``"module:Class"`` of the format; what a format is (its extensions, magic bytes, store suffix,
#: library) is said by the class itself (:class:`~unistore.storage.formats.base.Format`), and every table
#: below is built from these classes
_REGISTRY: dict[str, str] = {
    "npy": "unistore.storage.formats._npy:NpyFormat",
    "pt": "unistore.storage.formats._pt:PtFormat",
    "safetensors": "unistore.storage.formats._safetensors:SafetensorsFormat",
    "hdf5": "unistore.storage.formats._hdf5:Hdf5Format",
    "zarr": "unistore.storage.formats._zarr:ZarrFormat",
}
#: how to install what a plugin format needs, as its registration said
_HINTS: dict[str, str] = {}
_ALIASES = {"h5": "hdf5", "torch": "pt", "numpy": "npy", "memmap": "npy", "raw": "npy", "st": "safetensors"}
_CLASSES: dict[str, type[Format]] = {}
_LOADED: dict[str, Format] = {}
_PLUGINS_SCANNED = False


def register_format(name: str, target: str, hint: str = "") -> None:
    """Register a format class at ``"package.module:Class"`` under ``name``."""
    _REGISTRY[name] = target
    _HINTS[name] = hint
    _CLASSES.pop(name, None)
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


def format_class(name: str) -> type[Format]:
    """The class of the format registered as ``name`` (its module imported; format modules import their
    libraries only when a store is read or written).

    Raises:
        UnknownFormatError: no such format.
        MissingDependencyError: its module cannot be imported.
    """
    _scan_plugins()
    name = _ALIASES.get(name, name)
    found = _CLASSES.get(name)
    if found is not None:
        return found
    if name not in _REGISTRY:
        raise UnknownFormatError(f"unknown format {name!r}; choose one of {', '.join(available_formats())}")
    module_name, _, cls_name = _REGISTRY[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MissingDependencyError(f"format {name!r} needs a library that is not installed ({e}); "
                                     f"{_HINTS.get(name, '')}") from e
    found = _CLASSES[name] = getattr(module, cls_name)
    return found


def _classes() -> list[tuple[str, type[Format]]]:
    """Every registered format whose class can be imported, in registration order."""
    out = []
    for name in available_formats(sort=False):
        try:
            out.append((name, format_class(name)))
        except (MissingDependencyError, AttributeError) as e:
            warnings.warn(f"unistore format {name!r} cannot be loaded: {e}", stacklevel=2)
    return out


def compressing_formats() -> list[tuple[str, tuple[str, ...]]]:
    """``(format, its compressions)`` for every registered format that compresses."""
    return [(name, cls.compressions) for name, cls in _classes() if cls.compressions]


def missing_library(name: str) -> MissingDependencyError | None:
    """The error opening a ``name`` store would raise because its library is not installed, else None
    (found without importing the library)."""
    import importlib.util

    cls = format_class(name)
    if cls.library is None:
        return None
    try:
        if importlib.util.find_spec(cls.library) is not None:
            return None
    except (ImportError, ValueError):  # a broken installation: not importable either
        pass
    return MissingDependencyError(f"format {cls.name!r} needs {cls.library}, which is not installed; "
                                  f"{cls.install_hint or _HINTS.get(cls.name, '')}")


def available_formats(sort: bool = True) -> list[str]:
    """Names of every registered format (importable or not)."""
    _scan_plugins()
    return sorted(_REGISTRY) if sort else list(_REGISTRY)


def get_format(name: str) -> Format:
    """The format object registered as ``name`` (imported on first use).

    Raises:
        UnknownFormatError: no such format.
        MissingDependencyError: its library is not installed (with the pip command).
    """
    name = _ALIASES.get(name, name)
    cls = format_class(name)
    missing = missing_library(name)
    if missing is not None:
        raise missing
    if name not in _LOADED:
        _LOADED[name] = cls()
    return _LOADED[name]


def store_suffix(name: str) -> str:
    """The suffix a store of format ``name`` is named with (``""``: a directory of files)."""
    return format_class(name).store_suffix


def store_suffixes() -> tuple[str, ...]:
    """Every suffix a store path may carry, ``""`` first: what to try when a dataset names a store without one."""
    found = [""]
    for _, cls in _classes():
        for suffix in (cls.store_suffix, *cls.extensions):
            if suffix not in found:
                found.append(suffix)
    return tuple(found)


def directory_markers() -> tuple[str, ...]:
    """Names whose presence makes a directory a store of some format (zarr's metadata documents)."""
    return tuple(m for _, cls in _classes() for m in cls.markers)


def _sniff_head(head: bytes) -> str | None:
    for name, cls in _classes():
        if cls.sniff(head):
            return name
    return None


def _extensions() -> dict[str, str]:
    """``{file extension: format}`` of every format, the first format to claim an extension winning."""
    table: dict[str, str] = {}
    for fmt, cls in _classes():
        for ext in cls.extensions:
            table.setdefault(ext, fmt)
    return table


def _by_extension(name: str, table: dict[str, str]) -> str | None:
    return table.get(posixpath.splitext(name)[1].lower())


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
        for fmt, cls in _classes():
            if any(m in names for m in cls.markers):
                return fmt
        if PENDING_NAME in names and META_NAME not in names:
            raise incomplete_error(location)
        if META_NAME in names:
            meta = loads_meta(retry_remote(lambda: fs.cat_file(posixpath.join(location.path, META_NAME)), location))
            if meta.get("format"):
                return str(meta["format"])
        counts: dict[str, int] = {}
        extensions = _extensions()
        for n in names:
            named = _by_extension(n, extensions)
            if named is not None:
                counts[named] = counts.get(named, 0) + 1
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
    by_name = _by_extension(location.path, _extensions())
    if by_name is not None:
        return by_name
    raise UnknownFormatError(f"cannot tell the format of {location.url} from its first bytes or its name; "
                             "pass format=... explicitly")
