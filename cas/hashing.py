"""Chunk ids: BLAKE3-256 of a chunk's plain (uncompressed) bytes.

A ``ChunkId`` is the raw 32-byte digest; it is shown as 64 lowercase hex characters.
Every place where bytes cross a boundary (disk, socket, bucket) calls :func:`verify`.
"""

from __future__ import annotations

from typing import TypeAlias

import blake3

from .errors import ChunkCorruptError

ChunkId: TypeAlias = bytes
ID_SIZE = 32

# Inputs at least this large are hashed with BLAKE3's internal threads (both cores).
_THREADED_MIN = 8 << 20


def chunk_id(data: bytes | bytearray | memoryview) -> ChunkId:
    """The id of ``data`` (a buffer of any item size is hashed as its bytes)."""
    if isinstance(data, memoryview) and data.itemsize != 1:
        data = data.cast("B")
    if len(data) >= _THREADED_MIN:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
    return blake3.blake3(data).digest()


def verify(expected: ChunkId, data: bytes | bytearray | memoryview, where: str = "") -> None:
    """Raise :class:`ChunkCorruptError` unless ``data`` hashes to ``expected``."""
    got = chunk_id(data)
    if got != expected:
        at = f" from {where}" if where else ""
        raise ChunkCorruptError(
            f"chunk {expected.hex()}{at} failed verification: its {len(data)} bytes hash to {got.hex()}",
            chunk_id=expected.hex(),
        )


