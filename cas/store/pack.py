"""Chunk records in packs: the one byte format both packed stores write, and their shared base.

A pack is a file (local store) or an object (S3 store) of records laid end to end::

    record = header (44 bytes: RECORD) + payload (``stored`` bytes, raw or zstd)
    RECORD = magic "CK", codec, reserved 0, stored length, raw length, chunk id (32 bytes)

(docs/format.md, "Pack records"). A store's index says where each record lies and what its
header must say; the header repeats it, so an index entry pointing at the wrong place, a
torn write or a flipped bit is caught before a byte is handed out. Reading a record checks
its header against the index, decodes it and verifies it by its id: :func:`read_record` is
the only way the stores turn pack bytes into chunk bytes.

:class:`PackedChunkStore` owns what both stores do the same way: the batch rules of
``put_many`` (ids checked, duplicates within a batch dropped, items of any buffer type),
the locking and closed state of every call, and compaction's signature and statistics. A
subclass keeps only its index and its pack I/O.
"""

from __future__ import annotations

import struct
import threading
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from ..compress import decompress, maybe_compress
from ..errors import ChunkCorruptError
from ..hashing import ID_SIZE, ChunkId, verify
from .base import ChunkStore, Payload

RECORD = struct.Struct("<2sBBII32s")  # magic, codec, reserved, stored length, raw length, id
RECORD_MAGIC = b"CK"
#: A reader racing compactions looks a chunk up again at most this often.
MOVED_RETRIES = 4


@dataclass
class CompactStats:
    """What one compaction did: packs rewritten, live chunks moved, pack bytes before and after."""

    packs_rewritten: int = 0
    chunks_moved: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    #: Ids (hex) of chunks that failed verification: left in place, with their packs.
    corrupt: list[str] = field(default_factory=list)

    @property
    def bytes_reclaimed(self) -> int:
        return self.bytes_before - self.bytes_after


@runtime_checkable
class Compactable(Protocol):
    """A chunk store whose deletes leave bytes behind until it is compacted (the packed
    stores). Garbage collection compacts exactly the stores that say so by this method."""

    def compact(self, *, min_garbage: float = 0.2) -> CompactStats: ...


class Record(NamedTuple):
    """One chunk encoded as a record: ``header + payload`` is what goes into a pack."""

    header: bytes
    payload: Payload
    codec: int
    raw: int  # the chunk's length

    @property
    def size(self) -> int:
        """Bytes the record takes in its pack."""
        return RECORD.size + len(self.payload)


def encode_record(cid: ChunkId, data: Payload, where: str) -> Record:
    """``data`` verified against ``cid`` (ChunkCorruptError naming ``where`` if it is not
    that chunk), compressed when that pays, and framed as a record."""
    verify(cid, data, where)
    codec, payload = maybe_compress(data)
    return Record(RECORD.pack(RECORD_MAGIC, codec, 0, len(payload), len(data), cid), payload, codec, len(data))


def record_size(stored: int) -> int:
    """Bytes a record with a payload of ``stored`` bytes takes in its pack."""
    return RECORD.size + stored


def read_record(blob: Payload, at: int, cid: ChunkId, stored: int, raw: int, codec: int, where: str) -> Payload:
    """The verified bytes of chunk ``cid`` from the record at offset ``at`` of ``blob``, whose
    index entry says (``stored``, ``raw``, ``codec``). ChunkCorruptError naming ``where`` if
    the record is cut short, its header disagrees with the index, it does not decode, or its
    bytes are not the chunk."""
    view = memoryview(blob)
    if at + RECORD.size + stored > len(view):
        raise ChunkCorruptError(f"chunk {cid.hex()} is truncated in {where}", cid.hex())
    magic, rcodec, _, rstored, rraw, rid = RECORD.unpack_from(view, at)
    if (magic, rcodec, rstored, rraw, rid) != (RECORD_MAGIC, codec, stored, raw, cid):
        raise ChunkCorruptError(f"chunk {cid.hex()}: record header at {where} does not match the index", cid.hex())
    try:
        data = decompress(codec, view[at + RECORD.size : at + RECORD.size + stored], raw, cid.hex())
    except ChunkCorruptError as e:  # say where the bad bytes are, as every other error here does
        raise ChunkCorruptError(f"{e} (record at {where})", cid.hex()) from None
    verify(cid, data, where)
    return data


def unique_chunks(items: Iterable[tuple[ChunkId, Payload]]) -> Iterator[tuple[ChunkId, Payload]]:
    """The items of one ``put_many`` batch, each id once (the first wins), checked to be an
    id, and buffers cast to bytes so lengths count bytes, not items. Lazy: a store may read
    on while it writes."""
    seen: set[ChunkId] = set()
    for cid, data in items:
        if len(cid) != ID_SIZE:
            raise ValueError(f"chunk id must be {ID_SIZE} bytes, got {len(cid)}")
        if cid in seen:
            continue
        seen.add(cid)
        if isinstance(data, memoryview) and data.itemsize != 1:
            data = data.cast("B")
        yield cid, data


class PackedChunkStore(ChunkStore):
    """A chunk store of records in packs located by an index (the local and S3 stores).

    The public batch calls are written here, once: each runs under the store's write lock
    (``put_many``, ``delete_many``, ``compact``, ``close`` one at a time per store object;
    other processes coordinate through the backend) on an open store, and hands the
    subclass clean input. The subclass implements ``_put_new`` (write the chunks it lacks
    as records, durably, then index them), ``_delete`` and ``_compact``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def put_many(self, items: Iterable[tuple[ChunkId, Payload]]) -> int:
        with self._lock:
            self._ensure_open()
            return self._put_new(unique_chunks(items))

    def delete_many(self, ids: Iterable[ChunkId]) -> int:
        with self._lock:
            self._ensure_open()
            wanted = set(ids)
            return self._delete(wanted) if wanted else 0

    def compact(self, *, min_garbage: float = 0.2) -> CompactStats:
        """Reclaim the pack bytes of deleted chunks and of writers killed mid-write: every
        pack whose garbage is at least ``min_garbage`` of its size is rewritten with its live
        records only, each verified on the way (a corrupt one stays where it is, listed in
        :attr:`CompactStats.corrupt`). Safe alongside readers and writers in any process."""
        with self._lock:
            self._ensure_open()
            stats = CompactStats()
            self._compact(stats, min_garbage)
            return stats

    @abstractmethod
    def _put_new(self, items: Iterator[tuple[ChunkId, Payload]]) -> int:
        """Store those of ``items`` (unique, checked) the store lacks; how many were added."""

    @abstractmethod
    def _delete(self, ids: set[ChunkId]) -> int:
        """Unindex ``ids`` (not empty); how many were present."""

    @abstractmethod
    def _compact(self, stats: CompactStats, min_garbage: float) -> None:
        """One compaction, recorded in ``stats``."""
