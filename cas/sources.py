"""Chunk sources other than stores: the files of a tree ("seeds").

A seed is a tree already on disk together with its manifest: any chunk inside its files can
be read from there instead of being fetched (desync's idea). Chunks held inside materialized
files are therefore never stored a second time. A seed's files may have changed since its
manifest was taken, so every read is verified; a chunk that no longer matches is skipped
(reported in ``stale``) rather than trusted.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Iterator

from .chunking import iter_chunks
from .errors import ChunkNotFoundError
from .hashing import ChunkId, chunk_id
from .manifest import Manifest
from .store.base import Payload


class SeedSource:
    """Chunks read from the files of ``root``, located by that tree's manifest ``manifest``.

    ``get_many`` yields only chunks whose bytes still verify; the ids that did not are added
    to ``stale`` (the file changed under us), so the caller can fetch them elsewhere.
    """

    def __init__(self, manifest: Manifest, root: str | os.PathLike[str]) -> None:
        root = os.fspath(root)
        prefix = os.path.join(root, "")  # entry paths are relative: a concatenation is the join
        # A file root that is a symlink is resolved, as snapshot() does: reads use O_NOFOLLOW.
        files = [(prefix + e.path if e.path else os.path.realpath(root), e.chunks) for e in manifest.files()]
        self._init(files, f"seed:{root}")
        self.root = root

    @classmethod
    def from_files(cls, files: list[tuple[str, bytes]], location: str) -> SeedSource:
        """A seed over explicit (path, packed chunk list) pairs, such as files a previous,
        interrupted sync had partly written (chunks it never wrote fail verification)."""
        seed = cls.__new__(cls)
        seed._init(files, location)
        seed.root = ""
        return seed

    def _init(self, files: list[tuple[str, bytes]], location: str) -> None:
        self.location = location
        self.stale: set[ChunkId] = set()
        self._where: dict[ChunkId, tuple[str, int, int]] = {}
        where = self._where
        for path, chunks in files:
            off = 0
            for cid, n in iter_chunks(chunks):
                if cid not in where:
                    where[cid] = (path, off, n)
                off += n

    def __contains__(self, cid: object) -> bool:
        return cid in self._where

    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        return {cid for cid in ids if cid in self._where}

    def get_many(self, ids: Iterable[ChunkId]) -> Iterator[tuple[ChunkId, Payload]]:
        by_file: dict[str, list[tuple[int, int, ChunkId]]] = defaultdict(list)
        for cid in ids:
            loc = self._where.get(cid)
            if loc is None:
                raise ChunkNotFoundError(f"chunk {cid.hex()} is not in {self.location}", cid.hex())
            by_file[loc[0]].append((loc[1], loc[2], cid))
        for path, spans in by_file.items():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                self.stale.update(cid for _, _, cid in spans)
                continue
            try:
                for off, n, cid in sorted(spans):
                    data = os.pread(fd, n, off)
                    if len(data) == n and chunk_id(data) == cid:
                        yield cid, data
                    else:
                        self.stale.add(cid)
            finally:
                os.close(fd)

