"""What a materialize checks before its commit point, so that a sync that cannot be
applied is refused with nothing changed, rather than committed and left half-done.

Also the making writable, for the time the operations run, of read-only folders we own.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from ..errors import MaterializeError
from ..manifest import Manifest
from .journal import Link, MakeDir, Operation, Place, SetMode
from .paths import PATH_MAX, lstat_or_none, under


def refusal(message: str, dest: str, code: int | None) -> MaterializeError:
    """A MaterializeError about ``dest`` carrying errno ``code`` (callers branch on it)."""
    err = MaterializeError(message, dest)
    err.errno = code
    return err


def check_same_filesystem(dest: str, state: str) -> None:
    """Staged files are renamed into place: ``state`` must be on ``dest``'s filesystem."""
    probe = dest
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    dev = os.lstat(probe).st_dev
    if dev != os.stat(state).st_dev:
        raise MaterializeError(
            f"state folder {state} is on another filesystem than {dest}: files could not be renamed into place atomically",
            dest,
        )


def check_path_lengths(target: Manifest, dest: str) -> None:
    """Refuse, before anything is staged, a tree whose paths the kernel cannot name under ``dest``.

    A manifest path may be up to 4096 bytes; with ``dest`` in front it can exceed PATH_MAX,
    and a journal naming it could never be applied (every later sync would fail replaying it).
    """
    base = len(os.fsencode(dest)) + 1
    for e in target.entries:
        if e.path and base + len(os.fsencode(e.path)) > PATH_MAX:
            raise refusal(
                f"{e.path[:80]!r}... is too long to create under {dest} ({base + len(os.fsencode(e.path))} bytes, "
                f"the limit is {PATH_MAX}); nothing at {dest} was changed",
                dest, errno.ENAMETOOLONG,
            )


def check_parents(dest: str) -> None:
    """Refuse, before anything is staged, a destination whose parent folders cannot be made:
    a file (or anything but a folder) stands where one of them must go. That is outside the
    destination, so it is the user's to move, never ours to remove."""
    probe = os.path.dirname(dest)
    while probe and not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise refusal(
            f"cannot create {dest}: {probe} is a file where a folder must be. Move or remove {probe}, "
            f"or get into another destination; nothing at {dest} was changed",
            dest, errno.ENOTDIR,
        )


def check_writable(dest: str, ops: Sequence[Operation]) -> list[str]:
    """Check, before the commit point, that every existing folder the operations write into
    can be written by us: it is, or we own it (then it is made writable while the operations
    run, and its mode restored after). Returns those owned read-only folders; a folder we can
    neither write nor chmod is a MaterializeError naming it, with nothing changed."""
    euid = os.geteuid()
    seen: set[str] = set()
    owned: list[str] = []
    created = {op.path for op in ops if isinstance(op, (Place, MakeDir, Link))}
    for op in ops:
        if isinstance(op, SetMode):
            if op.path not in created:  # what this sync creates is ours
                _check_owned(dest, under(dest, op.path), euid)
            continue
        folder = os.path.dirname(under(dest, op.path))
        while folder not in seen and not os.path.lexists(folder):  # created by us: writable
            seen.add(folder)
            folder = os.path.dirname(folder)
        if folder in seen:
            continue
        seen.add(folder)
        if not os.path.isdir(folder):
            continue  # inside dest, a file where a folder goes is replaced; outside, check_parents
        if os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            continue
        if os.stat(folder).st_uid == euid:
            owned.append(folder)
            continue
        raise refusal(
            f"cannot update {dest}: the folder {folder} is not writable by this process (uid {euid}) "
            f"and belongs to another user. Make it writable (chmod u+w, or change its owner), then get "
            f"again; nothing at {dest} was changed",
            dest, errno.EACCES,
        )
    return owned


def _check_owned(dest: str, path: str, euid: int) -> None:
    """A mode can only be set by the owner (or root): refuse, before the commit point, a
    chmod of something of another user's."""
    st = lstat_or_none(path)
    if st is None or euid == 0 or st.st_uid == euid or stat.S_ISLNK(st.st_mode):
        return
    raise refusal(
        f"cannot update {dest}: {path} belongs to another user (uid {st.st_uid}), so this process "
        f"(uid {euid}) cannot set its mode. Change its owner, or remove it, then get again; nothing "
        f"at {dest} was changed",
        dest, errno.EPERM,
    )


def unlock(folders: list[str]) -> list[tuple[str, int]]:
    """Give the owner write and search permission on ``folders``; their former modes."""
    done = []
    for folder in folders:
        try:
            mode = stat.S_IMODE(os.stat(folder).st_mode)
            os.chmod(folder, mode | stat.S_IRWXU)
        except OSError:
            continue  # apply reports what it then cannot do
        done.append((folder, mode))
    return done


def relock(folders: list[tuple[str, int]]) -> None:
    """Give ``folders`` back the modes :func:`unlock` returned (last unlocked first)."""
    for folder, mode in reversed(folders):
        try:
            os.chmod(folder, mode)
        except OSError:
            pass  # removed by the sync
