"""Exceptions raised by :mod:`cas`.

One base class, :class:`CasError`; each concrete error also subclasses the builtin a
caller already catches (``ValueError`` for bad input, ``FileNotFoundError`` for missing
chunks, ...), and carries ``where``, the object it is about (a path, a store location),
and ``errno`` when an OS error number applies, so that the message says *what* failed and
*where*.

The boilerplate every error needs is written once, in :class:`LocatedError` (which
``pathapi``'s errors build on too): storing ``where`` and ``errno``, ``str()`` being the
message (never ``OSError``'s ``[Errno n]`` form), and pickling with every field, since
errors cross process boundaries (a work's process and the flow's).
"""

from __future__ import annotations

from typing import Any, TypeVar

_E = TypeVar("_E", bound="LocatedError")


def restore(cls: type[_E], args: tuple[Any, ...], errno: int | None) -> _E:
    """An error of ``cls`` with these ``args`` and ``errno``, made without calling its
    ``__init__`` (whose signature is the class's own business); pickle then sets the
    instance's other fields from its ``__dict__``."""
    err = cls.__new__(cls, *args)
    err.args = args
    err.errno = errno  # OSError keeps it in a slot, which no __dict__ carries
    return err


class LocatedError(Exception):
    """What every error of cas and pathapi shares; not raised itself.

    ``where`` is the path, URL, store location or work the error is about (None when the
    raiser cannot know it); ``errno`` is the OS error number behind it, if one applies. For
    an ``OSError`` subclass ``errno`` is ``OSError``'s own attribute.
    """

    where: str | None
    errno: int | None

    def __init__(self, message: str, where: str | None = None, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.where = where
        self.errno = errno

    def __str__(self) -> str:  # OSError's str() would show errno fields, or the tuple of args
        return str(self.args[0]) if self.args else type(self).__name__

    def __reduce__(self) -> tuple[Any, ...]:
        # The default rebuilds with cls(*args), which breaks when __init__ takes other
        # arguments than the message, and loses OSError's errno.
        return restore, (type(self), self.args, self.errno), self.__dict__


class _AtPath(LocatedError):
    """An error about one filesystem path; ``path`` is ``where``, the name it had first."""

    @property
    def path(self) -> str | None:
        return self.where


class CasError(LocatedError):
    """Base class of every error raised by cas."""


class ManifestError(CasError, ValueError):
    """A manifest could not be decoded or is not valid (truncated, garbage, bad version...)."""


class UnsafePathError(ManifestError, _AtPath):
    """A path or symlink would leave the tree's root (``..``, absolute, escaping link...)."""


class UnsupportedVersionError(ManifestError):
    """A manifest, journal or store written by an unknown format version."""


class ChunkError(CasError):
    """Base class of errors about one chunk; ``chunk_id`` is its hex id."""

    def __init__(self, message: str, chunk_id: str | None = None, *, where: str | None = None,
                 errno: int | None = None) -> None:
        super().__init__(message, where, errno=errno)
        self.chunk_id = chunk_id


class ChunkCorruptError(ChunkError, ValueError):
    """Bytes that claim to be a chunk do not hash to its id."""


class ChunkNotFoundError(ChunkError, FileNotFoundError):
    """A chunk was asked for that no source holds."""


class StoreError(CasError, OSError):
    """A chunk store failed (I/O, a corrupt index...); ``where`` (or ``location``) names the store."""

    @property
    def location(self) -> str | None:
        return self.where


class StoreBusyError(StoreError):
    """A store operation conflicts with one another process holds (a GC, a persist)."""


class BadStoreUrlError(StoreError, ValueError):
    """A store URL no repository can be opened from (an unknown scheme, a malformed S3 URL)."""


class BadRefNameError(CasError, ValueError):
    """A ref name no ref store takes: not a string, or empty."""


class GcError(StoreError):
    """Garbage collection refused to delete: the live set could not be read in full."""


class SnapshotError(CasError, _AtPath, OSError):
    """A file or folder could not be snapshotted; ``where`` (or ``path``) names it."""


class FileChangedError(SnapshotError):
    """A file kept changing while it was read: no consistent state of it could be captured."""


class MaterializeError(CasError, _AtPath, OSError):
    """A tree could not be made equal to a manifest; the tree is as it was before, unless the
    message says otherwise. ``where`` (or ``path``) is the destination."""
