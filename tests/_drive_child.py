"""A child process for tests/test_drive.py (run as a script, never collected by pytest): one
work, outside an app, using a Drive through the artifact store the parent gives it.

    python _drive_child.py <store> <work name> <work root> <state dir> versions <drive> <rel> <first> <count>
        For v = first .. first+count-1: write version v of the file ``rel`` (temp file, then
        rename) and put it; print ``put <v>`` after each put returned.

    python _drive_child.py <store> <work name> <work root> <state dir> puts <drive> <prefix> <count>
        Print ``ready``, wait for a line on stdin, then put ``count`` new files
        ``<prefix>/f<i>.bin`` one by one; print ``done``.

    python _drive_child.py <store> <work name> <work root> <state dir> die-in-swap <drive> <rel> <version>
        Write version ``version`` of ``rel`` and put it, but SIGKILL itself inside the index
        swap: its chunks are stored and it holds the Drive's mutex, the index is not written.

    python _drive_child.py <store> <work name> <work root> <state dir> later <drive> <rel> <delay>
        Print ``ready``, sleep ``delay`` seconds, write ``rel`` (version 1) and put it; print ``put``.

``<store>`` is an app root (its artifact store) or ``s3://bucket/prefix`` (AWS environment).
Output lines are whole ``print`` calls, flushed at once.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Size of a versioned file: several chunks at the default chunking, so a put takes a while.
VERSION_SIZE = 3 << 20


def versioned(version: int, size: int = VERSION_SIZE) -> bytes:
    """Bytes that verify themselves: a 32-byte hash of the rest, then the version and bytes
    that differ per version (every chunk changes from one version to the next)."""
    body = version.to_bytes(4, "little") + random.Random(version).randbytes(size - 36)
    return hashlib.blake2b(body, digest_size=32).digest() + body


def version_of(data: bytes) -> int:
    """The version a file holds; ValueError if it is not one whole version."""
    if len(data) < 36 or hashlib.blake2b(data[32:], digest_size=32).digest() != data[:32]:
        raise ValueError(f"torn or partial file ({len(data)} bytes)")
    return int.from_bytes(data[32:36], "little")


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main() -> None:
    from cas.workspace import Workspace
    from pathapi import Drive
    from pathapi.artifacts import ArtifactStore
    from pathapi.runtime.context import WorkContext, set_current

    store_arg, name, root, state, mode, drive_name = sys.argv[1:7]
    rest = sys.argv[7:]
    url = store_arg if store_arg.startswith("s3://") else None
    store = ArtifactStore.open(url, store_arg)
    os.makedirs(root, exist_ok=True)
    os.chdir(root)
    set_current(WorkContext(name, root, Workspace(state), store, "secret", 30.0, in_run=True))
    drive = Drive(f"lit://{drive_name}")
    if mode == "versions":
        rel, first, count = rest[0], int(rest[1]), int(rest[2])
        for v in range(first, first + count):
            write_atomically(Path(root) / rel, versioned(v))
            drive.put(rel)
            print(f"put {v}", flush=True)
    elif mode == "puts":
        prefix, count = rest[0], int(rest[1])
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(count):
            write_atomically(Path(root) / prefix / f"f{i}.bin", f"{name} {i}".encode() * 100)
            drive.put(f"{prefix}/f{i}.bin")
        print("done", flush=True)
    elif mode == "die-in-swap":
        import signal

        from cas.repository import Repository

        real_swap = Repository.swap

        def swap_then_die(self: Repository, ref: str, change: object, **kw: object) -> object:
            def dying(old: bytes | None) -> bytes | None:
                print("in swap", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
                raise AssertionError("unreachable")

            return real_swap(self, ref, dying)

        Repository.swap = swap_then_die  # type: ignore[method-assign,assignment]
        rel, v = rest[0], int(rest[1])
        write_atomically(Path(root) / rel, versioned(v))
        drive.put(rel)
    elif mode == "later":
        rel, delay = rest[0], float(rest[1])
        print("ready", flush=True)
        time.sleep(delay)
        write_atomically(Path(root) / rel, versioned(1, 1000))
        drive.put(rel)
        print("put", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
