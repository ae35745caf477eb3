"""A child process that writes a LocalChunkStore, for the crash and two-writer tests.

Run as a script (never collected by pytest)::

    python chunkstore_writer.py crash <root> <seed> <pack_limit>
        Put batches in an endless loop until killed. After each ``put_many`` returns, print
        ``batch <id hex>... end`` (flushed): those chunks are promised to be durable.
        Every few batches, put and then delete a scratch batch (never reported), so kills
        also land inside deletes.

    python chunkstore_writer.py race <root> <pool_seed> <order_seed>
        Print ``ready``, wait for a line on stdin, then put a pool of chunks (the same pool
        for the same pool_seed) in batches of a random order that overlap each other; print
        ``added <n> <id hex>...`` after each batch, then ``done``.

Output lines are whole ``print`` calls, flushed at once, so a killed child leaves at worst
one unterminated line, which the reader ignores (it lacks the trailing ``end``).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cas.hashing import ChunkId, chunk_id  # noqa: E402
from cas.store import LocalChunkStore  # noqa: E402


def payload(rng: random.Random) -> bytes:
    """One chunk: mostly small, some large (so kills land mid-write), half compressible."""
    size = rng.choice([0, 1, rng.randint(2, 4096), rng.randint(4096, 64 << 10), rng.randint(64 << 10, 384 << 10)])
    if rng.random() < 0.5:
        unit = rng.randbytes(rng.randint(1, 16))
        return (unit * (size // len(unit) + 1))[:size]
    return rng.randbytes(size)


def common(k: int) -> bytes:
    """Chunk ``k`` of a pool every child shares, so children re-put chunks already stored."""
    return random.Random(1_000_000 + k).randbytes(100 + 997 * k)


def crash(root: str, seed: int, pack_limit: int) -> None:
    rng = random.Random(seed)
    store = LocalChunkStore(root, pack_limit=pack_limit)
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        batch: list[tuple[ChunkId, bytes]] = []
        for _ in range(rng.randint(1, 12)):
            data = common(rng.randrange(40)) if rng.random() < 0.25 else payload(rng)
            batch.append((chunk_id(data), data))
        store.put_many(batch)
        print("batch", *(cid.hex() for cid, _ in batch), "end", flush=True)
        if n % 4 == 0:
            scratch = [rng.randbytes(rng.randint(1, 20_000)) + b"scratch" for _ in range(rng.randint(1, 5))]
            ids = [chunk_id(d) for d in scratch]
            store.put_many(zip(ids, scratch))
            store.delete_many(ids)


def race(root: str, pool_seed: int, order_seed: int) -> None:
    pool_rng = random.Random(pool_seed)
    pool = [payload(pool_rng) for _ in range(150)]
    items = [(chunk_id(d), d) for d in pool]
    rng = random.Random(order_seed)
    rng.shuffle(items)
    print("ready", flush=True)
    sys.stdin.readline()
    with LocalChunkStore(root, pack_limit=256 << 10) as store:
        i = 0
        while i < len(items):
            n = rng.randint(1, 10)
            batch = items[i : i + n] + rng.sample(items, 3)
            added = store.put_many(batch)
            print("added", added, *(cid.hex() for cid, _ in batch), flush=True)
            i += n
    print("done", flush=True)


if __name__ == "__main__":
    mode, root, a, b = sys.argv[1:5]
    if mode == "crash":
        crash(root, int(a), int(b))
    elif mode == "race":
        race(root, int(a), int(b))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
