"""The chunk store interface: a handful of batch methods, written against by everything above.

Batch calls let a remote store run many requests at once; a local one just loops. Every
implementation runs the same conformance suite, :mod:`cas.testing`, which is the real
specification of these methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol, runtime_checkable

from ..errors import StoreError
from ..hashing import ChunkId

Payload = bytes | bytearray | memoryview


class ChunkSource(Protocol):
    """Anything chunks can be read from: a store, the files of a tree (a seed), an origin."""

    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        """The subset of ``ids`` this source can deliver."""
        ...

    def get_many(self, ids: Iterable[ChunkId]) -> Iterator[tuple[ChunkId, Payload]]:
        """(id, plain bytes) for each of ``ids``, in any order, each verified against its id.

        Raises ChunkNotFoundError for an id the source does not hold, ChunkCorruptError
        for bytes that fail verification. Yielded buffers may be reused after the
        consumer advances the iterator: copy what must outlive one step.
        """
        ...


@runtime_checkable
class DeltaSource(Protocol):
    """A chunk source that can send a changed chunk as a block delta against bytes the
    receiver already holds where that chunk goes (``bases``: id -> (file, offset)). Its
    ``accepts_bases`` says whether it does so now (a wrapper may pass the question on)."""

    @property
    def accepts_bases(self) -> bool: ...

    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]: ...

    def get_many(self, ids: Iterable[ChunkId],
                 bases: Mapping[ChunkId, tuple[str, int]] | None = None) -> Iterator[tuple[ChunkId, Payload]]: ...


class Closable:
    """The closed state every store has, written once: ``close`` is idempotent and takes the
    store's lock (so it never pulls files from under a write in progress), and every method of
    a closed store raises StoreError saying so (an implementation calls :meth:`_ensure_open`
    first). A store that holds files or connections frees them in :meth:`_release`."""

    #: Where the store lives, for messages (a folder, a bucket URL).
    location: str = ""
    #: What the store holds, for messages ("chunk store", "ref store").
    kind: str = "store"
    _closed: bool = False
    #: Held by every call that changes the store; ``close`` takes it too. Stores with state
    #: to guard set their own lock here.
    _lock: AbstractContextManager[Any] = nullcontext()

    def _ensure_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.kind} {self.location} is closed", self.location)

    def _release(self) -> None:
        """Free the store's files and connections; called once, by the first ``close``."""

    def close(self) -> None:
        """Release files and connections; later calls of any method raise StoreError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


class ChunkStore(Closable, ABC):
    """A place where chunks rest, named by their id.

    Guarantees every implementation keeps (and the conformance suite checks):
    - ``put_many`` verifies each chunk it adds against its id (an id already present is
      skipped unread); on error nothing of the batch is added. After it returns, the chunks
      survive a crash of the process (durable).
    - ``get_many`` returns exactly the bytes that were put, verified again on the way out.
    - Puts are idempotent; a store opened after a writer was killed at any instant is
      consistent: every id it lists can be read back and verifies.
    """

    #: Whether ``delete_many`` removes chunks (a read-only mirror might not).
    supports_deletes: bool = True
    kind = "chunk store"

    @abstractmethod
    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        """The subset of ``ids`` present in the store."""

    @abstractmethod
    def get_many(self, ids: Iterable[ChunkId]) -> Iterator[tuple[ChunkId, Payload]]:
        """(id, plain bytes) of each id, verified; ChunkNotFoundError for an absent one."""

    @abstractmethod
    def put_many(self, items: Iterable[tuple[ChunkId, Payload]]) -> int:
        """Store chunks (verified, deduplicated); the number that were not present before."""

    @abstractmethod
    def iter_ids(self) -> Iterator[ChunkId]:
        """Every id in the store, each once, in no particular order."""

    @abstractmethod
    def delete_many(self, ids: Iterable[ChunkId]) -> int:
        """Remove chunks; the number that were present. Absent ids are ignored."""
