"""Phase 1 of a materialize: stage every new byte under ``txn`` and say, as journal
operations, how to apply them. No user file is touched here.

The steps, in order: lay out where every needed chunk goes (:class:`_Layout`, one method per
kind of plan step); copy the unchanged ranges of files rewritten as new inodes from their
old files; write the resume index; fill in the chunks from the sources; make it all durable.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..chunking import iter_chunk_spans
from ..fsutil import clone_file, copy_range, preallocate
from ..hashing import ChunkId
from ..manifest import Entry, Kind, Manifest
from ..plan import Action, Step
from ..store.base import ChunkSource
from .files import OpenFiles, backdate, reserve_growth
from .fill import ChunkWriter, fill_from_local, fill_from_remote
from .journal import Chmod, Link, MakeDir, Operation, Patch, Place, Range, stage_name
from .paths import under
from .resume import write_resume_index


@dataclass
class Prepared:
    """What phase 1 staged: the operations that apply it, and what it cost."""

    ops: list[Operation]
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    chunks_reused: int = 0
    bytes_written: int = 0
    #: Staged file's target path -> (size, mtime_ns) once durable.
    written: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Copy:
    """A file rewritten as a new inode (staged in ``slot``): its ``kept`` spans, (chunk id,
    offset, length), are the old file's bytes at ``old_path``, which ``old`` describes."""

    slot: int
    old_path: str
    old: Entry
    new: Entry
    kept: list[tuple[ChunkId, int, int]]


def prepare(steps: Sequence[Step], target: Manifest, dest: str, txn: str, sources: Sequence[ChunkSource],
            remote: ChunkSource | None, local: Manifest | None, in_place: bool) -> Prepared:
    """Phase 1: stage every new byte under ``txn``; return the operations that apply them."""
    old_files = local.by_path if local is not None and local.root_kind == target.root_kind else {}
    files = OpenFiles()
    try:
        layout = _Layout(dest, txn, old_files, files, in_place)
        for i, step in enumerate(steps):
            layout.add(i, step)
        layout.allocate_data()
        out = Prepared(ops=layout.ops)
        out.chunks_reused += _copy_unchanged_ranges(layout)
        write_resume_index(txn, target, layout.stages, layout.data_chunks())
        writer = ChunkWriter(files, layout.targets)
        out.chunks_reused += fill_from_local(writer, sources)
        out.chunks_fetched, out.bytes_fetched = fill_from_remote(writer, remote, layout.bases, dest)
        out.bytes_written = writer.bytes_written
        out.written = _make_durable(files, layout.staged)
        return out
    finally:
        files.close()


class _Layout:
    """Where every chunk the plan needs goes (a staged file or the journal data file, at an
    offset), and the operations that apply the plan's steps."""

    def __init__(self, dest: str, txn: str, old_files: Mapping[str, Entry], files: OpenFiles, in_place: bool) -> None:
        self.dest = dest
        self.txn = txn
        self.old_files = old_files
        self.files = files
        self.in_place = in_place
        self.ops: list[Operation] = []
        self.targets: dict[ChunkId, list[tuple[int, int]]] = defaultdict(list)  # id -> (file slot, offset)
        # Where this side holds the bytes that stood at a chunk's place before: a remote that
        # takes them sends changed chunks as block deltas against those bytes.
        self.bases: dict[ChunkId, tuple[str, int]] = {}
        self.staged: list[tuple[int, str]] = []  # (file slot, rel)
        self.stages: dict[str, str] = {}  # staged file's name -> rel
        self.copies: list[_Copy] = []
        self._data_slot = -1  # the journal data file's slot, once created
        self._data_at: dict[ChunkId, int] = {}  # chunk -> its offset in the data file
        self._data_len = 0

    def add(self, i: int, step: Step) -> None:
        """Lay out the ``i``-th step of the plan."""
        e, rel = step.entry, step.path
        if step.action == Action.MKDIR:
            self.ops.append(MakeDir(rel))
        elif step.action == Action.LINK:
            self.ops.append(Link(rel, e.target))
        elif step.action == Action.CHMOD:
            self.ops.append(Chmod(rel, e.perm))
        elif step.action == Action.PLACE:
            self._place(i, step)
        elif step.action == Action.PATCH and not self.in_place:
            self._patch_as_new_inode(i, step)
        elif step.action == Action.PATCH:
            self._patch_in_place(step)

    def _stage(self, i: int, e: Entry, rel: str, prealloc: int) -> int:
        """A new file for ``rel``, placed at apply: its slot. Created at its first write, so
        a file's create, writes and close come together (not 100k creates, then 100k reopens)."""
        name = stage_name(i)
        slot = self.files.add(os.path.join(self.txn, "stage", name), _stage_mode(e), prealloc)
        self.staged.append((slot, rel))
        self.stages[name] = rel
        self.ops.append(Place(rel, name))
        self.ops.extend(_final_mode(e, rel))
        return slot

    def _place(self, i: int, step: Step) -> None:
        """A new or wholly rewritten file: every chunk from the sources."""
        e, rel = step.entry, step.path
        # A single-chunk file is written by one pwrite: pre-allocating it first would save nothing.
        slot = self._stage(i, e, rel, e.size if e.chunk_count > 1 else 0)
        old = self.old_files.get(rel)
        for cid, off, _ in iter_chunk_spans(e.chunks):
            self.targets[cid].append((slot, off))
            if old is not None and old.kind == Kind.FILE and off < old.size:
                self.bases.setdefault(cid, (under(self.dest, rel), off))

    def _patch_as_new_inode(self, i: int, step: Step) -> None:
        """A little-changed file, as a new inode: the unchanged ranges come from the old file
        (in the kernel, see _copy_unchanged), the changed ones from the sources like any chunk."""
        e, rel = step.entry, step.path
        slot = self._stage(i, e, rel, 0)
        changed = {off for off, _, _ in step.ranges}
        kept = []
        for cid, off, n in iter_chunk_spans(e.chunks):
            if off in changed:
                self.targets[cid].append((slot, off))
                self.bases.setdefault(cid, (under(self.dest, rel), off))
            else:
                kept.append((cid, off, n))
        self.copies.append(_Copy(slot, under(self.dest, rel), self.old_files[rel], e, kept))

    def _patch_in_place(self, step: Step) -> None:
        """A little-changed file, patched in place at apply: its changed ranges go to the
        journal data file (each chunk once), its growth is allocated now."""
        e, rel = step.entry, step.path
        if self._data_slot < 0:
            self._data_slot = self.files.create(os.path.join(self.txn, "data"))
        ranges = []
        for off, n, cid in step.ranges:
            self.bases.setdefault(cid, (under(self.dest, rel), off))
            data_at = self._data_at.get(cid)
            if data_at is None:
                data_at = self._data_at[cid] = self._data_len
                self._data_len += n
                self.targets[cid].append((self._data_slot, data_at))
            ranges.append(Range(off, data_at, n))
        reserve_growth(under(self.dest, rel), e.size)
        self.ops.append(Patch(rel, e.size, e.perm, tuple(ranges)))

    def allocate_data(self) -> None:
        """Give the journal data file (if any) its final size, allocated."""
        if self._data_slot >= 0:
            preallocate(self.files.fd(self._data_slot), self._data_len)

    def data_chunks(self) -> list[ChunkId]:
        """The chunks of the journal data file, in the order they lie in it."""
        return list(self._data_at)


def _copy_unchanged_ranges(layout: _Layout) -> int:
    """Copy into each file rewritten as a new inode its unchanged ranges from the old file;
    how many chunks that saved. Where the old file changed under us, its kept chunks are laid
    out to come from verified sources instead."""
    reused = 0
    for c in layout.copies:
        if _copy_unchanged(c.old_path, c.old, layout.files.fd(c.slot), c.new.size, c.kept):
            reused += len(c.kept)
        else:
            for cid, off, _ in c.kept:
                layout.targets[cid].append((c.slot, off))
    return reused


def _make_durable(files: OpenFiles, staged: list[tuple[int, str]]) -> dict[str, tuple[int, int]]:
    """Create the staged files never written (the empty ones), backdate and sync them all:
    each one's target path -> (size, mtime_ns) once durable."""
    files.create_rest()
    for slot, _ in staged:
        backdate(files.paths[slot])  # by path: no descriptor to open again
    files.sync()
    written = {}
    for slot, rel in staged:
        st = os.stat(files.paths[slot])
        written[rel] = (st.st_size, st.st_mtime_ns)
    return written


def _stage_mode(e: Entry) -> int:
    """A staged file's mode: the target's, plus owner read and write while it is written
    (it is reopened to be filled and synced); see :func:`_final_mode`."""
    return e.perm | stat.S_IRUSR | stat.S_IWUSR


def _final_mode(e: Entry, rel: str) -> list[Operation]:
    """The chmod that gives a placed file its mode, if staging needed more."""
    return [Chmod(rel, e.perm)] if _stage_mode(e) != e.perm else []


def _copy_unchanged(old_path: str, old: Entry, fd: int, size: int, kept: list[tuple[ChunkId, int, int]]) -> bool:
    """Give the new (empty) file ``fd`` its final ``size`` and the old file's bytes at the
    ``kept`` spans, in the kernel: a reflink of the whole file where the filesystem has them,
    else copy_file_range(2) of those spans only. False, with nothing promised about ``fd``'s
    bytes, if the old file is not the one the plan was made from (its size differs from
    ``old``'s, or it changed while being copied): the caller then fills the spans from
    sources that verify what they give."""
    try:
        src = os.open(old_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        before = os.fstat(src)
        if not stat.S_ISREG(before.st_mode) or before.st_size != old.size:
            return False
        if clone_file(src, fd):
            os.ftruncate(fd, size)
        else:
            preallocate(fd, size)
            for off, n in _merge_spans(kept):
                copy_range(src, fd, off, n)
        after = os.fstat(src)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        return False
    finally:
        os.close(src)
    return (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == (before.st_size, before.st_mtime_ns, before.st_ctime_ns)


def _merge_spans(spans: list[tuple[ChunkId, int, int]]) -> list[tuple[int, int]]:
    """(offset, length) runs covering ``spans`` (sorted by offset), adjacent ones merged."""
    runs: list[tuple[int, int]] = []
    for _, off, n in spans:
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((off, n))
    return runs
