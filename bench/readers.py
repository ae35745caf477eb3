"""``python -m bench.readers``: what the new-inode default of a sync costs, next to its peers.

A file of ``--size-mib`` MiB with about 1 % changed (one random 100 kB patch per 10 MB) is
synced by ``Workspace.sync`` into a copy of the old version, alternately:

- the default: the changed file becomes a new inode (readers of the old one keep it), its
  unchanged ranges copied from the old file in the kernel;
- ``in_place=True``: the changed ranges are written into the file itself;
- the peer: ``cp --reflink=auto`` of the whole new file next to the old one and a rename
  (what any tool that replaces a file whole pays), timed with the same fsync.

Prints one JSON line per repeat and the ratios of the medians. Not a test: nothing here
asserts a goal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time

from cas.chunking import iter_chunk_spans
from cas.store.memory import MemoryChunkStore
from cas.workspace import Workspace


def _publish(ws: Workspace, store: MemoryChunkStore, root: str):  # type: ignore[no-untyped-def]
    m = ws.snapshot(root)
    for e in m.files():
        with open(os.path.join(root, e.path) if e.path else root, "rb") as f:
            data = f.read()
        store.put_many((cid, data[off:off + n]) for cid, off, n in iter_chunk_spans(e.chunks))
    return m


def _timed_cp(src: str, dest: str) -> float:
    t0 = time.perf_counter()
    tmp = dest + ".tmp"
    subprocess.run(["cp", "--reflink=auto", src, tmp], check=True)
    fd = os.open(tmp, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    os.replace(tmp, dest)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.readers")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to work (default: a temporary folder)")
    args = ap.parse_args(argv)
    base = tempfile.mkdtemp(prefix="bench-readers-", dir=args.dir)
    rnd = random.Random(1)
    size = args.size_mib << 20
    times: dict[str, list[float]] = {"new-inode": [], "in-place": [], "cp": []}
    try:
        origin = os.path.join(base, "origin")
        os.makedirs(origin)
        old = bytearray(os.urandom(size))
        with open(os.path.join(origin, "ckpt.bin"), "wb") as f:
            f.write(old)
        ows = Workspace(os.path.join(base, "ostate"))
        store = MemoryChunkStore()
        m_old = _publish(ows, store, origin)
        for i in range(args.repeat):
            new = bytearray(old)
            for _ in range(max(1, size // (100_000 * 100))):
                at = rnd.randrange(0, size - 100_000)
                new[at:at + 100_000] = os.urandom(100_000)
            with open(os.path.join(origin, "ckpt.bin"), "r+b") as f:
                f.write(new)
            m_new = _publish(ows, store, origin)
            for mode in ("new-inode", "in-place"):
                dest = os.path.join(base, f"dest-{mode}-{i}")
                rws = Workspace(os.path.join(base, f"rstate-{mode}-{i}"))
                try:
                    rws.sync(m_old, dest, remote=store)
                    os.sync()
                    t0 = time.perf_counter()
                    r = rws.sync(m_new, dest, remote=store, in_place=mode == "in-place")
                    times[mode].append(time.perf_counter() - t0)
                    print(json.dumps({"repeat": i, "mode": mode, "seconds": round(times[mode][-1], 3),
                                      "fetched_mib": round(r.bytes_fetched / 2**20, 1)}))
                finally:
                    rws.close()
                    shutil.rmtree(dest, ignore_errors=True)
            peer = os.path.join(base, "peer.bin")
            shutil.copyfile(os.path.join(origin, "ckpt.bin"), peer)
            os.sync()
            times["cp"].append(_timed_cp(os.path.join(origin, "ckpt.bin"), peer))
            print(json.dumps({"repeat": i, "mode": "cp --reflink=auto + fsync + rename", "seconds": round(times["cp"][-1], 3)}))
            with open(os.path.join(origin, "ckpt.bin"), "r+b") as f:
                f.write(old)
            m_old = _publish(ows, store, origin)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({"median_seconds": {k: round(v, 3) for k, v in med.items()},
                          "new_inode_vs_cp": round(med["new-inode"] / med["cp"], 2),
                          "new_inode_vs_in_place": round(med["new-inode"] / med["in-place"], 2)}))
        ows.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
