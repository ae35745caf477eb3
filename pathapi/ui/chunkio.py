"""Bytes of a stored file, read from its chunks: a byte range, a stream, a tar of a folder.

Nothing here stages a whole file or tree: a range reads only the chunks that overlap it, and
a stream or a tar holds at most one batch of chunks (:data:`BATCH_BYTES`) at a time. Every
chunk comes from the chunk store's ``get_many``, which verifies it against its id, so what
is served is exactly what was persisted or an error, never other bytes.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cas.hashing import ChunkId
from cas.manifest import Entry, Kind, Manifest
from cas.store.base import ChunkSource

#: Bytes of chunks asked for at once while streaming.
BATCH_BYTES = 8 << 20


@dataclass(frozen=True)
class Span:
    """One chunk of a file: where it starts in the file, its length, its id."""

    start: int
    length: int
    id: ChunkId

    @property
    def end(self) -> int:
        return self.start + self.length


def spans(entry: Entry) -> list[Span]:
    out: list[Span] = []
    pos = 0
    for cid, n in entry.chunk_refs():
        out.append(Span(pos, n, cid))
        pos += n
    return out


def _fetch(chunks: ChunkSource, ids: list[ChunkId]) -> dict[ChunkId, bytes]:
    want = list(dict.fromkeys(ids))
    return {cid: bytes(data) for cid, data in chunks.get_many(want)}  # copies: buffers may be reused


def read_range(chunks: ChunkSource, entry: Entry, start: int, end: int) -> bytes:
    """The bytes ``[start, end)`` of the file ``entry`` (clipped to its size), reading only
    the chunks that overlap the range."""
    end = min(end, entry.size)
    if start >= end:
        return b""
    parts = [s for s in spans(entry) if s.end > start and s.start < end]
    got = _fetch(chunks, [s.id for s in parts])
    out = bytearray()
    for s in parts:
        data = got[s.id]
        out += data[max(0, start - s.start):min(s.length, end - s.start)]
    return bytes(out)


def iter_file(chunks: ChunkSource, entry: Entry, batch_bytes: int = BATCH_BYTES) -> Iterator[bytes]:
    """The file's bytes in order, one verified batch of chunks at a time."""
    batch: list[Span] = []
    size = 0
    for s in spans(entry):
        batch.append(s)
        size += s.length
        if size >= batch_bytes:
            yield from _emit(chunks, batch)
            batch, size = [], 0
    if batch:
        yield from _emit(chunks, batch)


def _emit(chunks: ChunkSource, batch: list[Span]) -> Iterator[bytes]:
    got = _fetch(chunks, [s.id for s in batch])
    for s in batch:
        yield got[s.id]


class ChunkFile(io.RawIOBase):
    """A stored file as a readable file object (for ``tarfile``), fed batch by batch."""

    def __init__(self, chunks: ChunkSource, entry: Entry) -> None:
        super().__init__()
        self._it = iter_file(chunks, entry)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class _Sink:
    """The write end ``tarfile`` streams into: every write goes straight to ``write``."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write

    def write(self, data: bytes) -> int:
        self._write(bytes(data))
        return len(data)

    def close(self) -> None:
        pass


def write_tar(chunks: ChunkSource, tree: Manifest, top: str, write: Callable[[bytes], None], mtime: int = 0) -> None:
    """Stream ``tree`` as a POSIX (pax) tar to ``write``, every member under ``top/``:
    folders, files (their bytes from the chunks, in order) and symlinks, with the modes the
    manifest records. Built on the fly: at most one batch of chunks is held at a time."""
    with tarfile.open(fileobj=_Sink(write), mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        if tree.root_kind == Kind.FILE:
            _add(tar, chunks, tree.entries[0], top, mtime)
            return
        root = tarfile.TarInfo(top)
        root.type, root.mode, root.mtime = tarfile.DIRTYPE, tree.root_perm, mtime
        tar.addfile(root)
        for e in sorted(tree.entries, key=lambda e: e.path.split("/")):
            _add(tar, chunks, e, f"{top}/{e.path}", mtime)


def _add(tar: tarfile.TarFile, chunks: ChunkSource, e: Entry, name: str, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = mtime
    if e.kind == Kind.DIR:
        info.type, info.mode = tarfile.DIRTYPE, e.perm
        tar.addfile(info)
    elif e.kind == Kind.SYMLINK:
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, e.target, 0o777
        tar.addfile(info)
    else:
        info.type, info.mode, info.size = tarfile.REGTYPE, e.perm, e.size
        tar.addfile(info, io.BufferedReader(ChunkFile(chunks, e), 1 << 20))
