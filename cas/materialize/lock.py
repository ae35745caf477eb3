"""Exclusive use of a state folder: one materialize (or recover) at a time."""

from __future__ import annotations

import fcntl
import os
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

# One lock per state folder for the threads of this process, taken before flock(2), which
# excludes the other processes.
_thread_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)


@contextmanager
def locked(state_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive use of a state folder, across threads and processes."""
    state = os.path.abspath(state_dir)
    os.makedirs(state, exist_ok=True)
    with _thread_locks[state]:
        fd = os.open(os.path.join(state, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
