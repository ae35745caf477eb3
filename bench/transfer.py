"""First get, re-get and scattered edits of one large file between two works, next to cp+fsync.

    python -m bench.transfer [--size-gib 1] [--dir DIR]

Measured through the public API (an App with an origin and two consumer works); consumers
report ``last_transfer`` of each get. The first get includes the origin's first snapshot of
the file (read + chunk + hash); the second consumer's first get finds the origin's stat
cache warm, as it is after any run of the origin (persisting snapshots every Path). ``cp`` + ``sync FILE`` of the same file in the same
run is the floor for a first copy. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path as FsPath

from pathapi import App, Flow, Path, Work

GiB = 1 << 30


class Origin(Work):
    def __init__(self) -> None:
        super().__init__()
        self.data = "lit://data"

    def run(self, edits: int = 0, seed: int = 0) -> None:
        """Overwrite ``edits`` regions spread over the file, 1 % of it in all."""
        f = os.path.join(self.data, "weights.bin")
        size = os.path.getsize(f)
        rng = random.Random(seed)
        region = size // 100 // max(1, edits)
        with open(f, "r+b") as fh:
            for i in range(edits):
                fh.seek(i * (size // edits) + rng.randrange(size // edits - region))
                fh.write(rng.randbytes(region))


class Consumer(Work):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, object]] = []

    def run(self, data: Path) -> None:
        # The Path arrives already fetched (Paths among run's arguments are got before run starts).
        self.records.append(dict(vars(data.last_transfer)))


class Bench(Flow):
    """Each get is bracketed by a ``cp`` + ``sync`` of the same file, with the disk settled
    in between: this VM's disk speed swings by 3x with its recent history, so a ratio is
    only meaningful against copies made right next to it."""

    def __init__(self, src: str, scratch: str) -> None:
        super().__init__()
        self.origin = Origin()
        self.consumer = Consumer()
        self.second = Consumer()
        self.src = src
        self.scratch = scratch
        self.copies: list[float] = []

    def _cp(self) -> None:
        _settle()
        dst = os.path.join(self.scratch, "copy.bin")
        self.copies.append(cp_fsync(self.src, dst))
        os.unlink(dst)
        _settle()

        self.rsync: dict[str, float] = {}

    def _rsync(self, label: str) -> None:
        """rsync local to local with its delta algorithm forced on (--no-whole-file), then
        sync: the peer a user would pick for moving a changed file."""
        _settle()
        dst = os.path.join(self.scratch, "rsync")
        os.makedirs(dst, exist_ok=True)
        t = time.perf_counter()
        subprocess.run(["rsync", "--no-whole-file", self.src, dst + "/"], check=True)
        subprocess.run(["sync", os.path.join(dst, os.path.basename(self.src))], check=True)
        self.rsync[label] = time.perf_counter() - t
        _settle()

    def run(self) -> None:
        self._cp()
        self.consumer.run(self.origin.data)  # first get: the origin has never read the file
        self._cp()
        self.second.run(self.origin.data)  # first get of another work: the origin's stat cache is warm
        self._cp()
        self._rsync("first")
        self.consumer.run(self.origin.data)  # unchanged re-get
        self.origin.run(edits=100)
        _settle()
        self.consumer.run(self.origin.data)  # 1 % scattered edits
        self._rsync("edits")


def _settle() -> None:
    os.sync()
    time.sleep(2)


def cp_fsync(src: str, dst: str) -> float:
    t = time.perf_counter()
    subprocess.run(["cp", "--reflink=never", src, dst], check=True)
    subprocess.run(["sync", dst], check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    base = FsPath(tempfile.mkdtemp(prefix="bench-transfer-", dir=args.dir))
    data = base / "app" / "works" / "root.origin" / "data"
    data.mkdir(parents=True)
    src = data / "weights.bin"
    size = int(args.size_gib * GiB)
    with open(src, "wb") as f:  # random bytes throughout: no chunk repeats, nothing dedups
        for i in range(0, size, 64 << 20):
            f.write(os.urandom(min(64 << 20, size - i)))
    os.sync()
    old = time.time() - 60
    os.utime(src, (old, old))
    flow = Bench(str(src), str(base))
    App(flow, root=base / "app").run()
    first, reget, edits = flow.consumer.records
    (warm,) = flow.second.records
    c0, c1, c2 = flow.copies
    out = {
        "size_bytes": size,
        "cp_fsync_s": flow.copies,
        "first_get_s": first["seconds"],
        "first_get_vs_cp": first["seconds"] / ((c0 + c1) / 2),
        "first_get_warm_origin_s": warm["seconds"],
        "first_get_warm_origin_vs_cp": warm["seconds"] / ((c1 + c2) / 2),
        "reget_s": reget["seconds"],
        "reget_bytes": reget["bytes_transferred"],
        "reget_vs_first": reget["seconds"] / first["seconds"],
        "edits_s": edits["seconds"],
        "edits_bytes_pct": 100 * edits["bytes_transferred"] / size,
        "rsync_first_s": flow.rsync["first"],
        "rsync_edits_s": flow.rsync["edits"],
        "first_get_vs_rsync": first["seconds"] / flow.rsync["first"],
        "edits_vs_rsync": edits["seconds"] / flow.rsync["edits"],
        "records": flow.consumer.records + flow.second.records,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
