"""A chunk store in a dict: the reference implementation, for tests and short-lived caches."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from ..errors import ChunkNotFoundError
from ..hashing import ChunkId, verify
from .base import ChunkStore, Payload


class MemoryChunkStore(ChunkStore):
    """Holds chunks in memory; not durable across processes (it lives in one)."""

    def __init__(self) -> None:
        self._chunks: dict[ChunkId, bytes] = {}
        self._lock = threading.Lock()
        self.location = f"memory:{id(self):x}"

    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        self._ensure_open()
        with self._lock:
            return {i for i in ids if i in self._chunks}

    def get_many(self, ids: Iterable[ChunkId]) -> Iterator[tuple[ChunkId, Payload]]:
        self._ensure_open()
        for cid in ids:
            with self._lock:
                data = self._chunks.get(cid)
            if data is None:
                raise ChunkNotFoundError(f"chunk {cid.hex()} is not in {self.location}", cid.hex())
            verify(cid, data, self.location)
            yield cid, data

    def put_many(self, items: Iterable[tuple[ChunkId, Payload]]) -> int:
        self._ensure_open()
        batch: dict[ChunkId, bytes] = {}
        for cid, data in items:
            verify(cid, data, "put")
            batch[cid] = bytes(data)
        with self._lock:
            new = [c for c in batch if c not in self._chunks]
            for c in new:
                self._chunks[c] = batch[c]
        return len(new)

    def iter_ids(self) -> Iterator[ChunkId]:
        self._ensure_open()
        with self._lock:
            ids = list(self._chunks)
        return iter(ids)

    def delete_many(self, ids: Iterable[ChunkId]) -> int:
        self._ensure_open()
        with self._lock:
            return sum(self._chunks.pop(c, None) is not None for c in set(ids))
