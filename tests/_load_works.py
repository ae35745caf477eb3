"""Works and the helpers they run, for tests/test_load.py (issue 7, "Load").

Kept apart from the test module so that each spawned work process (100 of them in one test)
imports only pathapi and this file, not pytest and the test module.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import tempfile
import time
from dataclasses import asdict
from typing import Any

from pathapi import Path, Work

KiB = 1 << 10
MiB = 1 << 20
#: The soft descriptor limit works run under (a common default).
FD_LIMIT = 1024


# -- helpers, used inside work processes (and by the tests) ------------------------------
def limit_descriptors(limit: int = FD_LIMIT) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(limit, hard) if hard != resource.RLIM_INFINITY else limit
    if soft != want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def proc_kib(key: str, pid: int | str = "self") -> int:
    """A ``VmRSS``/``VmHWM``-style figure of ``/proc/<pid>/status``, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak(pid: int | str = "self") -> bool:
    """Reset a process's ``VmHWM`` to its current RSS; False where the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_random_file(path: str, size: int, seed: int) -> None:
    """``size`` random bytes, written in 16 MiB blocks (the writer itself stays small)."""
    rng = random.Random(seed)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.writelines(rng.randbytes(min(16 * MiB, size - off)) for off in range(0, size, 16 * MiB))
    os.replace(tmp, path)


def tree_file(root: str, i: int) -> str:
    """Where file ``i`` of a generated tree lives: folders of 1000, every 4th one a level deeper."""
    folder = f"d{i // 1000:03d}" + ("/sub" if (i // 1000) % 4 == 3 else "")
    return os.path.join(root, folder, f"f{i:06d}.bin")


def write_small(path: str, rng: random.Random, i: int) -> int:
    size = 0 if i % 1009 == 0 else rng.randrange(64, 16 * KiB)  # 64 B at least: no two files alike
    with open(path, "wb") as f:
        f.write(rng.randbytes(size))
    if i % 97 == 0:
        os.chmod(path, 0o755)
    return size


def make_tree(root: str, files: int, seed: int) -> None:
    """``files`` files of 64 B to 16 KiB (every 97th executable, every 1009th empty), an
    empty folder and a link."""
    rng = random.Random(seed)
    for i in range(files):
        path = tree_file(root, i)
        if i % 1000 == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        write_small(path, rng, i)
    os.makedirs(os.path.join(root, "empty"), exist_ok=True)
    os.symlink("d000/f000001.bin", os.path.join(root, "link"))


def change_tree(root: str, files: int, seed: int) -> dict[str, int]:
    """Rewrite 1 % of the files (new random bytes), add 0.1 % new ones and remove 0.1 %.
    Returns how many chunks the changed tree holds that the old one did not: each rewritten
    or added non-empty file is one new chunk (16 KiB is below the minimum chunk size)."""
    rng = random.Random(seed)
    picked = rng.sample(range(files), files // 100 + files // 1000)
    rewrite, remove = picked[: files // 100], picked[files // 100 :]
    new_chunks = 0
    for i in rewrite:
        path = tree_file(root, i)
        tmp = path + ".tmp"
        new_chunks += write_small(tmp, rng, i + 1) > 0  # i + 1: empty files get bytes, exec bits move
        os.replace(tmp, path)
    for i in remove:
        os.unlink(tree_file(root, i))
    for i in range(files, files + files // 1000):
        path = tree_file(root, i)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        new_chunks += write_small(path, rng, i) > 0
    return {"rewritten": len(rewrite), "removed": len(remove), "added": files // 1000, "new_chunks": new_chunks}


def rewrite_some(root: str, seed: int, fraction: float = 0.01) -> int:
    """Rewrite ``fraction`` of the files under ``root`` with new random bytes (aside, then
    renamed over); the number of chunks the tree did not hold before."""
    rng = random.Random(seed)
    paths = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)
    paths = [p for p in paths if not os.path.islink(p)]
    new_chunks = 0
    for i, path in enumerate(rng.sample(paths, int(len(paths) * fraction))):
        tmp = path + ".tmp"
        new_chunks += write_small(tmp, rng, i + 1) > 0
        os.replace(tmp, path)
    return new_chunks


def arrive_and_wait(barrier: str, name: str, limit: float = 600.0) -> None:
    """Say "arrived" in ``barrier`` and wait for the flow's "go" (see :func:`release`)."""
    open(os.path.join(barrier, name), "w").close()
    go = os.path.join(barrier, ".go")
    deadline = time.monotonic() + limit
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: no go within {limit:g} s")
        time.sleep(0.005)


# -- works ----------------------------------------------------------------------------------
class Origin(Work):
    """Owns ``lit://shared`` (a file or a folder, as the test makes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = "lit://shared"
        self.pid = 0
        self.info: dict[str, Any] = {}

    def run(self, action: str, **kw: Any) -> None:
        limit_descriptors()
        self.pid = os.getpid()
        target = os.path.abspath(os.fspath(self.shared))
        if action == "file":
            write_random_file(target, kw["size"], kw["seed"])
        elif action == "tree":
            make_tree(target, kw["files"], kw["seed"])
            self.info = self._time_snapshots(target)
        elif action == "change":
            self.info = change_tree(target, kw["files"], kw["seed"])
        elif action == "rewrite":
            self.info = {"new_chunks": rewrite_some(target, kw["seed"])}

    @staticmethod
    def _time_snapshots(target: str) -> dict[str, Any]:
        """For information: a snapshot with an empty stat cache (every file read), then one
        with it filled, in a workspace of their own (the work's own is left alone)."""
        from cas.workspace import Workspace

        state = tempfile.mkdtemp(prefix="snapshot-state-", dir=".")
        try:
            reset_peak()
            rss = proc_kib("VmRSS")
            with Workspace(state) as ws:
                t0 = time.perf_counter()
                ws.snapshot(target)
                t1 = time.perf_counter()
                ws.snapshot(target)
                t2 = time.perf_counter()
            return {"snapshot_s": t1 - t0, "resnapshot_s": t2 - t1, "snapshot_rss_kib": rss,
                    "snapshot_peak_kib": proc_kib("VmHWM")}
        finally:
            shutil.rmtree(state)


class Consumer(Work):
    """Gets ``target`` when told (after the barrier, if given) and reports how it went."""

    def __init__(self) -> None:
        super().__init__(parallel=True)
        self.target: Path | None = None
        self.report: dict[str, Any] = {}

    def run(self, barrier: str | None = None) -> None:
        limit_descriptors()
        assert self.target is not None
        if barrier is not None:
            arrive_and_wait(barrier, str(self.name))
        reset = reset_peak()
        rss = proc_kib("VmRSS")
        t0 = time.monotonic()
        self.target.get(overwrite=True)
        t1 = time.monotonic()
        record = self.target.last_transfer
        assert record is not None
        self.report = {"start": t0, "end": t1, "rss_kib": rss, "peak_kib": proc_kib("VmHWM"),
                       "peak_reset": reset, "record": asdict(record)}


