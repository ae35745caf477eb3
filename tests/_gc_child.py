"""A child process for tests/test_gc.py (run as a script, never collected by pytest).

    python _gc_child.py lease <leases dir> <shared|exclusive>
        Take a lease, print ``held``, and hold it until stdin closes (or the process is killed).

    python _gc_child.py persist <app root> <tree dir> <versions> <seed> [<store url>]
        Write ``versions`` successive versions of a small tree and persist each as
        ``writer/tree`` into the artifact store (the app root's, or the URL's: S3 reads the
        AWS environment variables); print ``persisted <i> <manifest id>`` after each, then
        ``done``.

    python _gc_child.py s3lease <store url> <shared|exclusive>
        As ``lease``, in the leases of an S3 artifact store.

Output lines are whole ``print`` calls, flushed at once.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cas.leases import Leases
from cas.store import LocalRefStore
from cas.workspace import Workspace
from pathapi.artifacts import ArtifactStore
from pathapi.version import Version


def write_version(tree: Path, rng: random.Random) -> None:
    """Rewrite the tree: some files kept, some replaced, some new (temp + rename each)."""
    tree.mkdir(parents=True, exist_ok=True)
    for k in range(6):
        if rng.random() < 0.5:
            continue
        target = tree / f"f{k}.bin"
        tmp = tree / f".f{k}.tmp"
        tmp.write_bytes(rng.randbytes(rng.choice([100, 70_000, 300_000, 900_000])))
        os.replace(tmp, target)


def main() -> None:
    mode = sys.argv[1]
    if mode in ("lease", "s3lease"):
        if mode == "lease":
            leases = Leases(LocalRefStore(sys.argv[2]))
        else:
            leases = ArtifactStore.open(sys.argv[2], ".").leases
        hold = leases.shared("test holder") if sys.argv[3] == "shared" else leases.exclusive("test holder")
        with hold:
            print("held", flush=True)
            sys.stdin.read()
        return
    if mode == "persist":
        app_root, tree, versions, seed = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        rng = random.Random(seed)
        store = ArtifactStore.open(sys.argv[6] if len(sys.argv) > 6 else None, app_root)
        with Workspace(app_root / "ws") as ws:
            for i in range(versions):
                write_version(tree, rng)
                m = store.persist("writer", "tree", str(tree), ws, version=Version(1, 1, Version.ENDED))
                assert m is not None
                print(f"persisted {i} {m.id.hex()}", flush=True)
        store.close()
        print("done", flush=True)
        return
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
