"""Block deltas of one chunk against the bytes that stood at its place before.

When a file is edited in place, a changed chunk mostly repeats the receiver's old bytes at
the same offset. The receiver sends digests of its old bytes in fixed blocks; the sender
answers with only the blocks that differ; the receiver rebuilds the chunk and checks its
BLAKE3 id, as for any chunk (a wrong base can only make that check fail, never pass).
Format in docs/format.md ("Block delta").
"""

from __future__ import annotations

import blake3

from .errors import ChunkCorruptError

BLOCK_SIZE = 8 * 1024
DIGEST_SIZE = 16
#: A delta is sent only if it leaves out at least this fraction of the chunk.
MIN_SAVING = 0.25


def block_digests(data: bytes | bytearray | memoryview, block: int = BLOCK_SIZE) -> bytes:
    """16-byte BLAKE3 digests of each ``block``-sized piece of ``data`` (the last may be short)."""
    mv = memoryview(data)
    return b"".join(blake3.blake3(mv[i : i + block]).digest(DIGEST_SIZE) for i in range(0, len(mv), block))


def encode(new: bytes | memoryview, base_digests: bytes, block: int = BLOCK_SIZE) -> bytes | None:
    """A delta of ``new`` against a base known by its block digests, or None if it would
    not save MIN_SAVING of the chunk. Layout: a bitmap (bit i set: block i follows), then
    the set blocks in order."""
    mv = memoryview(new)
    nblocks = (len(mv) + block - 1) // block
    have = len(base_digests) // DIGEST_SIZE
    bitmap = bytearray((nblocks + 7) // 8)
    parts: list[memoryview] = []
    sent = 0
    for i in range(nblocks):
        piece = mv[i * block : (i + 1) * block]
        if i < have and blake3.blake3(piece).digest(DIGEST_SIZE) == base_digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]:
            continue
        bitmap[i >> 3] |= 1 << (i & 7)
        parts.append(piece)
        sent += len(piece)
    if len(bitmap) + sent > (1 - MIN_SAVING) * len(mv):
        return None
    return bytes(bitmap) + b"".join(parts)


def apply(payload: bytes | memoryview, base: bytes | memoryview, length: int, block: int = BLOCK_SIZE) -> bytes:
    """Rebuild a ``length``-byte chunk from a delta and the base bytes.
    :class:`~cas.errors.ChunkCorruptError` (a ValueError) if the payload does not fit (the
    caller then verifies the result's id anyway)."""
    if block <= 0 or length < 0:
        raise ChunkCorruptError(f"delta of {length} bytes in blocks of {block}: not a valid shape")
    nblocks = (length + block - 1) // block
    pmv = memoryview(payload)
    pos = (nblocks + 7) // 8
    if len(pmv) < pos:
        raise ChunkCorruptError(f"delta of {len(pmv)} bytes is shorter than its {pos}-byte bitmap")
    bmap = pmv[:pos]
    bmv = memoryview(base)
    if length > len(bmv) + len(pmv) - pos:  # every block comes from one or the other
        raise ChunkCorruptError(f"a {length}-byte chunk cannot be rebuilt from {len(pmv)} delta and {len(bmv)} base bytes")
    out = bytearray(length)
    for i in range(nblocks):
        start = i * block
        n = min(block, length - start)
        if bmap[i >> 3] & (1 << (i & 7)):
            piece = pmv[pos : pos + n]
            pos += n
        else:
            piece = bmv[start : start + n]
        if len(piece) != n:
            raise ChunkCorruptError(f"delta block {i} is {len(piece)} bytes, expected {n}")
        out[start : start + n] = piece
    if pos != len(pmv):
        raise ChunkCorruptError(f"delta has {len(pmv) - pos} bytes left over")
    return bytes(out)
