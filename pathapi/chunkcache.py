"""The origin's cache of recently served chunks, so that consumers getting the same files at
once make the origin read each chunk from disk once.

Without it, eight works getting one checkpoint make the origin read, hash and compress
every chunk eight times: the disk (or page cache) and one core do 8x the work, while the
bytes are the same. Entries are chunk *frames* as they go on the wire: already verified
against their id and already compressed (codec, plain length, payload), so a hit costs a
dict lookup.

Safety: the cache is keyed by chunk id, and a chunk id names content (BLAKE3 of the bytes),
so a cached frame is right for every manifest that names that id, whatever happened to the
file it was read from; a frame enters only after its bytes verified. A file that changed
since its manifest is still answered "stale" whenever its bytes must be read.

Bounded by bytes (payload sizes), least recently used out first. Loads are *single-flight*:
a request for a chunk that another thread is reading waits for that read instead of reading
it again (what makes concurrent consumers read once, not "once per request in flight").
"""

from __future__ import annotations

import asyncio
import heapq
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

#: Per-entry bookkeeping counted against the bound besides the payload (dict slot, tuple, key).
ENTRY_OVERHEAD = 200


@dataclass(frozen=True)
class Frame:
    """A verified chunk, encoded for the wire."""

    codec: int
    raw_len: int
    payload: bytes


class FrameCache:
    """A bytes-bounded LRU of :class:`Frame` by chunk id, with single-flight loading.

    ``max_bytes == 0`` disables caching (single-flight still applies).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self._lru: OrderedDict[bytes, Frame] = OrderedDict()
        self._loading: dict[bytes, Future[Frame | None]] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0  # loads this cache ran
        self.joined = 0  # requests that waited for another thread's load
        self.evictions = 0

    def get_or_load(self, cid: bytes, load: Callable[[], Frame | None]) -> Frame | None:
        """The frame of ``cid``: cached, or being loaded by another thread (waited for), or
        loaded now by ``load``. ``load`` returns None when the bytes no longer verify (the
        file changed): that is not cached, and a waiter then runs its own ``load`` (it may
        read another place)."""
        with self._lock:
            frame = self._lru.get(cid)
            if frame is not None:
                self._lru.move_to_end(cid)
                self.hits += 1
                return frame
            fut = self._loading.get(cid)
            if fut is None:
                fut = self._loading[cid] = Future()
                mine = True
                self.misses += 1
            else:
                mine = False
                self.joined += 1
        if not mine:
            got = fut.result()
            return got if got is not None else load()
        try:
            frame = load()
        except BaseException as e:
            with self._lock:
                del self._loading[cid]
            fut.set_exception(e)
            raise
        with self._lock:
            del self._loading[cid]
            if frame is not None:
                self._put(cid, frame)
        fut.set_result(frame)
        return frame

    def _put(self, cid: bytes, frame: Frame) -> None:
        cost = len(frame.payload) + ENTRY_OVERHEAD
        if cost > self.max_bytes or cid in self._lru:
            return
        self._lru[cid] = frame
        self.bytes += cost
        while self.bytes > self.max_bytes:
            _, old = self._lru.popitem(last=False)
            self.bytes -= len(old.payload) + ENTRY_OVERHEAD
            self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "max_bytes": self.max_bytes, "bytes": self.bytes, "entries": len(self._lru), "hits": self.hits,
                "misses": self.misses, "joined": self.joined, "evictions": self.evictions,
            }


class PriorityGate:
    """At most ``slots`` holders at once; waiters are admitted lowest ``priority`` first
    (ties in arrival order). The origin gives a chunk answer the position in the file of
    its first chunk: when consumers of one checkpoint queue up, the one furthest behind is
    served first, so none runs further ahead of the others than the frame cache holds, and
    the followers keep being served from memory. For use on one asyncio loop."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._busy = 0
        self._seq = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []

    async def acquire(self, priority: int) -> None:
        if self._busy < self.slots and not self._waiting:
            self._busy += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._waiting, (priority, self._seq, fut))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # admitted and cancelled at once: hand the slot on
            else:
                self._waiting = [w for w in self._waiting if w[2] is not fut]
                heapq.heapify(self._waiting)
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():
                fut.set_result(None)  # the slot passes to it: _busy unchanged
                return
        self._busy -= 1
