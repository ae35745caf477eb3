"""Readers of files a sync changes (issue 11, item 3).

By default a changed file becomes a new inode renamed into place (rsync's default): a
program that has the old file mmapped, or open, keeps reading the old bytes, and a hard link
elsewhere keeps the old content. ``in_place=True`` patches the file where it is (rsync's
``--inplace``); the last test shows its documented cost, for real: a reader with an mmap of a
file that shrinks is killed by SIGBUS.

The property tests of tests/test_materialize.py run the default path (unchanged ranges copied
in the kernel) over random trees and edit sequences; these tests add the readers.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

from test_materialize import chunker, sc, sync_and_check  # noqa: F401  (fixtures)
from trees import File, MiB, make_bytes

#: A reader: mmaps the file, says "ready", then hashes the whole mapping again and again
#: until stdin closes, printing each digest. Dies by SIGBUS if the mapping loses its pages.
MMAP_READER = textwrap.dedent("""
    import hashlib, mmap, sys, select
    with open(sys.argv[1], "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    print("ready", flush=True)
    while True:
        print(hashlib.blake2b(m[:]).hexdigest(), flush=True)
        if select.select([sys.stdin], [], [], 0.01)[0] and not sys.stdin.readline():
            break
""")


def start_mmap_reader(path: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", MMAP_READER, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def shrink_and_change(data: bytes) -> bytes:
    """A new version that a sync would patch: most of it unchanged, a few bytes changed, and
    shorter (so an mmap of the old file reaches past the new end)."""
    return data[: 2 * MiB] + b"changed!" + data[2 * MiB + 8 : 5 * MiB]


def test_a_reader_with_the_old_file_mmapped_keeps_reading_the_old_bytes(sc, chunker) -> None:  # noqa: F811
    data = make_bytes("random", 11, 8 * MiB)
    old_digest = hashlib.blake2b(data).hexdigest()
    os.makedirs(sc.origin, exist_ok=True)
    with open(os.path.join(sc.origin, "big"), "wb") as f:
        f.write(data)
    sync_and_check(sc, {"big": File(data)}, chunker)
    reader = start_mmap_reader(os.path.join(sc.dest, "big"))
    try:
        new = shrink_and_change(data)
        os.unlink(os.path.join(sc.origin, "big"))
        with open(os.path.join(sc.origin, "big"), "wb") as f:
            f.write(new)
        sync_and_check(sc, {"big": File(new)}, chunker)
        time.sleep(0.3)  # the reader goes on reading its mapping after the sync
        out, _ = reader.communicate(input="", timeout=60)  # stdin closed: the reader stops
        assert reader.returncode == 0, f"the reader died (exit {reader.returncode})"
        digests = out.split()
        assert digests and set(digests) == {old_digest}
    finally:
        if reader.poll() is None:
            reader.kill()


def test_a_hard_link_elsewhere_keeps_the_old_content(sc, chunker, tmp_path) -> None:  # noqa: F811
    data = make_bytes("random", 12, 3 * MiB)
    os.makedirs(sc.origin, exist_ok=True)
    with open(os.path.join(sc.origin, "big"), "wb") as f:
        f.write(data)
    sync_and_check(sc, {"big": File(data)}, chunker)
    elsewhere = os.path.join(os.path.dirname(sc.dest), "backup-of-big")
    os.link(os.path.join(sc.dest, "big"), elsewhere)
    new = data[:MiB] + b"X" + data[MiB + 1 :]
    with open(os.path.join(sc.origin, "big"), "r+b") as f:
        f.seek(MiB)
        f.write(b"X")
    sync_and_check(sc, {"big": File(new)}, chunker)
    with open(elsewhere, "rb") as f:
        assert f.read() == data
    assert os.stat(elsewhere).st_nlink == 1


def test_in_place_keeps_the_inode_and_an_mmap_reader_of_a_shrinking_file_gets_sigbus(sc, chunker) -> None:  # noqa: F811
    data = make_bytes("random", 13, 8 * MiB)
    os.makedirs(sc.origin, exist_ok=True)
    with open(os.path.join(sc.origin, "big"), "wb") as f:
        f.write(data)
    sync_and_check(sc, {"big": File(data)}, chunker)
    inode = os.lstat(os.path.join(sc.dest, "big")).st_ino
    reader = start_mmap_reader(os.path.join(sc.dest, "big"))
    try:
        new = shrink_and_change(data)
        with open(os.path.join(sc.origin, "big"), "r+b") as f:
            f.seek(2 * MiB)
            f.write(b"changed!")
            f.truncate(5 * MiB)
        sync_and_check(sc, {"big": File(new)}, chunker, in_place=True)
        assert os.lstat(os.path.join(sc.dest, "big")).st_ino == inode
        reader.wait(timeout=60)  # the reader touches pages past the new end
        assert reader.returncode == -signal.SIGBUS
    finally:
        if reader.poll() is None:
            reader.kill()
