"""Snapshot: walk a file or folder and produce its manifest.

Guarantee: the manifest describes a state each file really had. A file is read between two
``fstat`` calls; if size, mtime or ctime moved, or fewer/more bytes came than its size said,
it is read again (up to ``retries`` times) and then :class:`FileChangedError` is raised.
A file whose stat signature is in the stat cache is not read at all.

Timestamps come from a coarse clock on many kernels (before Linux 6.13: one tick, up to
10 ms; whole seconds on some filesystems), so a write in the same tick as our first ``fstat``
could leave both ``fstat`` results equal. A file written within ``TICK_NS`` of the start of
its read is therefore read again once that tick has passed.

"Really had" includes states a writer passes through: a file rewritten in place with
truncate + write can be caught empty or half-written (consistently so). Writers whose readers
must only ever see complete files write a temporary file and rename it.
"""

from __future__ import annotations

import os
import stat
import time
from contextlib import nullcontext

from .chunking import Chunker
from .errors import FileChangedError, ManifestError, SnapshotError, UnsafePathError
from .manifest import MAX_PATH_BYTES, MODE_BITS, Entry, Kind, Manifest, check_relpath, plain_name, resolve_link
from .statcache import StatCache, coarse_timestamps

TICK_NS = 20_000_000  # two jiffies at HZ=100
TICK_COARSE_NS = 2_000_000_000  # filesystems that stamp whole seconds (or two)


def _tick(st: os.stat_result) -> int:
    return TICK_COARSE_NS if coarse_timestamps(st) else TICK_NS


def snapshot(
    path: str | os.PathLike[str],
    chunker: Chunker,
    stat_cache: StatCache | None = None,
    *,
    retries: int = 3,
    foreign: list[str] | None = None,
) -> Manifest:
    """The manifest of the file or folder at ``path`` (a symlink at ``path`` itself is followed).

    Raises ``FileNotFoundError`` if it does not exist, :class:`UnsafePathError` for a symlink
    that leaves the tree, :class:`SnapshotError` for unreadable or unsupported entries.

    With a ``foreign`` list, entries a manifest cannot hold (links leaving the tree, names
    that are not UTF-8 or not portable, FIFOs, sockets, devices, unreadable files) are not
    errors: their relative paths are appended to ``foreign`` and the manifest describes the
    rest. That is how a receiver describes its own tree before overwriting it.
    """
    root = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(root)
    except (FileNotFoundError, NotADirectoryError):  # "a/b" where a is a file: b does not exist
        raise FileNotFoundError(2, "No such file or directory (nothing to snapshot)", root) from None
    except OSError as e:
        raise SnapshotError(f"cannot stat {root}: {e.strerror}", root) from e
    walker = _Walker(chunker, stat_cache, retries, foreign)
    root_mode: int | None
    try:
        if stat.S_ISREG(st.st_mode):
            # file_entry opens with O_NOFOLLOW (against links swapped in during a walk), so a
            # root that is itself a symlink is resolved here, as documented.
            entries = [walker.file_entry(os.path.realpath(root), "")]
            root_kind = Kind.FILE
            root_mode = None
        elif stat.S_ISDIR(st.st_mode):
            entries = []
            with stat_cache.reading() if stat_cache is not None else nullcontext():
                walker.walk_dir(root, "", entries)
            root_kind = Kind.DIR
            root_mode = st.st_mode & MODE_BITS
            if foreign is not None:
                entries = _drop_unrepresentable(entries, foreign)
        else:
            raise SnapshotError(f"{root} is neither a regular file nor a directory", root)
        try:
            return Manifest.build(chunker.params, root_kind, entries, root_mode)
        except UnsafePathError as e:
            where = os.path.join(root, e.path) if e.path else root
            raise UnsafePathError(f"{e} (at {where})", e.path) from None
        except ManifestError as e:
            raise SnapshotError(f"cannot snapshot {root}: {e}", root) from None
    finally:
        if stat_cache is not None:
            stat_cache.flush()


def _drop_unrepresentable(entries: list[Entry], foreign: list[str]) -> list[Entry]:
    """Move entries with unportable paths, and symlinks that resolve outside the tree, to
    ``foreign`` (children of a dropped directory go with it, unnamed)."""
    kept: list[Entry] = []
    dropped: set[str] = set()
    kept_dirs: set[str] = set()
    for e in sorted(entries, key=lambda e: e.path.encode("utf-8", "surrogateescape")):
        parent, sep, name = e.path.rpartition("/")
        if parent and parent in dropped:
            dropped.add(e.path)
            continue
        # Fast path (nearly every name): a kept parent and a plain ASCII name are portable.
        if not ((parent in kept_dirs if sep else True) and plain_name(name, top=not sep) and len(e.path) * 4 <= MAX_PATH_BYTES):
            try:
                e.path.encode("utf-8")
                check_relpath(e.path)
            except (UnicodeEncodeError, UnsafePathError):
                dropped.add(e.path)
                foreign.append(e.path)
                continue
        kept.append(e)
        if e.kind == Kind.DIR:
            kept_dirs.add(e.path)
    if not any(e.kind == Kind.SYMLINK for e in kept):
        return kept
    while True:  # removing one link can change where others resolve: repeat until stable
        by_path = {e.path: e for e in kept}
        bad = set()
        for e in kept:
            if e.kind == Kind.SYMLINK:
                try:
                    resolve_link(by_path, e.path, e.target)
                except UnsafePathError:
                    bad.add(e.path)
        if not bad:
            return kept
        foreign.extend(sorted(bad))
        kept = [e for e in kept if e.path not in bad]


class _Walker:
    def __init__(self, chunker: Chunker, cache: StatCache | None, retries: int, foreign: list[str] | None = None) -> None:
        self.chunker = chunker
        self.cache = cache
        self.retries = retries
        self.foreign = foreign

    def walk_dir(self, abs_dir: str, rel_dir: str, out: list[Entry]) -> None:
        """Append the entries of the tree under ``abs_dir`` to ``out`` (in no particular
        order: Manifest.build sorts them). Iterative, with an explicit stack of folders still
        to list: a tree may be as deep as PATH_MAX allows (~2048 levels), deeper than
        Python's recursion limit."""
        todo = [(abs_dir, rel_dir)]
        while todo:
            self._list_dir(*todo.pop(), out, todo)

    def _list_dir(self, abs_dir: str, rel_dir: str, out: list[Entry], todo: list[tuple[str, str]]) -> None:
        """Append the entries of one folder to ``out``; its sub-folders go on ``todo``."""
        try:
            with os.scandir(abs_dir) as it:
                children = list(it)
        except FileNotFoundError:
            return  # removed while we walked, like a vanished file
        except OSError as e:
            raise SnapshotError(f"cannot list {abs_dir}: {e.strerror}", abs_dir) from e
        for child in children:
            rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
            try:
                st = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we walked: it is simply not part of this snapshot
            except OSError as e:
                raise SnapshotError(f"cannot stat {child.path}: {e.strerror}", child.path) from e
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                out.append(Entry(rel, Kind.DIR, mode=mode & MODE_BITS))
                todo.append((child.path, rel))
            elif stat.S_ISREG(mode):
                # The walk's lstat is the same signature fstat would give: a cache hit needs
                # no open at all (what makes re-snapshotting 100k small files cheap).
                cached = self.cache.get(self.chunker.params, child.path, st) if self.cache else None
                if cached is not None:
                    out.append(Entry(rel, Kind.FILE, bool(mode & stat.S_IXUSR), st.st_size, cached, mode=mode & MODE_BITS))
                    continue
                try:
                    out.append(self.file_entry(child.path, rel))
                except FileNotFoundError:
                    continue
                except SnapshotError:  # unreadable, or kept changing: replaced or removed whole
                    if self.foreign is None:
                        raise
                    self.foreign.append(rel)
            elif stat.S_ISLNK(mode):
                try:
                    target = os.readlink(child.path)
                except FileNotFoundError:
                    continue
                out.append(Entry(rel, Kind.SYMLINK, target=target))
            elif self.foreign is not None:
                self.foreign.append(rel)
            else:
                raise SnapshotError(f"{child.path}: unsupported file type (not a file, directory or symlink)", child.path)

    def file_entry(self, abs_path: str, rel: str) -> Entry:
        params = self.chunker.params
        for attempt in range(self.retries + 1):
            started = time.time_ns()
            try:
                # O_NONBLOCK: if a FIFO was swapped in since the walk, open must not block
                # (fstat below then refuses it); reads of a regular file ignore the flag.
                fd = os.open(abs_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                raise
            except OSError as e:  # EACCES, ELOOP (replaced by a symlink since the walk)...
                raise SnapshotError(f"cannot read {abs_path}: {e.strerror}", abs_path) from e
            try:
                before = os.fstat(fd)
                if not stat.S_ISREG(before.st_mode):
                    raise SnapshotError(f"{abs_path} stopped being a regular file", abs_path)
                executable = bool(before.st_mode & stat.S_IXUSR)
                perm = before.st_mode & MODE_BITS
                cached = self.cache.get(params, abs_path, before) if self.cache else None
                if cached is not None:
                    return Entry(rel, Kind.FILE, executable, before.st_size, cached, mode=perm)
                try:
                    chunks, nread = self.chunker.chunk_file(fd, before.st_size)
                except OSError as e:
                    raise SnapshotError(f"cannot read {abs_path}: {e.strerror}", abs_path) from e
                after = os.fstat(fd)
            finally:
                os.close(fd)
            if nread == before.st_size and _same(before, after):
                # Written within a timestamp tick of our read: a write during the read might
                # not show in the stat. Read again once that tick is over. (mtime, not ctime:
                # every write moves mtime; a recent ctime alone is a rename or chmod.)
                mtime = after.st_mtime_ns
                if mtime >= started - _tick(after) and attempt < self.retries:
                    time.sleep(min(_tick(after), max(0, mtime + _tick(after) - time.time_ns())) / 1e9)
                    continue
                if self.cache is not None:
                    self.cache.put(params, abs_path, after, chunks)
                return Entry(rel, Kind.FILE, executable, nread, chunks, mode=perm)
        raise FileChangedError(
            f"{abs_path} kept changing while it was read ({self.retries + 1} attempts); "
            "no consistent snapshot of it could be taken",
            abs_path,
        )


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) == (
        b.st_size, b.st_mtime_ns, b.st_ctime_ns, b.st_ino,
    )

