"""``Drive("lit://name")``: the original API's shared folder, kept in the app's artifact store.

Every component (work) has its own space in a Drive; ``put`` copies a file or folder of the
work's root into the work's space, ``list`` and ``get`` look across spaces (or in one),
``delete`` removes the work's own files only. Flows may not use a Drive (RuntimeError, as
for Paths). A Drive that is an attribute of a work belongs to that work; a Drive a work
receives (``run(drive)``) is used as that work's, as in the original.

On the CAS (guarantees):

- a put stores the chunks the store lacks (an unchanged file moves no chunk at all; chunks
  a persisted Path already stored are shared), then swaps the Drive's index ref: the index
  names the new tree only once every chunk of it is stored;
- the index is one ref (``drive:<name>``, format "Drive index" in docs/format.md) holding
  every component's tree: ``list`` is one ref read, a change is one atomic replace under
  the ref's mutex, so concurrent puts from several works lose nothing and a put killed at
  any instant leaves the old entry or the new one;
- ``get`` lands files through ``Workspace.sync`` (crash-safe, every chunk verified, never
  over a local file unless ``overwrite``); garbage collection keeps what the index names.

The read side that needs no running work (the storage browser, ``pathapi ls``) is the
module's functions: :func:`list_drives`, :func:`read_drive`, :func:`drive_entries`,
:func:`drive_listing`, :func:`find_tree`, :func:`is_drive_ref`.
"""

from __future__ import annotations

import builtins
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

from cas.errors import CasError, ChunkNotFoundError
from cas.manifest import Kind, Manifest
from cas.store.refs import RefStore

from .artifacts import subtree
from .driveindex import DriveIndex
from .errors import (
    DriveAmbiguousError,
    DriveDuplicateError,
    DriveFileNotFoundError,
    DriveNameError,
    DriveTimeoutError,
    transfer_error,
)
from .paths import resolve_under
from .runtime.context import WorkContext, current, require_run

LIT = "lit://"
#: Every Drive's index is the ref ``drive:<name>`` of the artifact store.
REF_PREFIX = "drive:"
#: How often ``get(timeout=...)`` reads the index again while it waits: first, and at most.
POLL_FIRST, POLL_MAX = 0.05, 0.5
#: Fresh reads of the index a get makes when chunks of the tree it read were collected.
STALE_RETRIES = 5


class HasRefs(Protocol):
    """Where drives are read from: an :class:`~pathapi.artifacts.ArtifactStore` or a
    :class:`~cas.repository.Repository` (anything with its ref store)."""

    @property
    def refs(self) -> RefStore: ...


def check_drive_name(text: str) -> str:
    """The name of the Drive ``text`` (``lit://name``), or DriveNameError: a Drive is named
    by one plain name (no ``/``), after ``lit://``."""
    if not isinstance(text, str):
        raise DriveNameError(f"a Drive is named by a string 'lit://name', not {type(text).__name__}")
    if text.startswith("s3://"):
        raise DriveNameError(f"{text!r}: a Drive lives in the app's artifact store (which may be on S3); "
                             "name it 'lit://name'")
    if not text.startswith(LIT):
        raise DriveNameError(f"{text!r}: a Drive's name must start with {LIT!r} (for example 'lit://checkpoints')")
    name = text[len(LIT):]
    if not name:
        raise DriveNameError(f"{text!r}: a Drive needs a name after {LIT!r}")
    if "/" in name:
        raise DriveNameError(f"{text!r}: a Drive's name is one name, without '/' (found {name!r}); "
                             "put files into folders with put('folder/file') instead")
    if "\x00" in name or name in (".", ".."):
        raise DriveNameError(f"{text!r} is not a Drive name (no NUL, not '.' or '..')")
    return name


def drive_ref(name: str) -> str:
    """The ref of the artifact store that holds the index of the Drive ``name``."""
    return REF_PREFIX + name


def is_drive_ref(ref: str) -> bool:
    """Whether a ref of the artifact store is a Drive's index (not a persisted Path)."""
    return ref.startswith(REF_PREFIX)


def list_drives(store: HasRefs) -> list[str]:
    """The names of the Drives in ``store``, sorted (one listing of its refs by prefix)."""
    return sorted(ref[len(REF_PREFIX):] for ref in store.refs.names(REF_PREFIX))


def read_drive(store: HasRefs, name: str) -> DriveIndex:
    """The index of the Drive ``name`` in ``store`` (one ref read; empty if nothing was ever
    put). StoreError or ManifestError if it cannot be read."""
    raw = store.refs.get(drive_ref(name))
    return DriveIndex() if raw is None else DriveIndex.decode(raw)


@dataclass(frozen=True)
class DriveEntry:
    """One file, folder or link of a Drive, as ``list``/``entries`` see it. ``size`` is a
    file's bytes (a folder's: all files below it), ``files`` and ``chunks`` count the same
    way; ``mode`` is None where none was recorded; ``updated_ns`` is when ``component``
    last changed its space (unix ns)."""

    component: str
    path: str
    kind: str  # "file" | "dir" | "link"
    size: int
    files: int
    chunks: int
    mode: int | None
    updated_ns: int


_KIND_NAMES = {Kind.FILE: "file", Kind.DIR: "dir", Kind.SYMLINK: "link"}


def _spaces(index: DriveIndex, component_name: str | None) -> list[str]:
    if component_name is None:
        return sorted(index.spaces)
    return [component_name] if component_name in index.spaces else []


def _join(rel: str, name: str) -> str:
    return name if rel == "." else f"{rel}/{name}"


def drive_entries(index: DriveIndex, path: str = ".", component_name: str | None = None) -> list[DriveEntry]:
    """What ``list(path, component_name)`` names, with kinds and sizes: for each component
    (or only ``component_name``), the entries directly inside the folder ``path``, or the
    file at ``path``. Sorted by component, then path; empty if nothing is there."""
    out: list[DriveEntry] = []
    for comp in _spaces(index, component_name):
        space = index.spaces[comp]
        sub = subtree(space.manifest, path)
        if sub is None:
            continue
        if sub.root_kind == Kind.FILE:
            e = sub.entries[0]
            out.append(DriveEntry(comp, path, "file", e.size, 1, e.chunk_count, e.mode, space.updated_ns))
            continue
        totals: dict[str, tuple[int, int, int]] = {}  # top-level name -> (bytes, files, chunks) at or below it
        for f in sub.files():
            top = f.path.split("/", 1)[0]
            size, files, chunks = totals.get(top, (0, 0, 0))
            totals[top] = (size + f.size, files + 1, chunks + f.chunk_count)
        for e in sub.entries:
            if "/" not in e.path:
                size, files, chunks = totals.get(e.path, (0, 0, 0))
                out.append(DriveEntry(comp, _join(path, e.path), _KIND_NAMES[e.kind], size, files, chunks, e.mode,
                                      space.updated_ns))
    return out


def drive_listing(index: DriveIndex, path: str = ".", component_name: str | None = None) -> list[str]:
    """The paths ``Drive.list`` returns: one per component that holds each (so a path put by
    two components under ``allow_duplicates`` shows twice), relative to the spaces' roots."""
    return [e.path for e in drive_entries(index, path, component_name)]


def holders(index: DriveIndex, path: str, component_name: str | None = None) -> list[str]:
    """The components whose space holds something at ``path`` (links on the way followed)."""
    return [c for c in _spaces(index, component_name) if subtree(index.spaces[c].manifest, path) is not None]


def find_tree(index: DriveIndex, name: str, path: str, component_name: str | None = None) -> tuple[str, Manifest] | None:
    """(component, tree at ``path``) of the one component holding ``path`` (or of
    ``component_name``); None if none does; DriveAmbiguousError if several do."""
    found = holders(index, path, component_name)
    if len(found) > 1:
        raise DriveAmbiguousError(
            f"{path!r} in drive {name!r} was put by several components: {', '.join(found)}; "
            f"say which with get({path!r}, component_name=...)", path)
    if not found:
        return None
    tree = subtree(index.spaces[found[0]].manifest, path)
    assert tree is not None
    return found[0], tree


def _rel(path: str | os.PathLike[str], what: str, *, root_ok: bool = False) -> str:
    """``path`` as a normalized path relative to a work's root ('.' only if ``root_ok``)."""
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"Drive.{what}() takes a str path, not {type(text).__name__}")
    if text.startswith(LIT):
        text = text[len(LIT):] or "."
    if not text or "\x00" in text or text.startswith("/") or "\\" in text:
        raise ValueError(f"Drive.{what}({path!r}): give a path relative to the work's root")
    if ".." in text.split("/"):
        raise ValueError(f"Drive.{what}({path!r}): a path with a '..' component leaves the work's root")
    rel = os.path.normpath(text)
    if rel == "." and not root_ok:
        raise ValueError(f"Drive.{what}({path!r}): name a file or folder inside the work's root, not the root itself")
    return rel


class Drive:
    """A shared folder of the app, named ``lit://name``, in the app's artifact store.

    It outlives the works and the app run that filled it (local folder or S3, wherever the
    app's ``store`` is). ``allow_duplicates=True`` lets several components put files at the
    same path; without it such a put raises :class:`DriveDuplicateError`.
    """

    protocol = LIT

    def __init__(self, id: str, allow_duplicates: bool = False,  # noqa: A002 (the original's name)
                 component_name: str | None = None) -> None:
        self.id = check_drive_name(id)
        self.allow_duplicates = bool(allow_duplicates)
        #: the original's argument, kept so its code runs; as there, the work that holds or
        #: receives the Drive is its component once it runs (a work never acts as another)
        self._owner: str | None = component_name
        self._owner_work: Any = None

    # -- identity ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.id

    @property
    def component_name(self) -> str | None:
        """The component this Drive puts and deletes as: inside a work's process, that work;
        elsewhere the work it is an attribute of (None if it is none's)."""
        ctx = current()
        if ctx is not None:
            return ctx.name
        if self._owner is None and self._owner_work is not None:
            self._owner = getattr(self._owner_work, "_name", None)
            if self._owner is not None:
                self._owner_work = None
        return self._owner

    def attach_owner(self, work: Any) -> None:
        """Make ``work`` this Drive's component (its name may only be known once it joins a
        flow). Called by a Work when the Drive is assigned to one of its attributes."""
        self._owner_work = work
        self._owner = None

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore, (self.id, self.allow_duplicates, self.component_name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Drive):
            return NotImplemented
        return (self.id, self.allow_duplicates) == (other.id, other.allow_duplicates)

    def __hash__(self) -> int:
        return hash((self.id, self.allow_duplicates))

    def __repr__(self) -> str:
        return f"Drive({LIT}{self.id}, allow_duplicates={self.allow_duplicates}, component_name={self.component_name!r})"

    def __str__(self) -> str:
        return self.id

    # -- the API -------------------------------------------------------------------------
    def put(self, path: str | os.PathLike[str]) -> None:
        """Put the file or folder ``path`` of this work's root into this work's space of the
        Drive, replacing what the space held there. Only chunks the store lacks are stored;
        the index names the new tree once they all are. Raises DriveFileNotFoundError if
        nothing is at ``path``, DriveDuplicateError if another component put ``path`` (and
        ``allow_duplicates`` is False), FileChangedError if the files kept changing."""
        ctx = require_run("Drive.put()")
        rel = _rel(path, "put")
        src = resolve_under(ctx.root, rel)
        if not (os.path.isfile(src) or os.path.isdir(src)):
            raise DriveFileNotFoundError(f"Drive.put({rel!r}): nothing at {src} in work {ctx.name!r}", src)
        me = ctx.name
        if not self.allow_duplicates:  # refused before any chunk moves; checked again under the mutex
            self._refuse_duplicate(self._index(ctx), me, rel)

        def merge(old: bytes | None, tree: Manifest) -> bytes | None:
            index = DriveIndex() if old is None else DriveIndex.decode(old)
            if not self.allow_duplicates:
                self._refuse_duplicate(index, me, rel)
            new = index.with_put(me, rel, tree, time.time_ns())
            return old if new is index else new.encode()

        ctx.artifacts.repo.push(drive_ref(self.id), src, ctx.workspace, merge=merge)

    def _refuse_duplicate(self, index: DriveIndex, me: str, rel: str) -> None:
        others = [c for c in holders(index, rel) if c != me]
        if others:
            raise DriveDuplicateError(
                f"Drive.put({rel!r}): drive {self.id!r} already holds {rel!r} put by {', '.join(others)}; "
                "nothing was put. Put it under another path, or make the Drive with allow_duplicates=True", rel)

    def list(self, path: str | os.PathLike[str] = ".", component_name: str | None = None) -> builtins.list[str]:
        """The paths directly inside the folder ``path`` (or the file ``path`` itself) across
        all components' spaces, or only ``component_name``'s, relative to the spaces' roots
        (``list("data")`` gives ``data/a.bin``...). One ref read. Empty if nothing is there."""
        ctx = require_run("Drive.list()")
        return drive_listing(self._index(ctx), _rel(path, "list", root_ok=True), component_name)

    def entries(self, path: str | os.PathLike[str] = ".", component_name: str | None = None) -> builtins.list[DriveEntry]:
        """What :meth:`list` names, with component, kind, size and mode of each."""
        ctx = require_run("Drive.entries()")
        return drive_entries(self._index(ctx), _rel(path, "entries", root_ok=True), component_name)

    def get(self, path: str | os.PathLike[str], component_name: str | None = None, timeout: float | None = None,
            overwrite: bool = False) -> None:
        """Fetch ``path`` (a file or folder put by some component, or by ``component_name``)
        into the same place of this work's root.

        Raises DriveAmbiguousError if several components hold ``path``; FileExistsError if it
        exists locally and ``overwrite`` is False (nothing is written); DriveFileNotFoundError
        if no component holds it. With ``timeout`` (seconds), waits for it to appear for up
        to that long, reading the index again and again, then raises DriveTimeoutError (a
        FileNotFoundError and a TimeoutError). The files land crash-safely, every chunk
        verified; ``overwrite=True`` makes the local copy equal to the Drive's (local-only
        files inside a fetched folder are removed).
        """
        ctx = require_run("Drive.get()")
        rel = _rel(path, "get")
        dest = resolve_under(ctx.root, rel)
        if not overwrite and os.path.lexists(dest):
            raise FileExistsError(17, f"Drive.get({rel!r}): it exists in work {ctx.name!r} and overwrite is False",
                                  dest)
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        last: ChunkNotFoundError | None = None
        for _ in range(STALE_RETRIES):
            comp, tree = self._wait_for(ctx, rel, component_name, deadline, timeout)
            try:
                ctx.workspace.sync(tree, dest, remote=ctx.artifacts.chunks, overwrite=overwrite)
                return
            except ChunkNotFoundError as e:  # the index was replaced and collected since we read it
                last = e
            except CasError as e:
                raise transfer_error(e, comp, rel, dest) from e
        assert last is not None
        raise transfer_error(last, component_name or "?", rel, dest) from last

    def _wait_for(self, ctx: WorkContext, rel: str, component_name: str | None, deadline: float | None,
                  timeout: float | None) -> tuple[str, Manifest]:
        """The one tree at ``rel``, reading the index until it appears or ``deadline`` passes."""
        pause = POLL_FIRST
        while True:
            found = find_tree(self._index(ctx), self.id, rel, component_name)
            if found is not None:
                return found
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is None or remaining <= 0:
                of = f" put by {component_name!r}" if component_name else ""
                if timeout is None:
                    raise DriveFileNotFoundError(f"Drive.get({rel!r}): drive {self.id!r} holds no {rel!r}{of}", rel)
                raise DriveTimeoutError(
                    f"Drive.get({rel!r}): drive {self.id!r} held no {rel!r}{of} within {timeout:g} s", rel)
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, POLL_MAX)

    def delete(self, path: str | os.PathLike[str]) -> None:
        """Remove ``path`` (and what is below it) from this work's own space. Another
        component's files are never touched: DriveFileNotFoundError if this work put nothing
        at ``path`` (the message names who did, if someone did)."""
        ctx = require_run("Drive.delete()")
        rel = _rel(path, "delete")
        me = ctx.name

        def change(old: bytes | None) -> bytes | None:
            index = DriveIndex() if old is None else DriveIndex.decode(old)
            new = index.without(me, rel, time.time_ns())
            if new is None:
                others = [c for c in holders(index, rel) if c != me]
                who = (f"; it was put by {', '.join(others)}, and only the work that put a file can delete it"
                       if others else "")
                raise DriveFileNotFoundError(
                    f"Drive.delete({rel!r}): work {me!r} put no {rel!r} into drive {self.id!r}{who}", rel)
            return new.encode()

        ctx.artifacts.repo.swap(drive_ref(self.id), change)

    def _index(self, ctx: WorkContext) -> DriveIndex:
        return read_drive(ctx.artifacts, self.id)


def _restore(id: str, allow_duplicates: bool, owner: str | None) -> Drive:  # noqa: A002
    drive = Drive(LIT + id, allow_duplicates=allow_duplicates)
    drive._owner = owner
    return drive
