"""Exceptions raised by :mod:`cas`.

One base class, :class:`CasError`; each concrete error also subclasses the builtin a
caller already catches (``ValueError`` for bad input, ``FileNotFoundError`` for missing
chunks, ...), and carries the object it is about (a path, a chunk id, a store location)
so that the message says *what* failed and *where*.
"""

from __future__ import annotations


class CasError(Exception):
    """Base class of every error raised by cas."""


class ManifestError(CasError, ValueError):
    """A manifest could not be decoded or is not valid (truncated, garbage, bad version...)."""


class UnsafePathError(ManifestError):
    """A path or symlink would leave the tree's root (``..``, absolute, escaping link...)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class UnsupportedVersionError(ManifestError):
    """A manifest, journal or store written by an unknown format version."""


class ChunkError(CasError):
    """Base class of errors about one chunk; ``chunk_id`` is its hex id."""

    def __init__(self, message: str, chunk_id: str | None = None) -> None:
        super().__init__(message)
        self.chunk_id = chunk_id


class ChunkCorruptError(ChunkError, ValueError):
    """Bytes that claim to be a chunk do not hash to its id."""


class ChunkNotFoundError(ChunkError, FileNotFoundError):
    """A chunk was asked for that no source holds."""

    def __str__(self) -> str:  # FileNotFoundError's str() would show only errno fields
        return str(self.args[0]) if self.args else "chunk not found"


class StoreError(CasError, OSError):
    """A chunk store failed (I/O, a corrupt index...); ``location`` names the store."""

    def __init__(self, message: str, location: str | None = None) -> None:
        super().__init__(message)
        self.location = location

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "store error"


class StoreBusyError(StoreError):
    """A store operation conflicts with one another process holds (a GC, a persist)."""


class GcError(StoreError):
    """Garbage collection refused to delete: the live set could not be read in full."""


class SnapshotError(CasError, OSError):
    """A file or folder could not be snapshotted; ``path`` names it."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "snapshot failed"


class FileChangedError(SnapshotError):
    """A file kept changing while it was read: no consistent state of it could be captured."""


class MaterializeError(CasError, OSError):
    """A tree could not be made equal to a manifest; the tree is as it was before."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "materialize failed"
