"""``pathapi.Path``: a ``pathlib.Path`` that knows which work owns its files.

``str(p)`` and ``os.fspath(p)`` are the plain relative path (``lit://`` removed), so every
``os``/``pathlib``/``open`` call works on it inside a work, relative to that work's root.
On top, a Path carries its origin (the work that owns the files) and its consumer (the work
holding this reference), and can ``get()`` the origin's current files.

pathlib's internals differ between Python 3.11 and 3.12+: on 3.12+ derived paths are made
by ``with_segments``; on 3.11 by the classmethods ``_from_parts``/``_from_parsed_parts``,
which we make "hybrid" (bound to the instance when called on one) so every derived path
(``p / "a"``, ``p.parent``, ``p.with_suffix()``...) keeps its origin.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Any

import blake3

from . import transfer
from .errors import LitPathError
from .transfer import TransferRecord

LIT = "lit://"


def check_lit(rel: str, written: str) -> None:
    """Refuse a ``lit://`` path that could leave the work's root: an absolute path, or any
    ``..`` component (the origin and the persister refuse them too). Checked when the string becomes a Path, so that no persist or serve of
    another work's (or the host's) files can ever start from one."""
    if "\x00" in rel:
        raise LitPathError(f"{written!r}: a lit:// path cannot hold a NUL byte")
    if rel.startswith("/"):
        raise LitPathError(
            f"{written!r} is absolute: a lit:// path is relative to its work's root "
            f"(write lit://{rel.lstrip('/')} for the folder inside the root)"
        )
    if ".." in rel.split("/"):
        raise LitPathError(
            f"{written!r} has a '..' component: a lit:// path names a place inside its work's root "
            "(a work shares only its own files; to hand over another work's files, pass that work's Path)"
        )


def _strip_lit(args: tuple[Any, ...]) -> tuple[tuple[Any, ...], bool]:
    if args and isinstance(args[0], str) and args[0].startswith(LIT):
        rel = args[0][len(LIT):] or "."
        check_lit(rel, args[0])
        return (rel, *args[1:]), True
    return args, False


def _meta_from(args: tuple[Any, ...]) -> dict[str, Any]:
    if args and isinstance(args[0], Path):
        return args[0]._meta()
    return {}


class _Hybrid:
    """A classmethod that also receives the instance it was called on (or None)."""

    def __init__(self, func: Any) -> None:
        self.func = func

    def __get__(self, obj: Any, cls: type) -> Any:
        def bound(*args: Any) -> Any:
            return self.func(cls, obj, *args)

        return bound


class Path(pathlib.PosixPath):
    """A path that may be shared between works. See SPEC, "Path"."""

    _origin: str | None
    _origin_work: Any
    _consumer: str | None
    _last_transfer: TransferRecord | None

    if sys.version_info >= (3, 12):

        def __init__(self, *args: Any, origin: str | None = None, consumer: str | None = None) -> None:
            meta = _meta_from(args)
            args, _ = _strip_lit(args)
            super().__init__(*args)
            self._set_meta(meta, origin, consumer)

        def with_segments(self, *segments: Any) -> Path:
            new = type(self)(*segments)
            new._set_meta(self._meta(), None, None)
            return new

    else:

        def __new__(cls, *args: Any, origin: str | None = None, consumer: str | None = None) -> Path:
            meta = _meta_from(args)
            args, _ = _strip_lit(args)
            self = pathlib.PosixPath._from_parts.__func__(cls, args)  # type: ignore[attr-defined]
            self._set_meta(meta, origin, consumer)
            return self  # type: ignore[no-any-return]

        @_Hybrid
        def _from_parts(cls, src: Path | None, args: Any) -> Path:  # type: ignore[override]
            new = pathlib.PosixPath._from_parts.__func__(cls, args)  # type: ignore[attr-defined]
            new._set_meta(src._meta() if src is not None else {}, None, None)
            return new  # type: ignore[no-any-return]

        @_Hybrid
        def _from_parsed_parts(cls, src: Path | None, drv: str, root: str, parts: list[str]) -> Path:  # type: ignore[override]
            new = pathlib.PosixPath._from_parsed_parts.__func__(cls, drv, root, parts)  # type: ignore[attr-defined]
            new._set_meta(src._meta() if src is not None else {}, None, None)
            return new  # type: ignore[no-any-return]

        @property
        def parents(self) -> tuple[Path, ...]:  # type: ignore[override]
            # 3.11's parents sequence builds paths from the class, dropping the origin.
            out: list[Path] = []
            cur = self.parent
            while not out or cur != out[-1]:
                out.append(cur)
                cur = cur.parent
            return tuple(p for p in out if os.fspath(p) != os.fspath(self))

    # -- metadata ----------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "origin": getattr(self, "_origin", None),
            "origin_work": getattr(self, "_origin_work", None),
            "consumer": getattr(self, "_consumer", None),
        }

    def _set_meta(self, meta: dict[str, Any], origin: str | None, consumer: str | None) -> None:
        self._origin = origin if origin is not None else meta.get("origin")
        self._origin_work = None if origin is not None else meta.get("origin_work")
        self._consumer = consumer if consumer is not None else meta.get("consumer")
        self._last_transfer = None

    def attach_origin(self, work: Any) -> None:
        """Make ``work`` the origin (its name may only be known once it joins a flow).
        Called by a Work when a Path without an origin is assigned to it."""
        self._origin_work = work
        self._origin = None

    @property
    def has_origin(self) -> bool:
        """Whether an origin is set (by name, or as a work whose name is not known yet)."""
        return self._origin is not None or self._origin_work is not None

    def held_by(self, consumer: str) -> None:
        """Work ``consumer`` holds this reference to another work's files (set by the
        runtime when a run receives it)."""
        self._consumer = consumer

    @property
    def origin_name(self) -> str | None:
        """The name of the work that owns the files (None if not yet known)."""
        if self._origin is None and self._origin_work is not None:
            name = getattr(self._origin_work, "_name", None)
            if name:
                self._origin = name
                self._origin_work = None
        return self._origin

    @property
    def consumer_name(self) -> str | None:
        """The name of the work holding this reference, or None."""
        return self._consumer

    @property
    def hash(self) -> str:
        """A stable id of (origin, path): equal for equal Paths in every process and run."""
        return blake3.blake3(f"{self.origin_name or ''}\x00{os.fspath(self)}".encode("utf-8", "surrogateescape")).hexdigest()

    @property
    def last_transfer(self) -> TransferRecord | None:
        """What the last ``get`` of this Path did (None before one)."""
        return self._last_transfer

    # -- identity ----------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if isinstance(other, Path):
            return os.fspath(self) == os.fspath(other) and self.origin_name == other.origin_name
        if isinstance(other, pathlib.PurePath):
            return self.origin_name is None and super().__eq__(other)
        return NotImplemented

    def __hash__(self) -> int:
        origin = self.origin_name
        if origin is None:  # equal to the pathlib path (see __eq__), so it must hash alike
            return super().__hash__()
        return hash((os.fspath(self), origin))

    def __repr__(self) -> str:
        return f"Path({LIT}{os.fspath(self)!s}, origin={self.origin_name!r}, consumer={self._consumer!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (os.fspath(self), self.origin_name, self._consumer))

    def to_dict(self) -> dict[str, Any]:
        return {"path": os.fspath(self), "origin_name": self.origin_name, "consumer_name": self._consumer}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Path:
        return cls(d["path"], origin=d.get("origin_name"), consumer=d.get("consumer_name"))

    # -- transfers ---------------------------------------------------------------
    def get(self, overwrite: bool = False, in_place: bool = False) -> None:
        """Fetch the origin's current files into this work's filesystem (see SPEC).

        A changed file becomes a new file renamed into place: a reader holding the old one
        open or mmapped keeps reading the old bytes, and hard links to it keep them too.
        ``in_place=True`` patches changed files where they are instead, as rsync's
        ``--inplace`` does: less disk traffic for small changes, but readers may see the
        change, or a mix of old and new bytes while it is made, and an mmap of a file that
        shrinks faults (SIGBUS).
        """
        self._last_transfer = transfer.get(self, overwrite=overwrite, in_place=in_place)

    def get_for_run(self) -> None:
        """The get the runtime makes of each Path passed to ``run`` before the run starts:
        local files are overwritten, a path that exists nowhere is skipped, and local files
        newer than all there is to fetch are kept (``last_transfer`` says what happened)."""
        self._last_transfer = transfer.get(self, overwrite=True, missing_ok=True, keep_newer=True)

    def exists_local(self) -> bool:
        """Whether the path exists in this work's filesystem. Only inside a work's run."""
        return transfer.exists_local(self)

    def exists_remote(self) -> bool:
        """Whether the path exists at its origin (or, once the origin stopped, was persisted)."""
        return transfer.exists_remote(self)


def _restore(path: str, origin: str | None, consumer: str | None) -> Path:
    return Path(path, origin=origin, consumer=consumer)
