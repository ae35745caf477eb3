"""Where a relative path lands inside a work's root: the one rule every side applies.

The origin (what it serves), the persister (what it stores) and the consumer (where a get
writes) all resolve a Path with :func:`resolve_under`, so none of them can reach outside a
work's root by a different reading of the same string.
"""

from __future__ import annotations

import os

from .errors import PathapiError


class PathOutsideRootError(PathapiError, ValueError):
    """A path that is not inside the root it was resolved under."""


def resolve_under(root: str, rel: str) -> str:
    """The absolute path of ``rel`` inside ``root``; refuses anything that leaves ``root``
    (absolute paths, ``..``, NULs, or symlinks that resolve outside)."""
    if not rel or "\x00" in rel or rel.startswith("/") or "\\" in rel:
        raise PathOutsideRootError(f"path {rel!r} is not a relative path inside the work's root")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise PathOutsideRootError(f"path {rel!r} has a '..' component")
    real_root = os.path.realpath(root)
    full = os.path.join(real_root, *parts) if parts else real_root
    real = os.path.realpath(full)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise PathOutsideRootError(f"path {rel!r} resolves outside the work's root")
    return full
