"""Optional libraries and the extras that bring them.

Each feature beyond reading ``.npy`` files needs a library that a bare
``pip install unistore`` does not install.  :func:`require` imports it, and
when it is missing raises :class:`~unistore.errors.MissingDependencyError`
(an ``ImportError``) naming the extra to install - the table below is the one
the docs' installation page shows.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: importable module -> (extra that installs it, what needs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("torch", "tensors, the .pt format and the dataset classes"),
    "safetensors": ("safetensors", "the safetensors format"),
    "h5py": ("hdf5", "the HDF5 format"),
    "zarr": ("zarr", "the zarr format"),
    "s3fs": ("s3", "s3:// stores"),
    "obstore": ("s3", "the obstore transport"),
    "sqlalchemy": ("catalog", "the catalog (unistore db, dataset metadata, label corrections)"),
    "alembic": ("catalog", "catalog migrations"),
    "chromadb": ("experiments", "experiment search"),
    "dask": ("dask", "Dask arrays and conversions on a cluster"),
    "distributed": ("dask", "running on a Dask cluster"),
    "transformers": ("lora", "text conditions of the LoRA datasets"),
    "upath": ("lora", "remote checkpoint paths of the LoRA datasets"),
}


def install_hint(module: str) -> str:
    """``pip install 'unistore[extra]'`` for a module of :data:`EXTRAS` (else ``pip install module``)."""
    top = module.split(".", 1)[0]
    extra = EXTRAS.get(top, (None, ""))[0]
    return f"pip install 'unistore[{extra}]'" if extra else f"pip install {top}"


def require(module: str, needed_for: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``, or a :class:`~unistore.errors.MissingDependencyError` naming the
    extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        from unistore.errors import MissingDependencyError

        top = module.split(".", 1)[0]
        what = needed_for or EXTRAS.get(top, ("", top))[1]
        hint = install_hint(top)
        raise MissingDependencyError(f"{top} is not installed ({e}); it is needed for {what}: {hint}") from e
