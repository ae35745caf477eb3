"""Phase 2 of a materialize: apply a committed journal's operations to the destination.

Every operation is idempotent, so a journal applied half-way (the process was killed) is
applied again from the start by :func:`cas.materialize.recover`.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Sequence

from ..errors import MaterializeError
from ..fsutil import fsync_dir, pwrite_all, remove_any, sync_each_or_all, syncfs_at
from .files import backdate
from .journal import Chmod, DirMode, Link, MakeDir, Operation, Patch, Place, Remove
from .paths import lstat_or_none


class _Tree:
    """Resolves journal paths under ``dest`` without ever following a symlink: every parent
    is made a real directory (whatever else stands there is removed), as the target says."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self._dirs: set[str] = set()
        self.touched: set[str] = set()

    def path(self, rel: str) -> str:
        if not rel:
            os.makedirs(os.path.dirname(self.dest), exist_ok=True)
            self.touched.add(os.path.dirname(self.dest))
            return self.dest
        parts = rel.split("/")
        cur = self.dest
        for i, part in enumerate(["", *parts[:-1]]):
            cur = os.path.join(cur, part) if part else cur
            self.ensure_dir(cur, root=(i == 0))
        self.touched.add(cur)
        return os.path.join(cur, parts[-1])

    def existing(self, rel: str) -> str | None:
        """The path of ``rel`` if all its parents are real directories, else None: then
        nothing of the old tree is left there to remove (and nothing is created)."""
        if not rel:
            return self.dest
        cur = self.dest
        for part in ["", *rel.split("/")[:-1]]:
            cur = os.path.join(cur, part) if part else cur
            st = lstat_or_none(cur)
            if st is None or not stat.S_ISDIR(st.st_mode):
                return None
        self.touched.add(cur)
        return os.path.join(cur, rel.rsplit("/", 1)[-1])

    def ensure_dir(self, path: str, root: bool = False) -> None:
        if path in self._dirs:
            return
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(path)
                raise FileNotFoundError
        except FileNotFoundError:
            if root:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            os.mkdir(path)
            self.touched.add(os.path.dirname(path))
        self._dirs.add(path)


class _DataFile:
    """The journal data file (the bytes of in-place patches), opened at its first use."""

    def __init__(self, txn: str) -> None:
        self.path = os.path.join(txn, "data")
        self._fd = -1

    def open(self) -> None:
        """Open it if not open yet (it must exist once a journal has a patch)."""
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, offset: int, length: int) -> bytes:
        self.open()
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)


def apply(dest: str, txn: str, ops: Sequence[Operation]) -> dict[str, tuple[int, int]]:
    """Phase 2. Every operation is idempotent, so this may run again after a crash.

    Returns (size, mtime_ns) of each patched file once it is durable."""
    tree = _Tree(dest)
    patched: dict[str, tuple[int, int]] = {}
    data = _DataFile(txn)
    try:
        for op in ops:
            match op:
                case Remove(path=rel):
                    path = tree.existing(rel)
                    if path is not None:
                        remove_any(path)
                case MakeDir(path=rel):
                    tree.ensure_dir(tree.path(rel), root=not rel)
                case Place():
                    _place(os.path.join(txn, "stage", op.stage), tree.path(op.path))
                case Patch():
                    data.open()
                    written = _patch(tree.path(op.path), op, data)
                    if written is not None:
                        patched[op.path] = written
                case Link(path=rel, target=target):
                    _link(tree.path(rel), target)
                case Chmod(path=rel, mode=mode):
                    os.chmod(tree.path(rel), mode, follow_symlinks=False)
                case DirMode():
                    continue  # after every folder's entries are durable, below
                case _:
                    raise MaterializeError(f"unknown journal operation {op!r}", dest)
    finally:
        data.close()
    sync_each_or_all([d for d in tree.touched if os.path.isdir(d)], fsync_dir, syncfs_at)
    for op in ops:  # folder modes last (deepest first): a read-only folder is written first
        if isinstance(op, DirMode):
            _set_dir_mode(tree.existing(op.path), op.mode)
    return patched


def _place(staged: str, path: str) -> None:
    try:  # one rename per file; the unusual cases are told by its error
        os.rename(staged, path)
    except FileNotFoundError:
        if os.path.lexists(staged):
            raise
        # placed by an earlier, interrupted apply of this journal
    except IsADirectoryError:  # a directory stands where the file goes
        shutil.rmtree(path)
        os.rename(staged, path)


def _patch(path: str, op: Patch, data: _DataFile) -> tuple[int, int] | None:
    """Write ``op``'s ranges into the file at ``path`` and make it durable: its (size,
    mtime_ns) then, or None if the file is gone."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # removed behind our back: the next sync sees it missing and fetches it
    try:
        for r in op.ranges:
            pwrite_all(fd, data.read(r.data_offset, r.length), r.offset)
        os.ftruncate(fd, op.size)
        os.fchmod(fd, op.mode)
        backdate(fd)
        os.fsync(fd)
        st = os.fstat(fd)
        return st.st_size, st.st_mtime_ns
    finally:
        os.close(fd)


def _link(path: str, target: str) -> None:
    try:
        if os.readlink(path) == target:
            return
    except OSError:
        pass
    remove_any(path)
    os.symlink(target, path)


def _set_dir_mode(where: str | None, mode: int) -> None:
    found = lstat_or_none(where) if where is not None else None
    if where is not None and found is not None and stat.S_ISDIR(found.st_mode) and stat.S_IMODE(found.st_mode) != mode:
        os.chmod(where, mode)


def apply_error(dest: str, e: OSError) -> MaterializeError:
    """What an operation after the commit point could not do, where, and what to do about it."""
    where = os.fsdecode(e.filename2 or e.filename or dest)  # a rename: where it was going
    if e.errno in (errno.EACCES, errno.EPERM):
        remedy = f"make the folder {os.path.dirname(where)} writable by this process"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENOTEMPTY):
        remedy = f"remove {where}, which stands where the tree needs something else"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        remedy = "free space on its filesystem"
    else:
        remedy = "fix the cause"
    err = MaterializeError(
        f"could not finish updating {dest}: {e.strerror or e} at {where}. {dest} is partly updated: "
        f"{remedy}, then get again to complete it",
        dest,
    )
    err.errno = e.errno
    return err
