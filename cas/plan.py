"""Transfer and update planning: pure functions of manifests and sets of ids, no I/O.

Kept free of I/O so that "what must move" and "what must be written" can be checked
exhaustively by properties.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from enum import Enum

from .chunking import iter_chunk_spans
from .hashing import ChunkId
from .manifest import Entry, Kind, Manifest

#: A changed file is patched in place when at most this fraction of its bytes must be written.
PATCH_MAX_FRACTION = 0.5


@dataclass(frozen=True)
class FetchPlan:
    """Which chunks of ``target`` must come from elsewhere, given what is held locally."""

    missing: tuple[ChunkId, ...]  # unique, in order of first use in the tree
    missing_bytes: int
    held: int  # distinct chunks of the target already held
    held_bytes: int


def plan_fetch(target: Manifest, held: Container[ChunkId]) -> FetchPlan:
    """The chunks of ``target`` not in ``held``; each at most once, never one that is held."""
    sizes = target.chunk_sizes()  # insertion-ordered: order of first use
    missing = tuple(cid for cid in sizes if cid not in held)
    missing_bytes = sum(sizes[c] for c in missing)
    return FetchPlan(
        missing=missing,
        missing_bytes=missing_bytes,
        held=len(sizes) - len(missing),
        held_bytes=sum(sizes.values()) - missing_bytes,
    )


class Action(Enum):
    CHMOD = "chmod"  # same content, mode differs
    MKDIR = "mkdir"
    PLACE = "place"  # write a new file aside, then rename it over
    PATCH = "patch"  # write only the changed ranges into the existing file (journaled)
    LINK = "link"


@dataclass(frozen=True)
class Step:
    path: str
    action: Action
    entry: Entry
    #: PATCH only: (offset, length, chunk id) of the ranges to write.
    ranges: tuple[tuple[int, int, ChunkId], ...] = ()


@dataclass(frozen=True)
class UpdatePlan:
    """How to turn the tree described by ``local`` into ``target``."""

    steps: tuple[Step, ...]  # parents before children
    removals: tuple[str, ...]  # local paths absent from target, deepest first
    #: (folder, mode) for every folder whose mode must be set (new ones included, "" is the
    #: root), deepest first: applied after everything else, so that a folder the target makes
    #: read-only is still written into before it becomes so.
    modes: tuple[tuple[str, int], ...] = ()


def plan_update(local: Manifest | None, target: Manifest, *, patch_fraction: float = PATCH_MAX_FRACTION) -> UpdatePlan:
    """The steps that make a tree equal to ``local`` equal to ``target``.

    ``local`` is None when nothing exists at the destination. Applying the steps must be
    idempotent (see :mod:`cas.materialize`): a step replaces whatever stands at its path.
    """
    have = local.by_path if local is not None and local.root_kind == target.root_kind else {}
    steps: list[Step] = []
    modes: list[tuple[str, int]] = []
    if target.root_kind == Kind.DIR:
        if local is None or local.root_kind != Kind.DIR:
            steps.append(Step("", Action.MKDIR, Entry("", Kind.DIR)))
            modes.append(("", target.root_perm))
        elif local.root_perm != target.root_perm:
            modes.append(("", target.root_perm))
    for e in target.entries:
        old = have.get(e.path)
        if old is not None and old.kind != e.kind:
            old = None
        if e.kind == Kind.DIR:
            if old is None:
                steps.append(Step(e.path, Action.MKDIR, e))
            if old is None or old.perm != e.perm:
                modes.append((e.path, e.perm))
        elif e.kind == Kind.SYMLINK:
            if old is None or old.target != e.target:
                steps.append(Step(e.path, Action.LINK, e))
        elif old is not None and old.chunks == e.chunks:
            if old.perm != e.perm:
                steps.append(Step(e.path, Action.CHMOD, e))
        else:
            ranges = _patch_ranges(old, e, patch_fraction) if old is not None else None
            if ranges is None:
                steps.append(Step(e.path, Action.PLACE, e))
            else:
                steps.append(Step(e.path, Action.PATCH, e, ranges))
    # Only paths absent from the target are removed up front. A path whose kind changes is
    # cleared by the step that recreates it, so that replaying a half-applied plan never
    # deletes what an earlier, completed step created.
    want = target.by_path
    gone = {p for p in have if p not in want}
    removals = sorted(
        (p for p in gone if not _has_ancestor_in(p, gone)),
        key=lambda p: (-p.count("/"), p),
    )
    modes.sort(key=lambda pm: (-(pm[0].count("/") + bool(pm[0])), pm[0]))
    return UpdatePlan(tuple(steps), tuple(removals), tuple(modes))


def _has_ancestor_in(path: str, paths: set[str]) -> bool:
    parts = path.split("/")
    return any("/".join(parts[:i]) in paths for i in range(1, len(parts)))


def _patch_ranges(old: Entry, new: Entry, fraction: float) -> tuple[tuple[int, int, ChunkId], ...] | None:
    """Ranges of ``new`` that differ from ``old`` at the same offsets, or None if a full
    rewrite is cheaper (more than ``fraction`` of the file would be written)."""
    old_spans = {(off, n, cid) for cid, off, n in iter_chunk_spans(old.chunks)}
    ranges = tuple((off, n, cid) for cid, off, n in iter_chunk_spans(new.chunks) if (off, n, cid) not in old_spans)
    written = sum(n for _, n, _ in ranges)
    if written > fraction * new.size:
        return None
    return ranges
