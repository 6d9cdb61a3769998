"""Every exception unistore raises on bad input.

Each error subclasses :class:`UnistoreError` *and* the built-in it refines, so
existing ``except KeyError`` / ``except FileNotFoundError`` clauses keep
working.  Messages say what was expected, what was found and how to fix it;
they never contain credentials.
"""

from __future__ import annotations

__all__ = [
    "UnistoreError",
    "StoreNotFoundError",
    "ArrayNotFoundError",
    "InvalidKeyError",
    "ArgumentTypeError",
    "FormatError",
    "UnknownFormatError",
    "MissingDependencyError",
    "CredentialsError",
    "CorruptDataError",
    "TruncatedDataError",
    "UnsafePickleError",
    "ShapeMismatchError",
    "LabelCorrectionsError",
    "ProcessGroupError",
    "ReadOnlyError",
    "StoreExistsError",
    "IncompleteStoreError",
    "RemoteError",
    "DiskFullError",
    "StoreChangedError",
    "ChecksumMismatchError",
    "UnsupportedError",
    "OutOfBoundsError",
    "CatalogUnavailableError",
    "CatalogCorruptError",
    "DatasetNotFoundError",
    "IntegrityError",
    "NonFiniteMetricError",
]


class UnistoreError(Exception):
    """Base class of every error raised by unistore."""


class StoreNotFoundError(UnistoreError, FileNotFoundError):
    """The URL given to ``open_store`` does not exist."""


class ArrayNotFoundError(UnistoreError, KeyError):
    """A key names no array in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidKeyError(UnistoreError, ValueError):
    """A key or path is unsafe (``..``, absolute, NUL, backslash) or malformed."""


class ArgumentTypeError(UnistoreError, TypeError):
    """An argument has the wrong type (a number where a path or URL belongs, say)."""


class FormatError(UnistoreError, ValueError):
    """A file is not valid for the format it claims to be."""


class UnknownFormatError(UnistoreError, ValueError):
    """No format could be detected, or the format name is not registered."""


class MissingDependencyError(UnistoreError, ImportError):
    """An optional library needed by a format is not installed."""


class CorruptDataError(FormatError):
    """Stored bytes do not decode to what the metadata promises."""


class TruncatedDataError(CorruptDataError):
    """A file is shorter than its header says it must be."""


class UnsafePickleError(UnistoreError, ValueError):
    """A pickle would execute code or build objects other than plain data."""


class ShapeMismatchError(UnistoreError, ValueError):
    """Data has a shape or dtype other than the one declared or required."""


class ReadOnlyError(UnistoreError, PermissionError):
    """A write was attempted on a store opened for reading."""


class StoreExistsError(UnistoreError, FileExistsError):
    """``create_store``/``convert`` would overwrite an existing store."""


class IncompleteStoreError(UnistoreError, FileNotFoundError):
    """A store is still being written (or its writer died before committing)."""


class RemoteError(UnistoreError, OSError):
    """A remote filesystem kept failing after the retry budget was spent."""


class CredentialsError(RemoteError, PermissionError):
    """A remote store needs credentials that were not found, or the server refused the ones given; the message
    names the ``storage_options`` keys and environment variables that supply them."""


class StoreChangedError(UnistoreError, OSError):
    """A store was rewritten (``overwrite=True``) or removed after it was opened: its files are not the ones
    described when it was opened, so no bytes are served from them.  Open it again to read the new version."""


class DiskFullError(UnistoreError, OSError):
    """A local disk has no room for a file unistore writes (a conversion's spill file, a preallocated array)."""


class ChecksumMismatchError(CorruptDataError):
    """An array's bytes do not match the checksum recorded when it was written."""


class UnsupportedError(UnistoreError, ValueError):
    """The format cannot do what was asked (e.g. compression for ``.npy``)."""


class OutOfBoundsError(UnistoreError, IndexError):
    """A row index is outside the array."""


class CatalogUnavailableError(UnistoreError, ConnectionError):
    """The catalog database cannot be reached or opened."""


class CatalogCorruptError(CorruptDataError):
    """The catalog file is not a readable database (corrupt, truncated, or not a catalog at all)."""


class DatasetNotFoundError(StoreNotFoundError, ValueError):
    """A dataset directory, or a file, split or array a dataset class needs, is missing.

    Both a ``FileNotFoundError`` and a ``ValueError``: the seed dataset classes
    documented either for this case.
    """


class LabelCorrectionsError(UnistoreError, ValueError):
    """Label corrections made through unistore no longer fit the dataset they were made on (its ``dataset.db``
    changed: a corrected sample is gone, or its labels changed shape).  The corrections are kept; the message
    names the commands that export or discard them."""


class ProcessGroupError(UnistoreError, RuntimeError):
    """``distributed=True`` was asked for, but no ``torch.distributed`` process group is initialised."""


class IntegrityError(UnistoreError, ValueError):
    """Arrays of one dataset disagree: an index points outside the array it refers to."""


class NonFiniteMetricError(UnistoreError, ValueError):
    """A metric is NaN or +/-inf where a finite number is needed."""
