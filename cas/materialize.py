"""Materialize: make a file or folder equal to a manifest, crash-safely.

Two phases, under a lock on the state folder:

1. *Prepare.* Every file that changes is written aside (a staging file in the state folder,
   pre-allocated, filled from local sources first and the remote source for the rest), or,
   when only a small part of an existing file changes, the new ranges are written into a
   journal data file. Everything is fsynced. No user file is touched; failure here (a
   missing or corrupt chunk, an origin that dies, a full disk) leaves the tree as it was;
   what was staged is kept as ``resume/`` so the next sync does not fetch it again.
2. *Commit and apply.* The list of operations is written and fsynced, then renamed into
   place: that rename is the commit point. The operations (rename staging files over
   targets, patch ranges from the journal, make directories and links, set exec bits,
   remove extras) are each idempotent, so a process killed while applying them is finished
   by the next :func:`recover` (run at the start of every materialize): every file ends
   old or new, never torn.

The journal format is specified in docs/format.md ("Materialize journal").
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from .chunking import iter_chunk_spans, pack_chunks
from .errors import (
    ChunkError,
    ChunkNotFoundError,
    MaterializeError,
    UnsupportedVersionError,
)
from .fsutil import (
    clone_file,
    copy_range,
    fsync_dir,
    preallocate,
    pwrite_all,
    remove_any,
    reserve,
    start_writeback,
    syncfs,
)
from .hashing import ChunkId
from .manifest import MAX_PATH_BYTES, MODE_BITS, Entry, Kind, Manifest
from .plan import Action, Step, plan_update
from .sources import SeedSource
from .store.base import ChunkSource, DeltaSource

JOURNAL_FORMAT = "cas-journal"
#: Version 2: modes are permission bits (chmod, patch) and folders get "dirmode" operations.
JOURNAL_VERSION = 2
RESUME_FORMAT = "cas-resume"
RESUME_INDEX = "resume.json"
#: Staged bytes after which their writeback to disk is started (so the fsync at the end of
#: phase 1 does not begin from a whole file of dirty pages).
WRITEBACK_EVERY = 32 << 20
BACKDATE_NS = 1_000_000_000
#: Files phase 1 keeps open at once (it may write many more; see ``_OpenFiles``).
MAX_OPEN_FILES = 64
#: More staged files (or touched folders) than this are made durable by one syncfs(2), not
#: an fsync each.
SYNCFS_MIN_FILES = 32

_thread_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
_log = logging.getLogger("cas.materialize")


@dataclass(frozen=True)
class MaterializeResult:
    """What one materialize did. ``chunks_fetched``/``bytes_fetched`` came from the remote
    source; ``chunks_reused`` were found locally (files of the old tree, a local store)."""

    files: int
    bytes_total: int
    chunks_fetched: int
    bytes_fetched: int
    chunks_reused: int
    bytes_written: int
    seconds: float
    #: Files this materialize wrote: path -> (size, mtime_ns) right after they were made
    #: durable. A file still showing that stat holds exactly the target's bytes (callers
    #: use this to fill a stat cache without reading the files back).
    written: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)


@contextmanager
def locked(state_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive use of a state folder, across threads and processes."""
    state = os.path.abspath(state_dir)
    os.makedirs(state, exist_ok=True)
    with _thread_locks[state]:
        fd = os.open(os.path.join(state, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def recover(state_dir: str | os.PathLike[str]) -> bool:
    """Finish a committed, half-applied materialize, or discard an uncommitted one.

    Call with :func:`locked` held. Returns True if a committed journal was replayed.
    """
    txn = os.path.join(os.fspath(state_dir), "txn")
    ops_path = os.path.join(txn, "ops")
    replayed = False
    if os.path.exists(ops_path):
        try:
            with open(ops_path, "rb") as f:
                journal = _load_journal(f.read(), ops_path)
            _apply(journal["dest"], txn, journal["ops"])
            replayed = True
        except (OSError, MaterializeError) as e:
            # It cannot be finished now (a folder made read-only, a file where a folder must
            # go, a damaged journal...). The sync that committed it reported its destination
            # as partly updated; its staged files are kept for resume below, and the next
            # sync of that destination plans afresh from what is there. Never fatal here:
            # one destination's trouble must not block syncs of the others.
            _log.warning("abandoned the unfinished sync recorded in %s (the next sync of its destination "
                         "completes that destination): %s", ops_path, e)
    if os.path.lexists(txn):
        if replayed:
            shutil.rmtree(txn)
        else:
            _keep_for_resume(os.fspath(state_dir))
        fsync_dir(state_dir)
    return replayed


def _keep_for_resume(state: str) -> None:
    """Keep an uncommitted transaction's staged files as ``resume/``: the next sync reads
    the chunks they already hold (each verified) instead of fetching them again."""
    txn = os.path.join(state, "txn")
    resume = os.path.join(state, "resume")
    if not os.path.exists(os.path.join(txn, RESUME_INDEX)):
        shutil.rmtree(txn, ignore_errors=True)
        return
    shutil.rmtree(resume, ignore_errors=True)
    os.rename(txn, resume)


def _resume_source(state: str) -> SeedSource | None:
    """The chunks an interrupted sync left staged, or None. Anything unreadable is dropped:
    resuming only ever saves work, it is never needed for correctness."""
    resume = os.path.join(state, "resume")
    try:
        with open(os.path.join(resume, RESUME_INDEX), "rb") as f:
            index = json.loads(f.read().decode("utf-8", "surrogateescape"))
        with open(os.path.join(resume, "target"), "rb") as f:
            target = Manifest.decode(f.read())
        if index.get("format") != RESUME_FORMAT or index.get("version") != JOURNAL_VERSION:
            raise ValueError("unknown resume index")
        by_path = target.by_path
        files = [
            (os.path.join(resume, "stage", name), by_path[rel].chunks)
            for name, rel in index["stages"].items()
            if _stage_name(name) and rel in by_path and by_path[rel].kind == Kind.FILE
        ]
        if index.get("data"):  # the journal data file: the chunks of in-place patches, end to end
            sizes = target.chunk_sizes()
            ids = [bytes.fromhex(h) for h in index["data"]]
            files.append((os.path.join(resume, "data"), pack_chunks([(cid, sizes[cid]) for cid in ids])))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        shutil.rmtree(resume, ignore_errors=True)
        return None
    # Only regular files are read (opening a FIFO left there would block the sync forever).
    return SeedSource.from_files([(p, c) for p, c in files if _is_regular(p)], f"resume:{resume}")


def _stage_name(name: object) -> bool:
    """Whether ``name`` is a staged file's name as materialize writes it (8 ASCII digits)."""
    return isinstance(name, str) and len(name) == 8 and name.isascii() and name.isdigit()


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def materialize(
    target: Manifest,
    dest: str | os.PathLike[str],
    *,
    state_dir: str | os.PathLike[str],
    local: Manifest | None,
    sources: Sequence[ChunkSource] = (),
    remote: ChunkSource | None = None,
    foreign: Sequence[str] = (),
    in_place: bool = False,
) -> MaterializeResult:
    """Make ``dest`` equal to ``target``; files and folders not in ``target`` are removed.

    A changed file becomes a new inode renamed into place (readers of the old file, and hard
    links to it, keep the old bytes); its unchanged ranges are copied from the old file in
    the kernel (a reflink where the filesystem has them). ``in_place=True`` writes the changed
    ranges of a little-changed file into the file itself instead (journaled, crash-safe, but
    readers see the change as it happens, and an mmap of a file that shrinks gets SIGBUS).

    ``local`` is the manifest of what is at ``dest`` now (None if nothing is, or if it is a
    symlink), ``foreign`` the paths under ``dest`` that ``local`` could not describe (links
    leaving the tree, FIFOs, unportable names: removed unless the target replaces them),
    ``sources`` are local chunk sources (a seed of ``dest``, a store) asked first,
    ``remote`` supplies the rest. Every source verifies what it yields. ``state_dir`` must
    be on the same filesystem as ``dest``; call with :func:`locked` held and after
    :func:`recover`.
    """
    t0 = time.perf_counter()
    dest = os.path.abspath(dest)
    state = os.path.abspath(state_dir)
    _check_same_filesystem(dest, state)
    _check_path_lengths(target, dest)
    _check_parents(dest)
    plan = plan_update(local, target)
    txn = os.path.join(state, "txn")
    os.makedirs(os.path.join(txn, "stage"))
    resume = _resume_source(state)
    try:
        prep = _prepare(plan.steps, target, dest, txn, [*sources, *([resume] if resume else [])], remote, local,
                        in_place)
        extra = [p for p in foreign if p not in target.by_path] if target.root_kind == Kind.DIR else []
        ops: list[list[object]] = [["rm", p] for p in (*plan.removals, *extra)]
        ops += prep.ops
        ops += [["dirmode", p, mode] for p, mode in plan.modes]
        locked_dirs = _check_writable(dest, ops)
        _commit(txn, dest, ops)
    except BaseException as e:
        _keep_for_resume(state)  # what this attempt staged (old resumed chunks included)
        if isinstance(e, OSError) and type(e) in (OSError, PermissionError):  # the disk refused: say where, keep errno
            err = MaterializeError(
                f"cannot stage the new contents of {dest} in {state}: {e.strerror or e} "
                f"(errno {e.errno}); nothing at {dest} was changed",
                dest,
            )
            err.errno = e.errno
            raise err from e
        raise
    unlocked = _unlock(locked_dirs)
    try:
        written = prep.written | _apply(dest, txn, ops)
    except OSError as e:
        raise _apply_error(dest, e) from e
    finally:  # a folder the target gives a mode has it; the others get theirs back
        moded = {_under(dest, str(op[1])) for op in ops if op[0] == "dirmode"}
        _relock([(folder, mode) for folder, mode in unlocked if folder not in moded])
    shutil.rmtree(txn)
    shutil.rmtree(os.path.join(state, "resume"), ignore_errors=True)
    return MaterializeResult(
        files=sum(1 for _ in target.files()),
        bytes_total=target.total_size,
        chunks_fetched=prep.chunks_fetched,
        bytes_fetched=prep.bytes_fetched,
        chunks_reused=prep.chunks_reused,
        bytes_written=prep.bytes_written,
        seconds=time.perf_counter() - t0,
        written=written,
    )


#: The kernel's PATH_MAX counts the terminating NUL: a path passed to it has at most 4095 bytes.
_PATH_MAX = 4095


def _check_path_lengths(target: Manifest, dest: str) -> None:
    """Refuse, before anything is staged, a tree whose paths the kernel cannot name under ``dest``.

    A manifest path may be up to 4096 bytes; with ``dest`` in front it can exceed PATH_MAX,
    and a journal naming it could never be applied (every later sync would fail replaying it).
    """
    base = len(os.fsencode(dest)) + 1
    for e in target.entries:
        if e.path and base + len(os.fsencode(e.path)) > _PATH_MAX:
            err = MaterializeError(
                f"{e.path[:80]!r}... is too long to create under {dest} ({base + len(os.fsencode(e.path))} bytes, "
                f"the limit is {_PATH_MAX}); nothing at {dest} was changed",
                dest,
            )
            err.errno = errno.ENAMETOOLONG
            raise err


def _check_parents(dest: str) -> None:
    """Refuse, before anything is staged, a destination whose parent folders cannot be made:
    a file (or anything but a folder) stands where one of them must go. That is outside the
    destination, so it is the user's to move, never ours to remove."""
    probe = os.path.dirname(dest)
    while probe and not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        err = MaterializeError(
            f"cannot create {dest}: {probe} is a file where a folder must be. Move or remove {probe}, "
            f"or get into another destination; nothing at {dest} was changed",
            dest,
        )
        err.errno = errno.ENOTDIR
        raise err


def _check_writable(dest: str, ops: list[list[object]]) -> list[str]:
    """Check, before the commit point, that every existing folder the operations write into
    can be written by us: it is, or we own it (then it is made writable while the operations
    run, and its mode restored after). Returns those owned read-only folders; a folder we can
    neither write nor chmod is a MaterializeError naming it, with nothing changed."""
    euid = os.geteuid()
    seen: set[str] = set()
    owned: list[str] = []
    created = {str(op[2] if op[0] == "place" else op[1]) for op in ops if op[0] in ("place", "mkdir", "link")}
    for op in ops:
        rel = str(op[2] if op[0] == "place" else op[1])
        if op[0] in ("chmod", "dirmode"):
            if rel not in created:  # what this sync creates is ours
                _check_owned(dest, _under(dest, rel), euid)
            continue
        folder = os.path.dirname(_under(dest, rel))
        while folder not in seen and not os.path.lexists(folder):  # created by us: writable
            seen.add(folder)
            folder = os.path.dirname(folder)
        if folder in seen:
            continue
        seen.add(folder)
        if not os.path.isdir(folder):
            continue  # inside dest, a file where a folder goes is replaced; outside, _check_parents
        if os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            continue
        if os.stat(folder).st_uid == euid:
            owned.append(folder)
            continue
        err = MaterializeError(
            f"cannot update {dest}: the folder {folder} is not writable by this process (uid {euid}) "
            f"and belongs to another user. Make it writable (chmod u+w, or change its owner), then get "
            f"again; nothing at {dest} was changed",
            dest,
        )
        err.errno = errno.EACCES
        raise err
    return owned


def _check_owned(dest: str, path: str, euid: int) -> None:
    """A mode can only be set by the owner (or root): refuse, before the commit point, a
    chmod of something of another user's."""
    st = _lstat(path)
    if st is None or euid == 0 or st.st_uid == euid or stat.S_ISLNK(st.st_mode):
        return
    err = MaterializeError(
        f"cannot update {dest}: {path} belongs to another user (uid {st.st_uid}), so this process "
        f"(uid {euid}) cannot set its mode. Change its owner, or remove it, then get again; nothing "
        f"at {dest} was changed",
        dest,
    )
    err.errno = errno.EPERM
    raise err


def _unlock(folders: list[str]) -> list[tuple[str, int]]:
    """Give the owner write and search permission on ``folders``; their former modes."""
    done = []
    for folder in folders:
        try:
            mode = stat.S_IMODE(os.stat(folder).st_mode)
            os.chmod(folder, mode | stat.S_IRWXU)
        except OSError:
            continue  # _apply reports what it then cannot do
        done.append((folder, mode))
    return done


def _relock(folders: list[tuple[str, int]]) -> None:
    for folder, mode in reversed(folders):
        try:
            os.chmod(folder, mode)
        except OSError:
            pass  # removed by the sync


def _apply_error(dest: str, e: OSError) -> MaterializeError:
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


def _check_same_filesystem(dest: str, state: str) -> None:
    probe = dest
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    dev = os.lstat(probe).st_dev
    if dev != os.stat(state).st_dev:
        raise MaterializeError(
            f"state folder {state} is on another filesystem than {dest}: files could not be renamed into place atomically",
            dest,
        )


@dataclass
class _Prepared:
    ops: list[list[object]]
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    chunks_reused: int = 0
    bytes_written: int = 0
    written: dict[str, tuple[int, int]] = field(default_factory=dict)


def _prepare(steps: Sequence[Step], target: Manifest, dest: str, txn: str, sources: Sequence[ChunkSource],
             remote: ChunkSource | None, local: Manifest | None, in_place: bool) -> _Prepared:
    """Phase 1: stage every new byte under ``txn``; return the operations that apply them."""
    old_files = local.by_path if local is not None and local.root_kind == target.root_kind else {}
    # Where this side holds the bytes that stood at a chunk's place before: a remote that
    # takes them sends changed chunks as block deltas against those bytes.
    bases: dict[ChunkId, tuple[str, int]] = {}
    out = _Prepared(ops=[])
    targets: dict[ChunkId, list[tuple[int, int]]] = defaultdict(list)  # id -> (file slot, offset)
    sizes: dict[ChunkId, int] = {}
    files = _OpenFiles()
    staged: list[tuple[int, str]] = []  # (file slot, rel)
    stage_names: list[tuple[str, str]] = []
    data_fd = -1  # the journal data file's slot
    data_slots: dict[ChunkId, int] = {}
    data_len = 0
    copies: list[tuple[int, str, Entry, Entry, list[tuple[ChunkId, int, int]]]] = []
    try:
        for i, step in enumerate(steps):
            e = step.entry
            rel = step.path
            if step.action == Action.MKDIR:
                out.ops.append(["mkdir", rel])
            elif step.action == Action.LINK:
                out.ops.append(["link", rel, e.target])
            elif step.action == Action.CHMOD:
                out.ops.append(["chmod", rel, e.perm])
            elif step.action == Action.PLACE:
                name = f"{i:08d}"
                # Created at its first write, so a file's create, writes and close come
                # together (not 100k creates, then 100k reopens). A single-chunk file is
                # written by one pwrite: pre-allocating it first would save nothing.
                slot = files.add(os.path.join(txn, "stage", name), _stage_mode(e), e.size if e.chunk_count > 1 else 0)
                staged.append((slot, rel))
                old = old_files.get(rel)
                for cid, off, n in iter_chunk_spans(e.chunks):
                    targets[cid].append((slot, off))
                    sizes[cid] = n
                    if old is not None and old.kind == Kind.FILE and off < old.size:
                        bases.setdefault(cid, (_under(dest, rel), off))
                out.ops.append(["place", name, rel])
                out.ops.extend(_final_mode(e, rel))
                stage_names.append((name, rel))
            elif step.action == Action.PATCH and not in_place:
                # A new inode: the unchanged ranges come from the old file (in the kernel,
                # see _copy_unchanged), the changed ones from the sources like any chunk.
                name = f"{i:08d}"
                slot = files.add(os.path.join(txn, "stage", name), _stage_mode(e), 0)
                staged.append((slot, rel))
                changed = {off for off, _, _ in step.ranges}
                kept = []
                for cid, off, n in iter_chunk_spans(e.chunks):
                    if off in changed:
                        targets[cid].append((slot, off))
                        sizes[cid] = n
                        bases.setdefault(cid, (_under(dest, rel), off))
                    else:
                        kept.append((cid, off, n))
                copies.append((slot, _under(dest, rel), old_files[rel], e, kept))
                out.ops.append(["place", name, rel])
                out.ops.extend(_final_mode(e, rel))
                stage_names.append((name, rel))
            elif step.action == Action.PATCH:
                if data_fd < 0:
                    data_fd, _ = files.create(os.path.join(txn, "data"))
                patches = []
                for off, n, cid in step.ranges:
                    bases.setdefault(cid, (_under(dest, rel), off))
                    data_at = data_slots.get(cid)
                    if data_at is None:
                        data_at = data_slots[cid] = data_len
                        data_len += n
                        targets[cid].append((data_fd, data_at))
                        sizes[cid] = n
                    patches.append([off, data_at, n])
                _reserve_growth(_under(dest, rel), e.size)
                out.ops.append(["patch", rel, e.size, e.perm, patches])
        if data_fd >= 0:
            preallocate(files.fd(data_fd), data_len)
        for slot, old_path, old, e, kept in copies:
            if _copy_unchanged(old_path, old, files.fd(slot), e.size, kept):
                out.chunks_reused += len(kept)
            else:  # the old file changed under us: its kept chunks come from verified sources
                for cid, off, n in kept:
                    targets[cid].append((slot, off))
                    sizes[cid] = n
        _write_resume_index(txn, target, {name: rel for name, rel in stage_names}, list(data_slots))

        dirty: dict[int, int] = defaultdict(int)

        def put(cid: ChunkId, data: bytes | bytearray | memoryview) -> None:
            for slot, off in targets[cid]:
                fd = files.fd(slot)
                pwrite_all(fd, data, off)
                out.bytes_written += len(data)
                dirty[slot] += len(data)
                if dirty[slot] >= WRITEBACK_EVERY:
                    start_writeback(fd)
                    dirty[slot] = 0

        remaining = set(targets)
        for src in sources:
            have = src.has_many(remaining)
            if not have:
                continue
            try:
                for cid, data in src.get_many([c for c in targets if c in have]):
                    if cid in remaining:
                        put(cid, data)
                        remaining.discard(cid)
                        out.chunks_reused += 1
            except ChunkError:
                pass  # a local copy went bad: whatever it did not deliver is fetched below
        if remaining:
            wanted = [c for c in targets if c in remaining]  # order of first use
            if remote is None:
                raise ChunkNotFoundError(
                    f"{len(wanted)} chunk(s) needed for {dest} are held by no source, e.g. {wanted[0].hex()}",
                    wanted[0].hex(),
                )
            if isinstance(remote, DeltaSource) and remote.accepts_bases:
                fetched = remote.get_many(wanted, bases={c: bases[c] for c in wanted if c in bases})
            else:
                fetched = remote.get_many(wanted)
            for cid, data in fetched:
                if cid in remaining:
                    put(cid, data)
                    remaining.discard(cid)
                    out.chunks_fetched += 1
                    out.bytes_fetched += len(data)
            if remaining:
                missing = next(iter(remaining))
                raise ChunkNotFoundError(
                    f"{getattr(remote, 'location', 'the remote source')} did not deliver {len(remaining)} chunk(s) "
                    f"for {dest}, e.g. {missing.hex()}",
                    missing.hex(),
                )
        files.create_rest()  # the empty ones
        for slot, _ in staged:
            _backdate(files.paths[slot])  # by path: no descriptor to open again
        files.sync()
        for slot, rel in staged:
            st = os.stat(files.paths[slot])
            out.written[rel] = (st.st_size, st.st_mtime_ns)
        return out
    finally:
        files.close()


def _stage_mode(e: Entry) -> int:
    """A staged file's mode: the target's, plus owner read and write while it is written
    (it is reopened to be filled and synced); see :func:`_final_mode`."""
    return e.perm | stat.S_IRUSR | stat.S_IWUSR


def _final_mode(e: Entry, rel: str) -> list[list[object]]:
    """The chmod that gives a placed file its mode, if staging needed more."""
    return [["chmod", rel, e.perm]] if _stage_mode(e) != e.perm else []


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


class _OpenFiles:
    """The files phase 1 writes (staged files, the journal data file), by slot, created and
    opened on demand: at most ``limit`` descriptors are open at once, however many files a
    tree has (a tree of 100k small files must not need 100k descriptors; a common limit is
    1024). Closing a file loses nothing: its dirty pages are made durable by :meth:`sync`."""

    def __init__(self, limit: int = MAX_OPEN_FILES) -> None:
        self.limit = limit
        self.paths: list[str] = []
        self._open: OrderedDict[int, int] = OrderedDict()  # slot -> fd, least recently used first
        self._later: dict[int, tuple[int, int]] = {}  # slot -> (mode, bytes to pre-allocate): not created yet

    def add(self, path: str, mode: int, size: int) -> int:
        """A file to create at its first use (it must not exist), with ``mode``, and ``size``
        bytes pre-allocated (0: none). Its slot."""
        self.paths.append(path)
        self._later[len(self.paths) - 1] = (mode, size)
        return len(self.paths) - 1

    def create_rest(self) -> None:
        """Create the files added but never used."""
        for slot in list(self._later):
            self.fd(slot)

    def create(self, path: str) -> tuple[int, int]:
        """Create ``path`` (it must not exist): its slot, and a descriptor valid until the
        next call on this object."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.paths.append(path)
        return self._keep(len(self.paths) - 1, fd), fd

    def fd(self, slot: int) -> int:
        """A descriptor of the file in ``slot``, valid until the next call on this object."""
        fd = self._open.get(slot)
        if fd is not None:
            self._open.move_to_end(slot)
            return fd
        later = self._later.pop(slot, None)
        if later is None:
            fd = os.open(self.paths[slot], os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            self._keep(slot, fd)
            return fd
        fd = os.open(self.paths[slot], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._keep(slot, fd)
        mode, size = later
        os.fchmod(fd, mode)
        preallocate(fd, size)
        return fd

    def _keep(self, slot: int, fd: int) -> int:
        self._open[slot] = fd
        while len(self._open) > self.limit:
            os.close(self._open.popitem(last=False)[1])
        return slot

    def sync(self) -> None:
        """Make every file durable: one syncfs(2) of their filesystem when there are many
        (as :func:`sync_files` does), else an fsync of each."""
        slots = range(len(self.paths))
        if len(slots) > SYNCFS_MIN_FILES and syncfs(self.fd(0)):
            return
        for slot in slots:
            os.fsync(self.fd(slot))

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])


def _under(dest: str, rel: str) -> str:
    """The path of a manifest entry under ``dest`` (``""`` is ``dest`` itself)."""
    return os.path.join(dest, rel) if rel else dest


def _write_resume_index(txn: str, target: Manifest, stages: dict[str, str], data: list[ChunkId]) -> None:
    """What the staged files (and the journal data file: ``data``, its chunks in order) are
    meant to hold, so an interrupted sync can be resumed. Not fsynced: it only ever saves
    work, and every chunk read back through it is verified."""
    with open(os.path.join(txn, "target"), "wb") as f:
        f.write(target.encode())
    index: dict[str, object] = {"format": RESUME_FORMAT, "version": JOURNAL_VERSION, "stages": stages}
    if data:
        index["data"] = [cid.hex() for cid in data]
    body = json.dumps(index, ensure_ascii=False)
    tmp = os.path.join(txn, RESUME_INDEX + ".tmp")
    with open(tmp, "wb") as f:
        f.write(body.encode("utf-8", "surrogateescape"))
    os.rename(tmp, os.path.join(txn, RESUME_INDEX))


def _backdate(fd: int | str) -> None:
    """Set a finished file's mtime one second into the past.

    Its bytes are final, and no later write can carry that mtime again (a write stamps
    "now"), so a stat cache may trust the file at once instead of treating it as racy
    (written in the current timestamp tick) and reading it all back on the next snapshot.
    """
    now = time.time_ns()
    os.utime(fd, ns=(now, now - BACKDATE_NS))


def _reserve_growth(path: str, new_size: int) -> None:
    """Allocate the blocks a patch will need beyond the file's end now, in phase 1, so that
    applying it cannot run out of space half-way."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if new_size > size:
            reserve(fd, size, new_size - size)
    finally:
        os.close(fd)


def _commit(txn: str, dest: str, ops: list[list[object]]) -> None:
    body = json.dumps({"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "dest": dest, "ops": ops},
                      ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogateescape")
    tmp = os.path.join(txn, "ops.tmp")
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.join(txn, "stage"))
    os.rename(tmp, os.path.join(txn, "ops"))
    fsync_dir(txn)


def _load_journal(raw: bytes, where: str) -> dict:  # type: ignore[type-arg]
    """The journal in ``raw``, checked whole before any operation is applied: every path
    relative and inside ``dest``, every field of the type and range its operation needs.
    MaterializeError (UnsupportedVersionError for another format) otherwise."""
    try:
        journal = json.loads(raw.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError) as e:
        raise MaterializeError(f"journal {where} is not readable: {e}", where) from None
    if not isinstance(journal, dict):
        raise MaterializeError(f"journal {where} is not a journal: a JSON {type(journal).__name__}", where)
    if journal.get("format") != JOURNAL_FORMAT or journal.get("version") != JOURNAL_VERSION:
        raise UnsupportedVersionError(f"journal {where} has format {journal.get('format')!r} version {journal.get('version')!r}")
    dest, ops = journal.get("dest"), journal.get("ops")
    if not isinstance(dest, str) or "\x00" in dest or not os.path.isabs(dest) or os.path.normpath(dest) != dest:
        raise MaterializeError(f"journal {where}: destination {dest!r} is not a normalized absolute path", where)
    if not isinstance(ops, list):
        raise MaterializeError(f"journal {where}: its operations are not a list", where)
    for i, op in enumerate(ops):
        problem = _bad_op(op)
        if problem:
            raise MaterializeError(f"journal {where}: operation {i} {str(op)[:200]}: {problem}", where)
    return journal  # type: ignore[no-any-return]


_ARITY = {"rm": 2, "mkdir": 2, "place": 3, "patch": 5, "link": 3, "chmod": 3, "dirmode": 3}
_OFF_MAX = 2**63 - 1  # what a file offset or size can be (off_t)
_RANGE_MAX = 16 << 20  # a patch range is one chunk: at most the largest max_size


def _bad_op(op: object) -> str:
    """Why ``op`` is not a valid journal operation, or "" if it is one."""
    if not isinstance(op, list) or not op or not isinstance(op[0], str) or _ARITY.get(op[0]) != len(op):
        return "not a known operation with its fields"
    kind = op[0]
    rel = op[2] if kind == "place" else op[1]
    if not isinstance(rel, str):
        return "its path is not a string"
    # Inside dest: relative, no "", "." or ".." component, no NUL. Not the manifest rules:
    # a removal may name a foreign entry ("a\\b", "C:x" are plain names on Linux).
    if rel and (rel.startswith("/") or "\x00" in rel or any(p in ("", ".", "..") for p in rel.split("/"))):
        return "its path is not inside the destination"
    if len(rel.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        return "its path is too long"
    if kind == "place" and not _stage_name(op[1]):
        return "not a staged file's name"
    if kind == "link":
        target = op[2]
        if not isinstance(target, str) or not target or target.startswith("/") or "\x00" in target or "\\" in target:
            return "not a relative link target"
        if len(target.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            return "link target too long"
    if kind in ("chmod", "dirmode") and not _mode(op[2]):
        return "its mode is not permission bits"
    if kind == "patch":
        _, _, size, mode, ranges = op
        if not _offset(size) or not _mode(mode) or not isinstance(ranges, list):
            return "size, mode or ranges of the wrong type"
        for r in ranges:
            if not (isinstance(r, list) and len(r) == 3 and all(_offset(x) for x in r) and r[2] <= _RANGE_MAX):
                return f"range {str(r)[:80]} is not [offset, data offset, length] within bounds"
    return ""


def _mode(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MODE_BITS


def _offset(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _OFF_MAX


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
            st = _lstat(cur)
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


def _apply(dest: str, txn: str, ops: list[list[object]]) -> dict[str, tuple[int, int]]:
    """Phase 2. Every operation is idempotent, so this may run again after a crash.

    Returns (size, mtime_ns) of each patched file once it is durable."""
    tree = _Tree(dest)
    patched: dict[str, tuple[int, int]] = {}
    data_fd = -1
    try:
        for op in ops:
            kind = op[0]
            if kind == "rm":
                path = tree.existing(str(op[1]))
                if path is not None:
                    remove_any(path)
            elif kind == "mkdir":
                path = tree.path(str(op[1]))
                tree.ensure_dir(path, root=not op[1])
            elif kind == "place":
                staged = os.path.join(txn, "stage", str(op[1]))
                path = tree.path(str(op[2]))
                try:  # one rename per file; the unusual cases are told by its error
                    os.rename(staged, path)
                except FileNotFoundError:
                    if os.path.lexists(staged):
                        raise
                    # placed by an earlier, interrupted apply of this journal
                except IsADirectoryError:  # a directory stands where the file goes
                    shutil.rmtree(path)
                    os.rename(staged, path)
            elif kind == "patch":
                _, rel, size, mode, patches = op
                if data_fd < 0:
                    data_fd = os.open(os.path.join(txn, "data"), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fd = os.open(tree.path(str(rel)), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # removed behind our back: the next sync sees it missing and fetches it
                try:
                    for off, slot, n in patches:  # type: ignore[attr-defined]
                        pwrite_all(fd, os.pread(data_fd, n, slot), off)
                    os.ftruncate(fd, int(size))  # type: ignore[call-overload]
                    os.fchmod(fd, int(mode))  # type: ignore[call-overload]
                    _backdate(fd)
                    os.fsync(fd)
                    st = os.fstat(fd)
                    patched[str(rel)] = (st.st_size, st.st_mtime_ns)
                finally:
                    os.close(fd)
            elif kind == "link":
                path = tree.path(str(op[1]))
                try:
                    if os.readlink(path) == op[2]:
                        continue
                except OSError:
                    pass
                remove_any(path)
                os.symlink(str(op[2]), path)
            elif kind == "chmod":
                path = tree.path(str(op[1]))
                os.chmod(path, int(op[2]), follow_symlinks=False)  # type: ignore[call-overload]
            elif kind == "dirmode":
                continue  # after every folder's entries are durable, below
            else:
                raise MaterializeError(f"unknown journal operation {kind!r}", dest)
    finally:
        if data_fd >= 0:
            os.close(data_fd)
    dirs = [d for d in tree.touched if os.path.isdir(d)]
    if len(dirs) <= SYNCFS_MIN_FILES or not _syncfs_at(dirs[0]):  # one syncfs for many folders
        for d in dirs:
            fsync_dir(d)
    for op in ops:  # folder modes last (deepest first): a read-only folder is written first
        if op[0] == "dirmode":
            where = tree.existing(str(op[1]))
            found = _lstat(where) if where is not None else None
            if where is not None and found is not None and stat.S_ISDIR(found.st_mode) and stat.S_IMODE(found.st_mode) != op[2]:
                os.chmod(where, int(op[2]))  # type: ignore[call-overload]
    return patched


def _syncfs_at(path: str) -> bool:
    """syncfs(2) of the filesystem holding the folder ``path``; False if it did not happen."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return syncfs(fd)
    finally:
        os.close(fd)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
