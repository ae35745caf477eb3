"""Per-file costs of the cas stages a get of a many-small-files Path goes through, in CPU
seconds (``time.process_time``, best of ``--repeat``; the machine is shared, CPU time is
steadier than wall time). Used to find and check the fixes of issue 7 ("Load"):

    /work/venv/bin/python tests/_load_profile.py --files 100000 [--dir DIR] [--keep]

The tree (``--files`` files of 1 B..16 KiB in folders of 1000, like those tests/test_load.py
makes) is made once under ``--dir`` and reused with ``--keep``. Stages:

- ``snapshot_cold``: a snapshot with an empty stat cache (every file read and hashed);
- ``snapshot_warm``: the same tree again (stat cache hits: one lstat + one lookup per file);
- ``snapshot_receiver``: the receiver's view (``foreign=[]``), as ``Workspace.sync`` takes it;
- ``encode`` / ``decode``: the manifest's encoding, and parsing + validating it;
- ``seed``: indexing the receiver's files as a chunk source;
- ``plan``: ``plan_update`` between two manifests that differ in 1 % of the files;
- ``chunk_sizes``: the id -> length map a transfer plans with.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cas import Manifest, SeedSource
from cas.chunking import Chunker
from cas.plan import plan_update
from cas.snapshot import snapshot
from cas.statcache import StatCache


def make_tree(root: str, files: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    for i in range(files):
        d = os.path.join(root, f"d{i // 1000:03d}")
        if i % 1000 == 0:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:06d}.bin"), "wb") as f:
            f.write(rng.randbytes(rng.randrange(1, 16 << 10)))
    old = time.time() - 3600
    for dirpath, _, names in os.walk(root):
        for n in names:
            os.utime(os.path.join(dirpath, n), (old, old))


def best(fn, repeat: int) -> tuple[float, object]:
    t_best, out = float("inf"), None
    for _ in range(repeat):
        t = time.process_time()
        out = fn()
        t_best = min(t_best, time.process_time() - t)
    return t_best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "pathapi-load-profile"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the tree for the next run")
    a = ap.parse_args()
    tree = os.path.join(a.dir, f"tree{a.files}")
    if not os.path.isdir(tree):
        make_tree(tree + ".tmp", a.files)
        os.rename(tree + ".tmp", tree)
    state = tempfile.mkdtemp(dir=a.dir, prefix="state-")
    out: dict[str, float] = {}
    try:
        with Chunker() as chunker:
            def cold() -> Manifest:
                with StatCache(tempfile.mkdtemp(dir=state)) as cache:
                    return snapshot(tree, chunker, cache)

            out["snapshot_cold"], m = best(cold, 1)
            cache = StatCache(os.path.join(state, "warm"))
            snapshot(tree, chunker, cache)
            out["snapshot_warm"], m = best(lambda: snapshot(tree, chunker, cache), a.repeat)
            out["snapshot_receiver"], _ = best(lambda: snapshot(tree, chunker, cache, foreign=[]), a.repeat)
            cache.close()
        assert isinstance(m, Manifest)
        data = m.encode()
        out["encode"], _ = best(lambda: Manifest.build(m.params, m.root_kind, list(m.entries)), a.repeat)
        out["decode"], _ = best(lambda: Manifest.decode(data), a.repeat)
        out["seed"], _ = best(lambda: SeedSource(m, tree), a.repeat)
        rng = random.Random(2)
        files = [e for e in m.entries if e.chunks]
        changed = {e.path for e in rng.sample(files, len(files) // 100)}
        other = Manifest.build(m.params, m.root_kind, [
            type(e)(e.path, e.kind, e.executable, e.size, bytes([e.chunks[0] ^ 1]) + e.chunks[1:] if e.path in changed else e.chunks, e.target)
            for e in m.entries
        ])
        out["plan"], _ = best(lambda: plan_update(m, other), a.repeat)
        out["chunk_sizes"], _ = best(m.chunk_sizes, a.repeat)
    finally:
        shutil.rmtree(state)
        if not a.keep:
            shutil.rmtree(tree)
    print(json.dumps({"files": a.files, "cpu_seconds": {k: round(v, 3) for k, v in out.items()}}, indent=1))


if __name__ == "__main__":
    main()
