"""The files phase 1 writes (staged files, the journal data file) and what is done to them."""

from __future__ import annotations

import os
import time
from collections import OrderedDict

from ..fsutil import preallocate, reserve, sync_each_or_all, syncfs

BACKDATE_NS = 1_000_000_000
#: Files phase 1 keeps open at once (it may write many more; see ``OpenFiles``).
MAX_OPEN_FILES = 64


class OpenFiles:
    """The files phase 1 writes (staged files, the journal data file), by slot, created and
    opened on demand: at most ``limit`` descriptors are open at once, however many files a
    tree has (a tree of 100k small files must not need 100k descriptors; a common limit is
    1024). Closing a file loses nothing: its dirty pages are made durable by :meth:`sync`."""

    def __init__(self, limit: int = MAX_OPEN_FILES) -> None:
        self.limit = limit
        self.paths: list[str] = []
        self._open: OrderedDict[int, int] = OrderedDict()  # slot -> fd, least recently used first
        self._later: dict[int, tuple[int, int]] = {}  # slot -> (mode, bytes to pre-allocate): not created yet

    def add(self, path: str, mode: int, size: int) -> int:
        """A file to create at its first use (it must not exist), with ``mode``, and ``size``
        bytes pre-allocated (0: none). Its slot."""
        self.paths.append(path)
        self._later[len(self.paths) - 1] = (mode, size)
        return len(self.paths) - 1

    def create_rest(self) -> None:
        """Create the files added but never used."""
        for slot in list(self._later):
            self.fd(slot)

    def create(self, path: str) -> int:
        """Create ``path`` (it must not exist) now: its slot."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.paths.append(path)
        return self._keep(len(self.paths) - 1, fd)

    def fd(self, slot: int) -> int:
        """A descriptor of the file in ``slot``, valid until the next call on this object."""
        fd = self._open.get(slot)
        if fd is not None:
            self._open.move_to_end(slot)
            return fd
        later = self._later.pop(slot, None)
        if later is None:
            fd = os.open(self.paths[slot], os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            self._keep(slot, fd)
            return fd
        fd = os.open(self.paths[slot], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._keep(slot, fd)
        mode, size = later
        os.fchmod(fd, mode)
        preallocate(fd, size)
        return fd

    def _keep(self, slot: int, fd: int) -> int:
        self._open[slot] = fd
        while len(self._open) > self.limit:
            os.close(self._open.popitem(last=False)[1])
        return slot

    def sync(self) -> None:
        """Make every file durable: one syncfs(2) of their filesystem when there are many,
        else an fsync of each (see :func:`cas.fsutil.sync_each_or_all`)."""
        sync_each_or_all(range(len(self.paths)), lambda slot: os.fsync(self.fd(slot)),
                         lambda slot: syncfs(self.fd(slot)))

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])


def backdate(fd: int | str) -> None:
    """Set a finished file's mtime one second into the past.

    Its bytes are final, and no later write can carry that mtime again (a write stamps
    "now"), so a stat cache may trust the file at once instead of treating it as racy
    (written in the current timestamp tick) and reading it all back on the next snapshot.
    """
    now = time.time_ns()
    os.utime(fd, ns=(now, now - BACKDATE_NS))


def reserve_growth(path: str, new_size: int) -> None:
    """Allocate the blocks a patch will need beyond the file's end now, in phase 1, so that
    applying it cannot run out of space half-way."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if new_size > size:
            reserve(fd, size, new_size - size)
    finally:
        os.close(fd)
