"""Content-defined chunking (FastCDC 2020, compiled) and the read -> chunk -> hash pipeline.

Boundaries come from ``pyfastcdc`` (Cython, releases the GIL while cutting); ids from
BLAKE3 (Rust, releases the GIL while hashing). A large file is read in segments into a
small ring of reused buffers: the calling thread reads and cuts, one worker thread hashes,
so both cores work and memory stays bounded (ring size x segment size) whatever the file size.

A chunk list is kept packed, ``len(chunks) * RECORD_SIZE`` bytes of (id, u32 length) records:
a 1 GiB file is ~4000 records and costs one bytes object, not 4000 tuples.
"""

from __future__ import annotations

import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import blake3
from pyfastcdc import FastCDC

from .hashing import ID_SIZE, ChunkId

KiB = 1024
MiB = 1024 * KiB

_LEN = struct.Struct("<I")
_RECORD = struct.Struct(f"<{ID_SIZE}sI")  # one record of a packed chunk list: id, length
RECORD_SIZE = _RECORD.size

ALGORITHM_FASTCDC2020 = 1


@dataclass(frozen=True)
class ChunkerParams:
    """What decides chunk boundaries; recorded in every manifest.

    Two manifests can share chunks only if they were cut with equal parameters. ``avg_size``
    is FastCDC's mask parameter: with cut-point skipping the observed mean is close to
    ``min_size + avg_size``.
    """

    algorithm: int = ALGORITHM_FASTCDC2020
    min_size: int = 64 * KiB
    avg_size: int = 256 * KiB
    max_size: int = 1 * MiB

    def __post_init__(self) -> None:
        if self.algorithm != ALGORITHM_FASTCDC2020:
            raise ValueError(f"unknown chunking algorithm {self.algorithm}")
        # The ranges FastCDC accepts: anything else would pass here and fail at the first cut.
        if not (
            64 <= self.min_size <= 1 * MiB
            and 256 <= self.avg_size <= 4 * MiB
            and 1 * KiB <= self.max_size <= 16 * MiB
            and self.min_size <= self.avg_size <= self.max_size
        ):
            raise ValueError(f"bad chunk sizes: {self}")
        if self.avg_size & (self.avg_size - 1):
            raise ValueError(f"avg_size must be a power of two: {self.avg_size}")
        if self.min_size % 2:
            # FastCDC tests cut points two bytes at a time from min_size rounded down to even:
            # an odd min_size would let chunks of min_size - 1 through.
            raise ValueError(f"min_size must be even: {self.min_size}")


DEFAULT_PARAMS = ChunkerParams()

Readinto = Callable[[memoryview], int | None]


def pack_chunks(refs: list[tuple[ChunkId, int]]) -> bytes:
    """Pack (id, length) pairs into a chunk list."""
    return b"".join(cid + _LEN.pack(n) for cid, n in refs)


def iter_chunks(packed: bytes) -> Iterator[tuple[ChunkId, int]]:
    """(id, length) of each record of a packed chunk list."""
    return _RECORD.iter_unpack(packed)  # in C: a generator here cost ~1 us per record


def iter_chunk_spans(packed: bytes) -> Iterator[tuple[ChunkId, int, int]]:
    """(id, offset, length) of each chunk of a packed chunk list."""
    off = 0
    for cid, n in iter_chunks(packed):
        yield cid, off, n
        off += n


class Chunker:
    """Cuts buffers and files into chunks and names them. Thread-safe.

    ``segment_size`` is how much of a file is read per step; ``ring`` how many such buffers
    one pipeline uses (its memory: ``ring * (segment_size + max_size)``). Buffers are kept
    and reused across calls (allocating and zeroing 50 MiB per file would dominate the cost
    of a medium-sized file); at most ``2 * ring`` are kept idle.
    """

    def __init__(
        self,
        params: ChunkerParams = DEFAULT_PARAMS,
        *,
        segment_size: int = 8 * MiB,
        ring: int = 3,
    ) -> None:
        self.params = params
        self.segment_size = max(segment_size, params.max_size)
        self.ring = max(2, ring)
        self._local = threading.local()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cas-hash")
        self._idle: list[bytearray] = []
        self._idle_lock = threading.Lock()

    def _take_buffers(self, n: int) -> list[bytearray]:
        cap = self.segment_size + self.params.max_size
        with self._idle_lock:
            got = [self._idle.pop() for _ in range(min(n, len(self._idle)))]
        return got + [bytearray(cap) for _ in range(n - len(got))]

    def _give_buffers(self, bufs: list[bytearray]) -> None:
        with self._idle_lock:
            self._idle.extend(bufs[: max(0, 2 * self.ring - len(self._idle))])

    def _scratch(self, size: int) -> bytearray:
        """A per-thread buffer of at least ``size`` bytes, reused across calls."""
        buf = getattr(self._local, "scratch", None)
        if buf is None or len(buf) < size:
            buf = self._local.scratch = bytearray(max(size, 1 << 20))
        return buf

    def _cdc(self) -> FastCDC:
        # FastCDC objects are "not concurrent-proof": one per thread.
        cdc = getattr(self._local, "cdc", None)
        if cdc is None:
            p = self.params
            cdc = FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size, normalized_chunking=1)
            self._local.cdc = cdc
        return cdc

    def close(self) -> None:
        self._hasher.shutdown(wait=True)

    def __enter__(self) -> Chunker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- buffers -----------------------------------------------------------------
    def cut(self, buf: bytes | bytearray | memoryview, *, final: bool = True) -> list[tuple[int, int]]:
        """(offset, length) of the chunks of ``buf``.

        With ``final=False`` the buffer is a prefix of a longer stream: only chunks whose
        boundary cannot depend on bytes beyond the buffer are returned (FastCDC decides a
        cut from at most ``max_size`` bytes after the chunk's start); the caller carries the
        rest over to the next buffer.
        """
        n = len(buf)
        max_size = self.params.max_size
        spans: list[tuple[int, int]] = []
        for c in self._cdc().cut_buf(buf):
            if not final and n - c.offset < max_size:
                break
            spans.append((c.offset, c.length))
        return spans

    def chunk_bytes(self, data: bytes | bytearray | memoryview) -> bytes:
        """Packed chunk list of an in-memory buffer (hashed on this thread)."""
        mv = memoryview(data)
        return b"".join(
            blake3.blake3(mv[o : o + n]).digest() + _LEN.pack(n) for o, n in self.cut(mv)
        )

    # -- streams -----------------------------------------------------------------
    def chunk_stream(self, readinto: Readinto, size_hint: int = -1) -> tuple[bytes, int]:
        """Read a stream to its end; return (packed chunk list, bytes read).

        Small inputs (known to fit one segment) are cut and hashed on this thread; larger
        ones go through the two-thread pipeline.
        """
        if 0 <= size_hint <= self.segment_size:
            # One read into a reused buffer, cut and hashed on this thread: a pipeline's
            # hand-offs cost more than they save below a segment.
            mv = memoryview(self._scratch(size_hint + 1))[: size_hint + 1]  # a spare byte shows growth
            n = _fill(readinto, mv)
            if n <= size_hint:
                return self.chunk_bytes(mv[:n]), n
            # It grew under us: read it as a big one; the caller compares size before/after
            # and retries anyway.
            return self._pipeline(readinto, prefix=bytes(mv[:n]))
        return self._pipeline(readinto)

    def chunk_file(self, fd: int, size_hint: int = -1) -> tuple[bytes, int]:
        """Chunk an open file descriptor from its current offset to its end."""
        f = os.fdopen(fd, "rb", buffering=0, closefd=False)
        return self.chunk_stream(f.readinto, size_hint)  # type: ignore[arg-type]

    def _pipeline(self, readinto: Readinto, prefix: bytes = b"") -> tuple[bytes, int]:
        max_size = self.params.max_size
        cap = self.segment_size + max_size
        free: queue.Queue[bytearray] = queue.Queue()
        ring = self._take_buffers(self.ring)
        for b in ring:
            free.put(b)
        futures: list[Future[bytes]] = []

        def hash_spans(buf: bytearray, spans: list[tuple[int, int]]) -> bytes:
            try:
                mv = memoryview(buf)
                return b"".join(
                    blake3.blake3(mv[o : o + n]).digest() + _LEN.pack(n) for o, n in spans
                )
            finally:
                free.put(buf)

        buf = free.get()
        filled = len(prefix)
        buf[:filled] = prefix
        total = 0
        eof = False
        try:
            while True:
                mv = memoryview(buf)
                if not eof:
                    got = _fill(readinto, mv[filled:])
                    eof = filled + got < cap
                    filled += got
                spans = self.cut(mv[:filled], final=eof)
                used = spans[-1][0] + spans[-1][1] if spans else 0
                tail = filled - used
                # Take the next buffer and move the undecided tail into it *before* handing
                # this one to the hasher, which returns it to the ring when done.
                nxt = free.get() if (tail or not eof) else None
                if nxt is not None and tail:
                    nxt[:tail] = mv[used:filled]
                del mv
                if spans:
                    futures.append(self._hasher.submit(hash_spans, buf, spans))
                else:
                    free.put(buf)
                total += used
                if nxt is None:
                    break
                buf, filled = nxt, tail
            result = b"".join(f.result() for f in futures)
        except BaseException:
            for f in futures:
                f.cancel()
            for f in futures:  # the hasher may still hold a buffer: let it finish
                if not f.cancelled():
                    f.exception()
            raise
        self._give_buffers(ring)  # every hash job is done: no one holds a buffer now
        return result, total


def _fill(readinto: Readinto, mv: memoryview) -> int:
    """Read until ``mv`` is full or the stream ends; the number of bytes read."""
    got = 0
    while got < len(mv):
        n = readinto(mv[got:])
        if not n:
            break
        got += n
    return got
