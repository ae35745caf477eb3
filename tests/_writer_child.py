"""Child process for tests/test_torn.py: rewrites one file again and again, as a trainer
rewrites its checkpoint, until its stdin closes (or ``seconds`` have passed).

Usage: python tests/_writer_child.py MODE PATH FIRST_VERSION SECONDS. MODE is ``rename``
(write ``PATH.tmp``, then rename it over PATH: readers can only ever see whole versions) or
``in_place`` (open PATH with O_TRUNC, then write the new version in 64 KiB pieces: readers
may see it empty or partly written, as docs/guide.md says). Prints ``wrote N`` (the last
version written) when it stops.

Every version identifies itself (see :func:`version_bytes`): a 64-byte header naming its
number, its body's size and the BLAKE3 of its body, then the body: a shared 3 MiB base with
three 64 KiB regions and a tail that depend on the version, so that successive versions
share most chunks and a consumer patches its copy in place.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time

import blake3

HEADER = 64
PIECE = 64 * 1024
BASE_SIZE = 3 * 1024 * 1024
_base: bytes | None = None


def _base_bytes() -> bytes:
    global _base
    if _base is None:
        _base = random.Random("torn-base").randbytes(BASE_SIZE)
    return _base


def version_bytes(v: int) -> bytes:
    """The whole content of version ``v``: header, then body."""
    rng = random.Random(v)
    body = bytearray(_base_bytes())
    for _ in range(3):
        at = rng.randrange(0, BASE_SIZE - PIECE)
        body[at : at + PIECE] = rng.randbytes(PIECE)
    body += rng.randbytes(rng.randrange(0, 256 * 1024))
    return make_header(v, bytes(body)) + bytes(body)


def make_header(v: int, body: bytes) -> bytes:
    head = f"TORNTEST v{v:08d} n{len(body):010d} {blake3.blake3(body).hexdigest()[:32]}".encode()
    return head.ljust(HEADER - 1) + b"\n"


def parse_header(head: bytes) -> tuple[int, int, str] | None:
    """(version, body size, body hash prefix) of a complete header, else None."""
    if len(head) < HEADER or not head.startswith(b"TORNTEST v"):
        return None
    parts = head[:HEADER].split()
    return int(parts[1][1:]), int(parts[2][1:]), parts[3].decode()


def write_rename(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_in_place(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o644)
    try:
        for off in range(0, len(data), PIECE):
            os.write(fd, data[off : off + PIECE])
    finally:
        os.close(fd)


def main() -> None:
    mode, path, first, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    write = write_rename if mode == "rename" else write_in_place
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    rng = random.Random(first)
    t_end = time.monotonic() + seconds
    v = first
    print("started", flush=True)
    while not stop.is_set() and time.monotonic() < t_end:
        v += 1
        write(path, version_bytes(v))
        time.sleep(rng.random() * 0.05)
    print(f"wrote {v}", flush=True)


if __name__ == "__main__":
    main()
