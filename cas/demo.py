"""The cas round trip, end to end on a generated checkpoint-like tree (``cas demo``).

An origin tree is snapshotted and its chunks stored; a receiver syncs from the store; the
origin then changes a little (scattered edits, a 100-byte insert, a new file) and the
receiver syncs again, moving only what changed. Every step is checked, not just printed.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .manifest import Manifest
from .repository import Repository
from .workspace import Workspace

MiB = 1 << 20


def _write_checkpoint(root: Path, size: int, rng: random.Random) -> None:
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "weights.bin").write_bytes(rng.randbytes(size))
    (root / "checkpoints" / "optimizer.bin").write_bytes(rng.randbytes(size // 2))
    (root / "config.json").write_text('{"lr": 0.001, "layers": 12}\n')


def _edit(root: Path, rng: random.Random) -> None:
    w = root / "checkpoints" / "weights.bin"
    data = bytearray(w.read_bytes())
    for _ in range(10):  # scattered in-place edits, ~1 % of the file in all
        at = rng.randrange(len(data) - 4096)
        data[at : at + len(data) // 1000] = rng.randbytes(len(data) // 1000)
    w.write_bytes(data)
    o = root / "checkpoints" / "optimizer.bin"
    opt = o.read_bytes()
    mid = len(opt) // 2
    o.write_bytes(opt[:mid] + b"x" * 100 + opt[mid:])  # a 100-byte insert
    (root / "checkpoints" / "step.txt").write_text("1000\n")


def _publish(ws: Workspace, repo: Repository, root: Path) -> Manifest:
    """Snapshot ``root`` and store its chunks, as ``cas push`` does (never a manifest naming
    a chunk that was skipped because its file changed meanwhile)."""
    pushed = repo.push("demo", root, ws)
    assert pushed is not None  # missing_ok is off: a missing root raised
    return pushed.manifest


def run(size: int = 64 * MiB, out: Callable[[str], None] = print, seed: int = 7) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="cas-demo-") as tmp:
        base = Path(tmp)
        origin, receiver = base / "origin" / "outputs", base / "receiver" / "outputs"
        _write_checkpoint(origin, size, rng)
        with Workspace(base / "origin" / ".cas") as ows, Workspace(base / "receiver" / ".cas") as rws, \
                Repository.open(base / "store") as repo:
            for label, change in (("first sync", None), ("after edits", _edit)):
                if change is not None:
                    change(origin, rng)
                t = time.perf_counter()
                m = _publish(ows, repo, origin)
                t_pub = time.perf_counter() - t
                r = rws.sync(m, receiver, remote=repo.chunks)
                if rws.snapshot(receiver).id != m.id:
                    raise SystemExit(f"demo failed: receiver differs from origin after {label}")
                out(
                    f"{label:12s} tree {m.total_size / MiB:7.1f} MiB in {r.files} files | "
                    f"moved {r.chunks_fetched:4d} chunks, {r.bytes_fetched / MiB:6.2f} MiB "
                    f"({100 * r.bytes_fetched / max(1, m.total_size):5.1f} %) | "
                    f"reused {r.chunks_reused:4d} | publish {t_pub:.2f} s, sync {r.seconds:.2f} s | "
                    f"manifest {m.id.hex()[:16]} verified"
                )
