"""A model of the original Lightning ``Path`` transfer, the system pathapi replaces.

    python -m bench.lightning_model SRC SHARED DST [DST...]

What the original did on every ``get`` (its "Path Storage" page, /work/shared/000_*.txt, and
MEASURED.md): the origin work copies the whole file or folder into a shared staging folder,
then the receiving work copies the whole of it from there into its own filesystem, replacing
what it had. Nothing is compared or reused, so a re-get moves everything again, twice.

Modelled generously: no polling delay (the original's flow polled every 0.5-2 s), the
staging copy is not fsynced (on the cloud it was a shared filesystem), copies use
``shutil.copy2`` (``sendfile`` in the kernel, never through Python buffers). The receiver's
copy is made durable as pathapi's and the other peers' are (fsync of each file, or one
``syncfs`` for more than 32 files), so all columns pay for the same durability.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading

from cas.fsutil import sync_files


def _copy(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        shutil.rmtree(dst) if os.path.isdir(dst) and not os.path.islink(dst) else os.unlink(dst)
    if os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)


def make_durable(root: str) -> int:
    """fsync every file under ``root`` (one syncfs when there are more than 32); the count."""
    paths = [root] if os.path.isfile(root) else [
        os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
    ]
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths[:33]]
    try:
        if len(paths) > 32:
            sync_files(fds, many=0)  # one syncfs of the filesystem
        else:
            sync_files(fds)
    finally:
        for fd in fds:
            os.close(fd)
    return len(paths)


def _receive(shared: str, dst: str) -> None:
    _copy(shared, dst)  # shared staging folder -> receiver
    make_durable(dst)


def main(argv: list[str]) -> None:
    """Several DSTs: as many receivers getting at once, each copying on its own thread (the
    copies run in the kernel, so threads stand in for the receivers' processes)."""
    src, shared, *dsts = argv
    _copy(src, shared)  # origin -> shared staging folder
    threads = [threading.Thread(target=_receive, args=(shared, d)) for d in dsts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main(sys.argv[1:])
