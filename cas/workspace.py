"""A workspace: one folder's cas state (stat cache, journal, staging) and the operations on it.

This is the object most callers want: ``snapshot`` a path, ``sync`` a path to a manifest
from some chunk source. It takes the state lock, finishes any interrupted sync first, uses
the current files as a seed (chunks already on disk are never fetched), and reports what it did.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Container, Sequence
from pathlib import Path

import lmdb

from .chunking import DEFAULT_PARAMS, Chunker, ChunkerParams
from .errors import MaterializeError, SnapshotError
from .hashing import ChunkId
from .manifest import Kind, Manifest
from .materialize import MaterializeResult, locked, materialize, recover
from .plan import FetchPlan, plan_fetch
from .snapshot import snapshot
from .sources import SeedSource
from .statcache import StatCache
from .store.base import ChunkSource


class Workspace:
    """The cas state kept in ``state_dir`` for the trees it snapshots and materializes.

    ``state_dir`` must be on the same filesystem as the trees synced into (files are staged
    there, then renamed into place).
    """

    def __init__(self, state_dir: str | os.PathLike[str], params: ChunkerParams = DEFAULT_PARAMS) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.chunker = Chunker(params)
        self.stat_cache = StatCache(self.state_dir / "statcache")

    def snapshot(self, path: str | os.PathLike[str]) -> Manifest:
        """The manifest of ``path`` now (unchanged files are not read again)."""
        return snapshot(path, self.chunker, self.stat_cache)

    def local_manifest(self, path: str | os.PathLike[str]) -> Manifest | None:
        """What is at ``path`` now, or None if nothing (or only a symlink) is there."""
        return self._local(path)[0]

    def _local(self, path: str | os.PathLike[str]) -> tuple[Manifest | None, list[str]]:
        """The receiver's view of ``path``: its manifest, and the entries a manifest cannot
        hold (escaping links, FIFOs, unportable names...), which a sync replaces or removes."""
        if not os.path.lexists(path) or os.path.islink(path):
            return None, []
        foreign: list[str] = []
        try:
            return snapshot(path, self.chunker, self.stat_cache, foreign=foreign), foreign
        except SnapshotError:
            if os.path.isdir(path) and not os.path.islink(path):
                raise  # a folder we cannot even list: refuse rather than guess
            return None, []  # a FIFO, socket or device at the root: replaced whole

    def sync(
        self,
        target: Manifest,
        dest: str | os.PathLike[str],
        *,
        remote: ChunkSource | None = None,
        sources: Sequence[ChunkSource] = (),
        overwrite: bool = True,
        in_place: bool = False,
    ) -> MaterializeResult:
        """Make ``dest`` equal to ``target``, fetching from ``remote`` only chunks held nowhere here.

        With ``overwrite=False`` a ``dest`` that exists raises ``FileExistsError`` and nothing
        is written. Chunks come first from ``dest``'s own files, then from ``sources``. A
        changed file becomes a new file renamed into place unless ``in_place`` (see
        :func:`cas.materialize.materialize`).
        """
        if target.params != self.chunker.params:
            raise MaterializeError(
                f"manifest was cut with {target.params}, this workspace with {self.chunker.params}", os.fspath(dest)
            )
        with locked(self.state_dir):
            recover(self.state_dir)
            if not overwrite and os.path.lexists(dest):
                raise FileExistsError(17, "exists locally and overwrite is False", os.fspath(dest))
            local, foreign = self._local(dest)
            seeds: list[ChunkSource] = [SeedSource(local, dest)] if local is not None else []
            result = materialize(
                target, dest, state_dir=self.state_dir, local=local, sources=[*seeds, *sources], remote=remote,
                foreign=foreign, in_place=in_place,
            )
            self._remember(target, os.fspath(dest), result.written)
            return result

    def _remember(self, target: Manifest, dest: str, written: dict[str, tuple[int, int]]) -> None:
        """Enter the files a sync just wrote into the stat cache, so the next snapshot of
        ``dest`` does not read them back. A file is entered only if it still shows the stat
        it had when it was made durable (the stat cache's racy rule applies on top)."""
        root = os.path.realpath(dest) if target.root_kind == Kind.FILE else os.path.abspath(dest)
        for rel, (size, mtime_ns) in written.items():
            path = os.path.join(root, rel) if rel else root
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
                self.stat_cache.put(self.chunker.params, path, st, target.by_path[rel].chunks, renamed=True)
        try:
            self.stat_cache.flush()
        except (lmdb.Error, OSError):
            pass  # a full disk: the sync is done, and the cache only saves re-reading these files

    def fetch_plan(self, target: Manifest, dest: str | os.PathLike[str]) -> FetchPlan:
        """What a sync of ``target`` into ``dest`` would fetch now (chunks in none of its files)."""
        local = self.local_manifest(dest)
        held: Container[ChunkId] = SeedSource(local, dest) if local is not None else set()
        return plan_fetch(target, held)

    def recover(self) -> bool:
        """Finish or discard an interrupted sync; True if one was finished."""
        with locked(self.state_dir):
            return recover(self.state_dir)

    def close(self) -> None:
        self.stat_cache.close()
        self.chunker.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
