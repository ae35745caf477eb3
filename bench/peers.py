"""The peers every scenario is measured against, each on the same data in the same run.

- ``cp``: ``cp -r --reflink=never`` into a fresh folder, then the same durability as
  pathapi (fsync of each file, one ``syncfs`` beyond 32 files): the floor for a first copy.
  It has no incremental mode, so every get is a full copy.
- ``rsync``: local to local, ``-a --no-whole-file`` (local rsync defaults to whole-file;
  this forces its delta algorithm, the path a user relies on for changed files), into a
  folder that keeps its previous copy between gets, then the same durability step.
- ``lightning``: the original system's transfer (``bench.lightning_model``): origin ->
  shared staging folder -> receiver, whole, on every get.

Each returns a :class:`PeerRun`: wall seconds, bytes moved, the RSS report.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

from .measure import PeakRss, run_command


@dataclass
class PeerRun:
    seconds: float
    bytes_moved: int
    rss: dict[str, object]


def tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _durable_argv(dst: str, files: int) -> list[str]:
    if files > 32:
        return ["sync", "-f", dst]
    if os.path.isfile(dst):
        return ["sync", dst]
    return ["sync", *[os.path.join(d, f) for d, _, fs in os.walk(dst) for f in fs]]


def cp(src: str, dst: str, files: int, size: int) -> PeerRun:
    """A full copy into a fresh ``dst`` (removed first, untimed) + durability."""
    _remove(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    subprocess.run(["sync", "-f", os.path.dirname(dst)], check=True)
    with PeakRss() as rss:
        t1, _ = run_command(["cp", "-r", "--reflink=never", src, dst], rss, "cp")
        t2, _ = run_command(_durable_argv(dst, files), rss, "sync")
    return PeerRun(t1 + t2, size, rss.report.as_dict())


_SENT = re.compile(r"Total bytes sent: ([\d,]+)")
_LITERAL = re.compile(r"Literal data: ([\d,]+)")


def rsync(src: str, dst: str, files: int, fresh: bool = False) -> PeerRun:
    """``rsync -a --no-whole-file src/ dst/`` + durability; bytes moved are what its sender
    sent its receiver ("Total bytes sent": literal data plus block references and file list)."""
    if fresh:
        _remove(dst)
    os.makedirs(dst, exist_ok=True)
    slash = "/" if os.path.isdir(src) else ""
    with PeakRss() as rss:
        t1, out = run_command(["rsync", "-a", "--no-whole-file", "--stats", src + slash, dst + ("/" if slash else "")],
                              rss, "rsync", capture=True)
        target = dst if slash else os.path.join(dst, os.path.basename(src))
        t2, _ = run_command(_durable_argv(target, files), rss, "sync")
    m = _SENT.search(out)
    return PeerRun(t1 + t2, int(m.group(1).replace(",", "")) if m else -1, rss.report.as_dict())


def lightning(src: str, shared: str, dst: str, size: int) -> PeerRun:
    """The original system: two full copies per get (``bench.lightning_model``)."""
    with PeakRss() as rss:
        t, _ = run_command([sys.executable, "-m", "bench.lightning_model", src, shared, dst], rss, "lightning")
    return PeerRun(t, 2 * size, rss.report.as_dict())
