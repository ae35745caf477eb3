"""The origin's frame cache (pathapi/chunkcache.py): consumers getting the same files at once
make the origin read each chunk from disk once, with memory bounded and verification kept.

The cache alone is checked with threads (single-flight, bound, LRU order, failures); the
origin with it over real HTTP on loopback, its consumers as threads and as spawned
processes, the chunk reads counted by the service and by ``GET /v1/stats``.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import os
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from trees import File, write_tree

from cas import Manifest
from cas.chunking import iter_chunk_spans
from cas.hashing import chunk_id
from cas.workspace import Workspace
from pathapi.aio import io_loop
from pathapi.chunkcache import ENTRY_OVERHEAD, Frame, FrameCache
from pathapi.wire.client import OriginClient, OriginSource
from pathapi.errors import StaleManifestError
from pathapi.wire.origin import OriginService

MiB = 1 << 20
NAME = "root.source"

pytestmark = pytest.mark.usefixtures("close_client_sessions")


# -- the cache alone ---------------------------------------------------------------------------
def frame(n: int, tag: int = 0) -> Frame:
    return Frame(0, n, bytes([tag % 256]) * n)


def test_concurrent_requests_for_one_chunk_run_one_load() -> None:
    cache = FrameCache(16 * MiB)
    calls = 0
    gate = threading.Event()

    def load() -> Frame:
        nonlocal calls
        calls += 1
        gate.wait(5)  # every other thread arrives while this read is in progress
        return frame(1000)

    results: list[Frame | None] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_load(b"a" * 32, load))) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while cache.stats()["joined"] < 7 and time.monotonic() < deadline:
        time.sleep(0.001)
    gate.set()
    for t in threads:
        t.join()
    assert calls == 1
    assert len(results) == 8 and all(r == frame(1000) for r in results)
    assert cache.stats()["misses"] == 1 and cache.stats()["joined"] == 7


def test_the_cache_never_holds_more_than_its_bound_and_drops_the_least_recently_used() -> None:
    size = 1000
    cache = FrameCache(3 * (size + ENTRY_OVERHEAD))
    for i in range(3):
        cache.get_or_load(bytes([i]) * 32, lambda i=i: frame(size, i))
    cache.get_or_load(bytes([0]) * 32, lambda: pytest.fail("a cached frame was read again"))  # 0 is now recent
    cache.get_or_load(bytes([3]) * 32, lambda: frame(size, 3))  # evicts 1, the least recently used
    assert cache.bytes <= cache.max_bytes
    for i in (0, 2, 3):  # still held: served without a load
        cache.get_or_load(bytes([i]) * 32, lambda: pytest.fail("a cached frame was read again"))
    loaded: list[int] = []
    cache.get_or_load(bytes([1]) * 32, lambda: loaded.append(1) or frame(size, 1))  # type: ignore[func-returns-value]
    assert loaded == [1]
    assert cache.stats()["evictions"] >= 1


def test_a_frame_larger_than_the_bound_is_served_but_not_kept() -> None:
    cache = FrameCache(1000)
    assert cache.get_or_load(b"b" * 32, lambda: frame(5000)) == frame(5000)
    assert cache.stats()["entries"] == 0 and cache.bytes == 0


def test_a_chunk_that_no_longer_verifies_is_not_cached_and_each_waiter_reads_for_itself() -> None:
    cache = FrameCache(MiB)
    assert cache.get_or_load(b"c" * 32, lambda: None) is None
    assert cache.stats()["entries"] == 0
    assert cache.get_or_load(b"c" * 32, lambda: frame(10)) == frame(10)  # read again, now good


def test_a_load_that_raises_reaches_every_waiter_and_is_retried_later() -> None:
    cache = FrameCache(MiB)
    with pytest.raises(OSError):
        cache.get_or_load(b"d" * 32, lambda: (_ for _ in ()).throw(OSError("disk")))  # type: ignore[arg-type, return-value]
    assert cache.get_or_load(b"d" * 32, lambda: frame(10)) == frame(10)


# -- the origin with the cache, over HTTP ------------------------------------------------------
class Served:
    def __init__(self, tmp: Path, cache_bytes: int) -> None:
        self.root = tmp / "works" / NAME
        self.root.mkdir(parents=True)
        self.workspace = Workspace(tmp / "state" / NAME)
        self.secret = secrets.token_urlsafe(32)
        self.service = OriginService(NAME, str(self.root), self.secret, self.workspace, cache_bytes=cache_bytes)
        self.url = io_loop().run(self.service.start(), timeout=30)

    def client(self) -> OriginClient:
        return OriginClient(NAME, self.url, self.secret, 30.0)

    def stats(self, secret: str | None = None) -> tuple[int, dict[str, object]]:
        u = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)  # type: ignore[arg-type]
        try:
            conn.request("GET", "/v1/stats", headers={
                "Authorization": f"Bearer {self.secret if secret is None else secret}", "X-Pathapi-Protocol": "1"})
            r = conn.getresponse()
            body = r.read()
            return r.status, (json.loads(body) if r.status == 200 else {})
        finally:
            conn.close()

    def close(self) -> None:
        io_loop().run(self.service.stop(), timeout=30)
        self.workspace.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path, 64 * MiB)
    try:
        yield s
    finally:
        s.close()


def write_checkpoint(root: Path, size: int) -> bytes:
    """``root/ckpt`` of two files holding ``size`` random bytes in all; those bytes."""
    data = os.urandom(size)
    write_tree(root / "ckpt", {"weights.bin": File(data[: size // 2]), "optim.bin": File(data[size // 2 :])})
    return data


def fetch_all(client: OriginClient, m: Manifest) -> dict[bytes, bytes]:
    return {cid: bytes(b) for cid, b in OriginSource(client, m).get_many(sorted(m.chunk_ids()))}


def test_eight_consumers_at_once_make_the_origin_read_each_chunk_once(served: Served) -> None:
    write_checkpoint(served.root, 24 * MiB)
    m = served.client().manifest("ckpt")
    assert m is not None and len(m.chunk_ids()) > 20
    got: list[dict[bytes, bytes]] = []
    threads = [threading.Thread(target=lambda: got.append(fetch_all(served.client(), m))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8
    for g in got:
        assert set(g) == m.chunk_ids() and all(chunk_id(b) == cid for cid, b in g.items())
    assert served.service.chunks_read == len(m.chunk_ids())
    status, stats = served.stats()
    assert status == 200 and stats["chunks_read"] == len(m.chunk_ids())
    assert stats["bytes_read"] == m.total_size


def _consumer_process(url: str, secret: str, manifest: bytes, out: mp.Queue) -> None:  # type: ignore[type-arg]
    m = Manifest.decode(manifest)
    client = OriginClient(NAME, url, secret, 30.0)
    got = fetch_all(client, m)
    out.put(sorted(cid for cid, b in got.items() if chunk_id(b) == cid) == sorted(m.chunk_ids()))


def test_consumer_processes_at_once_read_each_chunk_once(served: Served) -> None:
    write_checkpoint(served.root, 16 * MiB)
    m = served.client().manifest("ckpt")
    assert m is not None
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_consumer_process, args=(served.url, served.secret, m.encode(), q)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == [True] * 4
    assert served.service.chunks_read == len(m.chunk_ids())


def test_the_cache_stays_within_its_bound_while_serving_more_than_it_holds(tmp_path: Path) -> None:
    s = Served(tmp_path, 2 * MiB)
    try:
        write_checkpoint(s.root, 12 * MiB)
        m = s.client().manifest("ckpt")
        assert m is not None
        fetch_all(s.client(), m)
        fetch_all(s.client(), m)
        stats = s.service.cache.stats()
        assert stats["bytes"] <= 2 * MiB and stats["evictions"] > 0
        # Evicted chunks are read again: the count says how well the bound fits the traffic.
        assert s.service.chunks_read > len(m.chunk_ids())
    finally:
        s.close()


def test_a_changed_file_still_answers_stale_for_chunks_it_must_read(served: Served) -> None:
    write_checkpoint(served.root, 8 * MiB)
    client = served.client()
    m = client.manifest("ckpt")
    assert m is not None
    entry = m.by_path["weights.bin"]
    first, *rest = [cid for cid, _, _ in iter_chunk_spans(entry.chunks)]
    got = dict(OriginSource(client, m).get_many([first]))  # now cached, verified
    assert chunk_id(bytes(got[first])) == first
    with open(served.root / "ckpt" / "weights.bin", "r+b") as f:  # rewritten in place after the manifest
        f.write(os.urandom(entry.size))
    # The cached chunk is still exactly the bytes its id names: served, and it verifies.
    again = dict(OriginSource(client, m).get_many([first]))
    assert chunk_id(bytes(again[first])) == first
    # Every chunk that must be read from the changed file is refused: never torn.
    with pytest.raises(StaleManifestError):
        list(OriginSource(client, m).get_many(rest))
    # A new manifest describes the new bytes and is served whole.
    m2 = client.manifest("ckpt")
    assert m2 is not None and m2.id != m.id
    got2 = fetch_all(client, m2)
    assert b"".join(got2[c] for c, _, _ in iter_chunk_spans(m2.by_path["weights.bin"].chunks)) == \
        (served.root / "ckpt" / "weights.bin").read_bytes()


def test_stats_need_the_app_secret(served: Served) -> None:
    status, body = served.stats(secret="wrong")
    assert status == 401 and body == {}


def test_the_answer_gate_admits_the_furthest_behind_first_and_never_more_than_its_slots() -> None:
    """Consumers of one checkpoint that queue at the origin are served lowest place in the
    file first (the one furthest behind catches up on cached chunks), at most ``slots`` at once."""
    import asyncio

    from pathapi.chunkcache import PriorityGate

    async def scenario() -> tuple[list[int], int]:
        gate = PriorityGate(2)
        order: list[int] = []
        busy = peak = 0
        release = asyncio.Event()

        async def answer(rank: int) -> None:
            nonlocal busy, peak
            await gate.acquire(rank)
            try:
                busy += 1
                peak = max(peak, busy)
                order.append(rank)
                await release.wait()
                await asyncio.sleep(0)
            finally:
                busy -= 1
                gate.release()

        first = [asyncio.create_task(answer(r)) for r in (50, 60)]  # take both slots
        await asyncio.sleep(0.01)
        queued = [asyncio.create_task(answer(r)) for r in (900, 10, 400, 10)]
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*first, *queued)
        return order, peak

    order, peak = asyncio.run(scenario())
    assert order == [50, 60, 10, 10, 400, 900]
    assert peak <= 2


def test_a_cancelled_waiter_does_not_leak_a_slot() -> None:
    import asyncio

    from pathapi.chunkcache import PriorityGate

    async def scenario() -> bool:
        gate = PriorityGate(1)
        await gate.acquire(0)
        waiter = asyncio.create_task(gate.acquire(5))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        gate.release()
        await asyncio.wait_for(gate.acquire(1), 1)  # the slot is free again
        return True

    assert asyncio.run(scenario())
