"""One materialize: check, stage (phase 1), commit, apply (phase 2), clean up."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..manifest import Kind, Manifest
from ..plan import plan_update
from ..store.base import ChunkSource
from . import journal
from .apply import apply, apply_error
from .checks import (
    check_parents,
    check_path_lengths,
    check_same_filesystem,
    check_writable,
    refusal,
    relock,
    unlock,
)
from .journal import DirMode, Operation, Remove
from .paths import under
from .resume import discard_resume, keep_for_resume, resume_source
from .staging import prepare


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
    check_same_filesystem(dest, state)
    check_path_lengths(target, dest)
    check_parents(dest)
    plan = plan_update(local, target)
    txn = os.path.join(state, "txn")
    os.makedirs(os.path.join(txn, "stage"))
    resume = resume_source(state)
    try:
        prep = prepare(plan.steps, target, dest, txn, [*sources, *([resume] if resume else [])], remote, local,
                       in_place)
        extra = [p for p in foreign if p not in target.by_path] if target.root_kind == Kind.DIR else []
        ops: list[Operation] = [Remove(p) for p in (*plan.removals, *extra)]
        ops += prep.ops
        ops += [DirMode(p, mode) for p, mode in plan.modes]
        locked_dirs = check_writable(dest, ops)
        journal.commit(txn, dest, ops)
    except BaseException as e:
        keep_for_resume(state)  # what this attempt staged (old resumed chunks included)
        if isinstance(e, OSError) and type(e) in (OSError, PermissionError):  # the disk refused: say where, keep errno
            raise refusal(
                f"cannot stage the new contents of {dest} in {state}: {e.strerror or e} "
                f"(errno {e.errno}); nothing at {dest} was changed",
                dest, e.errno,
            ) from e
        raise
    unlocked = unlock(locked_dirs)
    try:
        written = prep.written | apply(dest, txn, ops)
    except OSError as e:
        raise apply_error(dest, e) from e
    finally:  # a folder the target gives a mode has it; the others get theirs back
        moded = {under(dest, op.path) for op in ops if isinstance(op, DirMode)}
        relock([(folder, mode) for folder, mode in unlocked if folder not in moded])
    shutil.rmtree(txn)
    discard_resume(state)
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
