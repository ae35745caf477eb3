"""Paths under a destination, as the journal names them."""

from __future__ import annotations

import os

#: The kernel's PATH_MAX counts the terminating NUL: a path passed to it has at most 4095 bytes.
PATH_MAX = 4095


def under(dest: str, rel: str) -> str:
    """The path of a manifest entry under ``dest`` (``""`` is ``dest`` itself)."""
    return os.path.join(dest, rel) if rel else dest


def lstat_or_none(path: str) -> os.stat_result | None:
    """What stands at ``path`` (never following a link), or None if nothing does."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
