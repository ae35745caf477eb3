"""Filling the staged files: every chunk a sync needs, from the local sources first and the
remote source for the rest, written at every place it goes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from ..errors import ChunkError, ChunkNotFoundError
from ..fsutil import pwrite_all, start_writeback
from ..hashing import ChunkId
from ..store.base import ChunkSource, DeltaSource
from .files import OpenFiles

#: Staged bytes after which their writeback to disk is started (so the fsync at the end of
#: phase 1 does not begin from a whole file of dirty pages).
WRITEBACK_EVERY = 32 << 20


class ChunkWriter:
    """Writes each chunk of ``targets`` (id -> (file slot, offset) of every place it goes)
    once, the first time its bytes arrive; knows which are still missing."""

    def __init__(self, files: OpenFiles, targets: dict[ChunkId, list[tuple[int, int]]]) -> None:
        self.files = files
        self.targets = targets
        self.remaining = set(targets)
        self.bytes_written = 0
        self._dirty: dict[int, int] = defaultdict(int)

    def wanted(self) -> list[ChunkId]:
        """The missing chunks, in order of first use."""
        return [c for c in self.targets if c in self.remaining]

    def put(self, cid: ChunkId, data: bytes | bytearray | memoryview) -> bool:
        """Write ``data`` (verified by its source) wherever ``cid`` goes; False if it was
        not missing (nothing written)."""
        if cid not in self.remaining:
            return False
        for slot, off in self.targets[cid]:
            fd = self.files.fd(slot)
            pwrite_all(fd, data, off)
            self.bytes_written += len(data)
            self._dirty[slot] += len(data)
            if self._dirty[slot] >= WRITEBACK_EVERY:
                start_writeback(fd)
                self._dirty[slot] = 0
        self.remaining.discard(cid)
        return True


def fill_from_local(writer: ChunkWriter, sources: Sequence[ChunkSource]) -> int:
    """Write what the local ``sources`` hold of the missing chunks, asking each in turn; how
    many chunks they gave. A source that fails on a bad chunk just stops giving."""
    reused = 0
    for src in sources:
        have = src.has_many(writer.remaining)
        if not have:
            continue
        try:
            for cid, data in src.get_many([c for c in writer.wanted() if c in have]):
                if writer.put(cid, data):
                    reused += 1
        except ChunkError:
            pass  # a local copy went bad: whatever it did not deliver is fetched below
    return reused


def fill_from_remote(writer: ChunkWriter, remote: ChunkSource | None, bases: dict[ChunkId, tuple[str, int]],
                     dest: str) -> tuple[int, int]:
    """Fetch the chunks still missing from ``remote`` (as deltas against ``bases``, the old
    bytes at each chunk's place, where it takes them): (chunks, bytes) fetched.
    ChunkNotFoundError if any is still missing after."""
    if not writer.remaining:
        return 0, 0
    wanted = writer.wanted()
    if remote is None:
        raise ChunkNotFoundError(
            f"{len(wanted)} chunk(s) needed for {dest} are held by no source, e.g. {wanted[0].hex()}",
            wanted[0].hex(),
        )
    if isinstance(remote, DeltaSource) and remote.accepts_bases:
        fetched = remote.get_many(wanted, bases={c: bases[c] for c in wanted if c in bases})
    else:
        fetched = remote.get_many(wanted)
    chunks = nbytes = 0
    for cid, data in fetched:
        if writer.put(cid, data):
            chunks += 1
            nbytes += len(data)
    if writer.remaining:
        missing = next(iter(writer.remaining))
        raise ChunkNotFoundError(
            f"{getattr(remote, 'location', 'the remote source')} did not deliver {len(writer.remaining)} chunk(s) "
            f"for {dest}, e.g. {missing.hex()}",
            missing.hex(),
        )
    return chunks, nbytes
