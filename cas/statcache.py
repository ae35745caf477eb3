"""A persistent cache of file stat signatures -> chunk lists, in LMDB.

Re-snapshotting an unchanged tree then costs one ``lstat`` per entry and one LMDB read per
file, instead of reading and hashing every byte. An entry is used only when size, mtime_ns,
ctime_ns, inode and device all match, and the chunker parameters are the same.

Racy entries: a file written within one timestamp tick of the snapshot could be written
again in the same tick without its stat changing, so such files are hashed but not cached
(git's "racy clean" problem). Linux filesystems stamp files from a coarse clock (a few ms);
a file whose mtime is a whole second may live on a filesystem with 1-2 s granularity, so
for those the window is ``RACY_COARSE_NS``. The cache is only an accelerator: deleting it
loses nothing.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from .chunking import ChunkerParams
from .errors import StoreError
from .hashing import ID_SIZE

RACY_NS = 100_000_000
RACY_COARSE_NS = 2_000_000_000
_SIG = struct.Struct("<QqqQQ")  # size, mtime_ns, ctime_ns, ino, dev
_FORMAT_KEY = b"\x00format"
_FORMAT = b"cas-statcache-1"


def coarse_timestamps(st: os.stat_result) -> bool:
    """Whether ``st`` may come from a filesystem that stamps whole seconds: its mtime is a
    whole second (on a fine-grained filesystem that happens once in a billion)."""
    return st.st_mtime_ns % 1_000_000_000 == 0


def _sig(st: os.stat_result) -> bytes:
    return _SIG.pack(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


_LENGTH = struct.Struct(f"<{ID_SIZE}xI")  # one chunk list record, its id skipped


def _describes(chunks: bytes, size: int, max_size: int) -> bool:
    """Whether ``chunks`` can be the chunk list of a ``size``-byte file: whole records, each
    1 to ``max_size`` bytes long, adding up to ``size``. A damaged entry is a miss, not a
    manifest that fails to build (the cache is only an accelerator)."""
    if len(chunks) % _LENGTH.size:
        return False
    total = 0
    for (n,) in _LENGTH.iter_unpack(chunks):
        if not 0 < n <= max_size:
            return False
        total += n
    return total == size


class StatCache:
    """Maps (chunker params, absolute path, stat signature) to a packed chunk list.

    Safe to share between threads and processes (LMDB's own locking). Writes are buffered
    by :meth:`put` and committed in one transaction by :meth:`flush`.
    """

    def __init__(self, path: str | os.PathLike[str], map_size: int = 1 << 36) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(str(self.path), map_size=map_size, max_dbs=0, subdir=True)
        except lmdb.Error as e:
            raise StoreError(f"cannot open stat cache at {self.path}: {e}", str(self.path)) from e
        with self._env.begin(write=True) as txn:
            fmt = txn.get(_FORMAT_KEY)
            if fmt is None:
                txn.put(_FORMAT_KEY, _FORMAT)
            elif fmt != _FORMAT:
                txn.drop(self._env.open_db(), delete=False)
                txn.put(_FORMAT_KEY, _FORMAT)
        self._pending: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        self._tags: dict[ChunkerParams, bytes] = {}
        self._local = threading.local()  # .txn: this thread's read transaction, see reading()

    def _key(self, params: ChunkerParams, path: str) -> bytes:
        tag = self._tags.get(params)
        if tag is None:
            tag = self._tags[params] = struct.pack("<BIII", params.algorithm, params.min_size, params.avg_size, params.max_size)
        return tag + path.encode("utf-8", "surrogateescape")  # os.fsencode, without its checks

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Serve this thread's :meth:`get` calls from one read transaction until the block
        ends (a walk of 100k files then opens one transaction, not 100k). Entries flushed
        meanwhile are not seen."""
        if getattr(self._local, "txn", None) is not None:
            yield
            return
        with self._env.begin(buffers=False) as txn:
            self._local.txn = txn
            try:
                yield
            finally:
                self._local.txn = None

    def get(self, params: ChunkerParams, path: str, st: os.stat_result) -> bytes | None:
        """The chunk list cached for this exact stat signature, or None."""
        key = self._key(params, path)
        txn = getattr(self._local, "txn", None)
        if txn is not None:
            value = txn.get(key)
        else:
            with self._env.begin(buffers=False) as txn:
                value = txn.get(key)
        if value is None or value[: _SIG.size] != _sig(st):
            return None
        chunks = value[_SIG.size :]
        return chunks if _describes(chunks, st.st_size, params.max_size) else None

    def put(self, params: ChunkerParams, path: str, st: os.stat_result, chunks: bytes, *, renamed: bool = False) -> None:
        """Remember ``chunks`` for ``path`` as it was at ``st`` (unless the file is racy).

        ``renamed``: the caller made the file's bytes durable at that mtime, and only then
        renamed it into place (which moves ctime, not mtime): raciness is judged by mtime
        alone, since any later write moves mtime away from the recorded one.
        """
        window = RACY_COARSE_NS if coarse_timestamps(st) else RACY_NS
        newest = st.st_mtime_ns if renamed else max(st.st_mtime_ns, st.st_ctime_ns)
        if newest >= time.time_ns() - window:
            return
        with self._lock:
            self._pending[self._key(params, path)] = _sig(st) + chunks

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        longest = self._env.max_key_size()  # a deeper path is simply not cached
        with self._env.begin(write=True) as txn:
            for k, v in pending.items():
                if len(k) <= longest:
                    txn.put(k, v)

    def close(self) -> None:
        self.flush()
        self._env.close()

    def __enter__(self) -> StatCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
