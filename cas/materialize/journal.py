"""The materialize journal: the operations a sync commits to, and their encoding.

Each operation is a frozen dataclass that encodes itself as the JSON list docs/format.md
specifies ("Materialize journal") and checks, when decoded, every field it needs: paths
relative and inside the destination, modes permission bits, offsets and lengths in range.
A journal is checked whole before any of its operations is applied.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self, TypeGuard

from ..errors import MaterializeError, UnsupportedVersionError
from ..fsutil import fsync_dir
from ..manifest import MAX_PATH_BYTES, MODE_BITS

JOURNAL_FORMAT = "cas-journal"
#: Version 2: modes are permission bits (chmod, patch) and folders get "dirmode" operations.
JOURNAL_VERSION = 2
_OFF_MAX = 2**63 - 1  # what a file offset or size can be (off_t)
_RANGE_MAX = 16 << 20  # a patch range is one chunk: at most the largest max_size


class _InvalidOperation(ValueError):
    """A journal operation that is not one this code writes; its message says why."""


def is_stage_name(name: object) -> bool:
    """Whether ``name`` is a staged file's name as materialize writes it (8 ASCII digits)."""
    return isinstance(name, str) and len(name) == 8 and name.isascii() and name.isdigit()


def stage_name(index: int) -> str:
    """The staged file's name of the ``index``-th step of a plan."""
    return f"{index:08d}"


def _is_mode(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MODE_BITS


def _is_offset(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _OFF_MAX


def _checked_path(rel: object) -> str:
    """``rel`` if it names something inside the destination."""
    if not isinstance(rel, str):
        raise _InvalidOperation("its path is not a string")
    # Inside dest: relative, no "", "." or ".." component, no NUL. Not the manifest rules:
    # a removal may name a foreign entry ("a\\b", "C:x" are plain names on Linux).
    if rel and (rel.startswith("/") or "\x00" in rel or any(p in ("", ".", "..") for p in rel.split("/"))):
        raise _InvalidOperation("its path is not inside the destination")
    if len(rel.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise _InvalidOperation("its path is too long")
    return rel


def _checked_mode(mode: object) -> int:
    if not _is_mode(mode):
        raise _InvalidOperation("its mode is not permission bits")
    return mode


@dataclass(frozen=True)
class Operation:
    """One idempotent step of applying a sync, at ``path`` (relative to the destination;
    ``""`` is the destination itself)."""

    NAME: ClassVar[str]
    path: str

    @classmethod
    def arity(cls) -> int:
        """How many elements its encoding has (its name, then its fields)."""
        return 1 + len(dataclasses.fields(cls))

    def encode(self) -> list[object]:
        return [self.NAME, self.path]

    @classmethod
    def decode(cls, fields: list[object]) -> Self:
        """The operation whose encoding, after its name, is ``fields`` (as many as its
        :meth:`arity` says); _InvalidOperation if a field is of the wrong type or range."""
        return cls(_checked_path(fields[0]))


@dataclass(frozen=True)
class Remove(Operation):
    """Remove whatever is at the path (nothing if a parent is no longer a directory)."""

    NAME: ClassVar[str] = "rm"


@dataclass(frozen=True)
class MakeDir(Operation):
    """Make the path a directory (removing a non-directory there)."""

    NAME: ClassVar[str] = "mkdir"


@dataclass(frozen=True)
class Place(Operation):
    """Rename the staged file ``stage`` onto the path (if it is still staged)."""

    NAME: ClassVar[str] = "place"
    stage: str

    def encode(self) -> list[object]:
        return [self.NAME, self.stage, self.path]

    @classmethod
    def decode(cls, fields: list[object]) -> Self:
        stage, rel = fields
        path = _checked_path(rel)
        if not is_stage_name(stage):
            raise _InvalidOperation("not a staged file's name")
        return cls(path, str(stage))


@dataclass(frozen=True)
class Link(Operation):
    """Make the path a symlink to ``target`` (relative, inside the tree)."""

    NAME: ClassVar[str] = "link"
    target: str

    def encode(self) -> list[object]:
        return [self.NAME, self.path, self.target]

    @classmethod
    def decode(cls, fields: list[object]) -> Self:
        rel, target = fields
        path = _checked_path(rel)
        if not isinstance(target, str) or not target or target.startswith("/") or "\x00" in target or "\\" in target:
            raise _InvalidOperation("not a relative link target")
        if len(target.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            raise _InvalidOperation("link target too long")
        return cls(path, target)


@dataclass(frozen=True)
class SetMode(Operation):
    """Set the mode (permission bits) of what is at the path."""

    mode: int

    def encode(self) -> list[object]:
        return [self.NAME, self.path, self.mode]

    @classmethod
    def decode(cls, fields: list[object]) -> Self:
        rel, mode = fields
        return cls(_checked_path(rel), _checked_mode(mode))


@dataclass(frozen=True)
class Chmod(SetMode):
    """Set a file's mode (a placed file's, when staging needed more; a file's whose mode alone changed)."""

    NAME: ClassVar[str] = "chmod"


@dataclass(frozen=True)
class DirMode(SetMode):
    """Set a folder's mode: after every folder's entries are durable, deepest first."""

    NAME: ClassVar[str] = "dirmode"


@dataclass(frozen=True)
class Range:
    """``length`` bytes of the journal data file at ``data_offset``, written at ``offset``."""

    offset: int
    data_offset: int
    length: int

    @classmethod
    def decode(cls, raw: object) -> Range:
        if not (isinstance(raw, list) and len(raw) == 3 and all(_is_offset(x) for x in raw) and raw[2] <= _RANGE_MAX):
            raise _InvalidOperation(f"range {str(raw)[:80]} is not [offset, data offset, length] within bounds")
        return cls(*raw)


@dataclass(frozen=True)
class Patch(Operation):
    """Write ``ranges`` into the file in place, truncate it to ``size``, give it ``mode``."""

    NAME: ClassVar[str] = "patch"
    size: int
    mode: int
    ranges: tuple[Range, ...]

    def encode(self) -> list[object]:
        return [self.NAME, self.path, self.size, self.mode, [[r.offset, r.data_offset, r.length] for r in self.ranges]]

    @classmethod
    def decode(cls, fields: list[object]) -> Self:
        rel, size, mode, ranges = fields
        path = _checked_path(rel)
        if not _is_offset(size) or not _is_mode(mode) or not isinstance(ranges, list):
            raise _InvalidOperation("size, mode or ranges of the wrong type")
        return cls(path, size, mode, tuple(Range.decode(r) for r in ranges))


_KINDS: dict[str, type[Operation]] = {k.NAME: k for k in (Remove, MakeDir, Place, Patch, Link, Chmod, DirMode)}


def decode_operation(raw: object) -> Operation:
    """The operation ``raw`` (one element of a journal's "ops") encodes; _InvalidOperation if none."""
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        kind = _KINDS.get(raw[0])
        if kind is not None and kind.arity() == len(raw):
            return kind.decode(raw[1:])
    raise _InvalidOperation("not a known operation with its fields")


@dataclass(frozen=True)
class Journal:
    """What a committed sync does to ``dest`` (an absolute, normalized path), in order."""

    dest: str
    ops: tuple[Operation, ...]

    def encode(self) -> bytes:
        """The bytes of ``txn/ops`` (docs/format.md: compact UTF-8 JSON, keys in this order)."""
        body = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "dest": self.dest,
                "ops": [op.encode() for op in self.ops]}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogateescape")

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Journal:
        """The journal in ``raw``, checked whole: MaterializeError naming ``where`` and the
        first bad operation if any is invalid (UnsupportedVersionError for another format)."""
        try:
            journal = json.loads(raw.decode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError) as e:
            raise MaterializeError(f"journal {where} is not readable: {e}", where) from None
        if not isinstance(journal, dict):
            raise MaterializeError(f"journal {where} is not a journal: a JSON {type(journal).__name__}", where)
        if journal.get("format") != JOURNAL_FORMAT or journal.get("version") != JOURNAL_VERSION:
            raise UnsupportedVersionError(
                f"journal {where} has format {journal.get('format')!r} version {journal.get('version')!r}")
        dest, ops = journal.get("dest"), journal.get("ops")
        if not isinstance(dest, str) or "\x00" in dest or not os.path.isabs(dest) or os.path.normpath(dest) != dest:
            raise MaterializeError(f"journal {where}: destination {dest!r} is not a normalized absolute path", where)
        if not isinstance(ops, list):
            raise MaterializeError(f"journal {where}: its operations are not a list", where)
        decoded = []
        for i, op in enumerate(ops):
            try:
                decoded.append(decode_operation(op))
            except _InvalidOperation as e:
                raise MaterializeError(f"journal {where}: operation {i} {str(op)[:200]}: {e}", where) from None
        return cls(dest, tuple(decoded))


def commit(txn: str, dest: str, ops: Sequence[Operation]) -> None:
    """Write the journal of ``ops`` into ``txn`` durably: the rename of ``ops.tmp`` to ``ops``
    is the commit point (the staged files' names are made durable before it)."""
    tmp = os.path.join(txn, "ops.tmp")
    with open(tmp, "wb") as f:
        f.write(Journal(dest, tuple(ops)).encode())
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.join(txn, "stage"))
    os.rename(tmp, os.path.join(txn, "ops"))
    fsync_dir(txn)


def load(path: str) -> Journal:
    """The committed journal at ``path``, checked (see :meth:`Journal.decode`)."""
    with open(path, "rb") as f:
        return Journal.decode(f.read(), path)
