"""A chunk store in a local folder: an LMDB index, chunk bytes in append-only pack files.

Layout (specified in docs/format.md, "Local chunk store")::

    <root>/FORMAT            "cas-chunkstore 1"
    <root>/index/            LMDB: chunk id -> (pack, offset, stored length, raw length, codec)
    <root>/packs/<16 hex>.pack   records (cas.store.pack): 44-byte header + payload

LMDB holds only small records (it fragments with 1 MiB values); bytes live in packs.

Crash safety: each writer (one per open store object) appends to a pack of its own, fsyncs
it, and only then commits the index entries that point into it, in one LMDB transaction.
A process killed at any instant leaves at worst unreferenced bytes at a pack's tail; every
indexed chunk is complete. Several processes may share a store: LMDB serialises index
writes, and writers never share a pack.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import struct
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from ..errors import ChunkCorruptError, ChunkNotFoundError, StoreError, UnsupportedVersionError
from ..fsutil import fsync_dir
from ..hashing import ChunkId
from .base import Payload
from .pack import MOVED_RETRIES, RECORD, CompactStats, PackedChunkStore, encode_record, read_record, record_size

__all__ = ["FORMAT_TEXT", "INDEX", "RECORD", "CompactStats", "LocalChunkStore"]

FORMAT_TEXT = "cas-chunkstore 1\n"
INDEX = struct.Struct("<QQIIB")  # pack id, record offset, stored length, raw length, codec

_WRITE_BUFFER = 8 << 20
_MAX_IOV = 512  # buffers per writev (the kernel's IOV_MAX is 1024)
_ORPHAN_AGE = 60.0  # seconds after which an unnamed, unlocked new pack is a dead writer's


class _Appender:
    """The buffer of records on their way to a local store's writable pack."""

    def __init__(self, store: LocalChunkStore) -> None:
        self.store = store
        self.out: list[Payload] = []
        self.length = 0
        self.written = False

    def at(self) -> tuple[int, int]:
        """(pack id, offset) the next record added will have."""
        return self.store._writable()[0], self.store._writer_size + self.length

    def add(self, *parts: Payload) -> None:
        self.out.extend(parts)
        self.length += sum(len(p) for p in parts)
        self.written = True
        store = self.store
        if self.length >= _WRITE_BUFFER or len(self.out) >= _MAX_IOV or store._writer_size + self.length >= store.pack_limit:
            self.flush()

    def flush(self) -> None:
        self.store._flush(self.out, self.length)
        self.out, self.length = [], 0


class LocalChunkStore(PackedChunkStore):
    """Chunks in pack files under ``root``, indexed by LMDB. Thread- and process-safe."""

    def __init__(self, root: str | os.PathLike[str], *, pack_limit: int = 512 << 20, map_size: int = 1 << 36) -> None:
        super().__init__()
        self.root = Path(root)
        self.location = str(self.root)
        self.pack_limit = pack_limit
        self._packs = self.root / "packs"
        try:
            self._packs.mkdir(parents=True, exist_ok=True)
            self._check_format()
            self._env = lmdb.open(str(self.root / "index"), map_size=map_size, subdir=True, max_dbs=1)
            self._db = self._env.open_db(b"chunks")
        except lmdb.Error as e:
            raise StoreError(f"cannot open chunk store index at {self.root}: {e}", self.location) from e
        except OSError as e:
            raise StoreError(f"cannot open chunk store at {self.root}: {e}", self.location) from e
        self._writer: tuple[int, int] | None = None  # (pack id, fd)
        self._writer_size = 0
        self._retired: list[int] = []  # fds of full packs whose records are not indexed yet

    def _check_format(self) -> None:
        fmt = self.root / "FORMAT"
        try:
            text = fmt.read_bytes().decode("utf-8", "replace")  # any bytes: refused below, never a UnicodeDecodeError
        except FileNotFoundError:
            tmp = self.root / f".FORMAT.{secrets.token_hex(4)}"
            tmp.write_text(FORMAT_TEXT)
            os.replace(tmp, fmt)
            return
        if text != FORMAT_TEXT:
            raise UnsupportedVersionError(f"{self.root} is not a chunk store this version reads: FORMAT says {text.strip()!r}")

    def _pack_path(self, pack_id: int) -> Path:
        return self._packs / f"{pack_id:016x}.pack"

    # -- reads -------------------------------------------------------------------
    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        self._ensure_open()
        with self._env.begin(db=self._db) as txn:
            return {cid for cid in ids if txn.get(cid) is not None}

    def get_many(self, ids: Iterable[ChunkId]) -> Iterator[tuple[ChunkId, Payload]]:
        self._ensure_open()
        ids = list(ids)
        with self._env.begin(db=self._db) as txn:
            locs = [(cid, txn.get(cid)) for cid in ids]
        # Pack files stay open for one call only: a long-lived store with thousands of packs
        # must not hold thousands of descriptors, and no other thread can close ours.
        fds: dict[int, int] = {}
        try:
            for cid, loc in locs:
                for _ in range(MOVED_RETRIES):
                    if loc is None:
                        raise ChunkNotFoundError(f"chunk {cid.hex()} is not in {self.location}", cid.hex())
                    try:
                        data = self._read(cid, loc, fds)
                        break
                    except FileNotFoundError:
                        # Compaction moved the chunk and removed the pack after we looked it
                        # up: its index entry already points at the new place.
                        with self._env.begin(db=self._db) as txn:
                            fresh = txn.get(cid)
                        if fresh == loc:
                            raise StoreError(f"pack of chunk {cid.hex()} is missing from {self.location}", self.location) from None
                        loc = fresh
                else:
                    raise StoreError(f"chunk {cid.hex()} kept moving in {self.location}", self.location)
                yield cid, data
        finally:
            for fd in fds.values():
                os.close(fd)

    def _read(self, cid: ChunkId, loc: bytes, fds: dict[int, int]) -> Payload:
        """The verified bytes at ``loc``; FileNotFoundError if its pack does not exist."""
        if len(loc) != INDEX.size:
            raise ChunkCorruptError(f"chunk {cid.hex()}: its index entry in {self.location} is not a record ({len(loc)} bytes)", cid.hex())
        pack_id, offset, stored, raw, codec = INDEX.unpack(loc)
        where = f"{self._pack_path(pack_id)}@{offset}"
        try:
            fd = fds.get(pack_id)
            if fd is None:
                fd = fds[pack_id] = os.open(self._pack_path(pack_id), os.O_RDONLY | os.O_CLOEXEC)
            # The index is checked against the pack before its lengths size a read.
            size = record_size(stored)
            blob = os.pread(fd, size, offset) if offset + size <= os.fstat(fd).st_size else b""
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StoreError(f"cannot read chunk {cid.hex()} from {where}: {e}", self.location) from e
        return read_record(blob, 0, cid, stored, raw, codec, where)

    def iter_ids(self) -> Iterator[ChunkId]:
        self._ensure_open()
        with self._env.begin(db=self._db) as txn:
            keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
        return iter(keys)

    # -- writes ------------------------------------------------------------------
    def _put_new(self, items: Iterator[tuple[ChunkId, Payload]]) -> int:
        pending = list(items)
        if not pending:
            return 0
        present = self.has_many(cid for cid, _ in pending)
        records: list[tuple[ChunkId, bytes]] = []
        with self._appending(f"cannot write chunks to {self.location}") as pack:
            for cid, data in pending:
                if cid in present:
                    continue
                rec = encode_record(cid, data, "put")
                pack_id, offset = pack.at()
                pack.add(rec.header, rec.payload)
                records.append((cid, INDEX.pack(pack_id, offset, len(rec.payload), rec.raw, rec.codec)))
        added = 0
        with self._env.begin(write=True, db=self._db) as txn:
            for cid, loc in records:
                added += txn.put(cid, loc, overwrite=False)
        self._release_retired()
        return added

    @contextmanager
    def _appending(self, failure: str) -> Iterator[_Appender]:
        """Records appended to the writable pack (a new one once it is full), buffered and
        written in large vectored writes, then made durable; on any error the writer is
        dropped (a torn tail is cut by the next writer) and an OSError becomes StoreError
        saying ``failure``."""
        pack = _Appender(self)
        try:
            yield pack
            pack.flush()
            if pack.written:
                os.fdatasync(self._writer[1])  # type: ignore[index]
        except OSError as e:
            self._drop_writer()
            raise StoreError(f"{failure}: {e}", self.location) from e
        except BaseException:
            self._drop_writer()
            raise

    def _writable(self) -> tuple[int, int]:
        if self._writer is not None and self._writer_size < self.pack_limit:
            return self._writer
        if self._writer is not None:
            # A full pack may hold records of the batch being written: make them durable
            # before put_many commits index entries that point at them, and keep it locked
            # until then (compaction must not take records the index does not name yet
            # for garbage).
            os.fdatasync(self._writer[1])
            self._retired.append(self._writer[1])
            self._writer = None
        self._writer = self._new_pack()
        self._writer_size = 0
        return self._writer

    def _new_pack(self) -> tuple[int, int]:
        """A new, empty pack, locked before it appears under its name.

        An exclusive flock marks a pack as being written; compaction skips locked packs. The
        file is created under a temporary name, locked, then linked to its real name, so no
        other process ever sees an unlocked pack that a writer is about to use.
        """
        tmp = self._packs / f".new-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            while True:
                pack_id = secrets.randbits(64)
                try:
                    os.link(tmp, self._pack_path(pack_id))  # fails if the name is taken
                    break
                except FileExistsError:
                    continue
            fsync_dir(self._packs)
        except BaseException:
            os.close(fd)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return pack_id, fd

    def _release_retired(self) -> None:
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def _flush(self, out: list[Payload], out_len: int) -> None:
        if not out:
            return
        assert self._writer is not None
        # Empty payloads (the empty chunk) are left out: writev of only empty buffers
        # returns 0, and the loop below would never end.
        views = [memoryview(b) for b in out if len(b)]
        while views:  # writev may write less than asked (a signal, a nearly full disk)
            n = os.writev(self._writer[1], views)
            while n:
                if n >= len(views[0]):
                    n -= len(views.pop(0))
                else:
                    views[0] = views[0][n:]
                    n = 0
        self._writer_size += out_len

    def _drop_writer(self) -> None:
        """Stop appending to the current pack (after an error its tail is unknown)."""
        self._release_retired()
        if self._writer is not None:
            os.close(self._writer[1])
            self._writer = None
            self._writer_size = 0

    def _delete(self, ids: set[ChunkId]) -> int:
        """Remove index entries. Pack bytes are reclaimed by compaction, not here."""
        with self._env.begin(write=True, db=self._db) as txn:
            return sum(bool(txn.delete(cid)) for cid in ids)

    # -- compaction --------------------------------------------------------------
    def _compact(self, stats: CompactStats, min_garbage: float) -> None:
        """Reclaim the bytes of deleted chunks and of killed writers' pack tails.

        Every pack that no writer holds (writers keep theirs flock-ed until the index names
        all its records) and whose garbage, the bytes no index entry points at, is at least
        ``min_garbage`` of its size is rewritten: its live records are copied, each checked
        against its id, into a new pack; the new pack is made durable; one index transaction
        moves each entry that still points at the old place; then the old pack is removed.
        A killed compaction leaves at worst an unreferenced copy, reclaimed by the next one.
        Readers that looked a chunk up before its move look it up again. Safe alongside
        readers, writers and other compactions in this and other processes.
        """
        live: dict[int, int] = {}
        with self._env.begin(db=self._db) as txn:
            for loc in txn.cursor().iternext(keys=False, values=True):
                pack_id, _, stored, _, _ = INDEX.unpack(loc)
                live[pack_id] = live.get(pack_id, 0) + record_size(stored)
        mine = {self._writer[0]} if self._writer is not None else set()
        held: dict[int, int] = {}  # pack id -> read fd holding its lock
        try:
            for path in sorted(self._packs.iterdir()):
                if path.name.startswith(".new-"):
                    self._remove_orphan(path, stats)
                    continue
                try:
                    pack_id = int(path.stem, 16)
                    size = path.stat().st_size
                except (ValueError, FileNotFoundError):
                    continue
                if pack_id in mine or size - live.get(pack_id, 0) < min_garbage * max(size, 1):
                    continue
                fd = self._lock_pack(path)
                if fd is not None:
                    held[pack_id] = fd
                    stats.bytes_before += size
            if held:
                self._rewrite(held, stats)
        finally:
            for fd in held.values():
                os.close(fd)

    @staticmethod
    def _lock_pack(path: Path) -> int | None:
        """A read fd holding ``path``'s exclusive lock, or None if a writer holds it (or it is gone)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _remove_orphan(self, path: Path, stats: CompactStats) -> None:
        """Remove a ``.new-`` pack left by a writer killed before it named it."""
        fd = self._lock_pack(path)
        if fd is None:
            return
        try:
            # Unlocked and unnamed: its creator died, or is between open and flock. Only
            # the first is old.
            st = os.fstat(fd)
            if time.time() - st.st_mtime > _ORPHAN_AGE:
                path.unlink(missing_ok=True)
                stats.bytes_before += st.st_size
        finally:
            os.close(fd)

    def _rewrite(self, held: dict[int, int], stats: CompactStats) -> None:
        entries: list[tuple[ChunkId, bytes]] = []
        with self._env.begin(db=self._db) as txn:
            for cid, loc in txn.cursor().iternext(keys=True, values=True):
                if INDEX.unpack_from(loc)[0] in held:
                    entries.append((bytes(cid), bytes(loc)))
        entries.sort(key=lambda e: INDEX.unpack(e[1])[:2])  # pack by pack, in file order
        moves: list[tuple[ChunkId, bytes, bytes]] = []
        keep: set[int] = set()
        with self._appending(f"compaction of {self.location} failed") as pack:
            for cid, loc in entries:
                pack_id, offset, stored, raw, codec = INDEX.unpack(loc)
                try:
                    self._read(cid, loc, held)  # verify before the copy becomes the only one
                except ChunkCorruptError:
                    # Leave it, and its pack, where they are: the error stays visible to
                    # readers and to scrubbing instead of being silently dropped.
                    keep.add(pack_id)
                    stats.corrupt.append(cid.hex())
                    continue
                blob = os.pread(held[pack_id], record_size(stored), offset)
                new_pack, new_offset = pack.at()
                moves.append((cid, loc, INDEX.pack(new_pack, new_offset, stored, raw, codec)))
                pack.add(blob)
        with self._env.begin(write=True, db=self._db) as txn:
            for cid, old, new in moves:
                if txn.get(cid) == old:  # not deleted or moved by another process meanwhile
                    txn.put(cid, new)
                    stats.chunks_moved += 1
                    stats.bytes_after += record_size(INDEX.unpack(new)[2])
        self._release_retired()
        for pack_id, fd in held.items():
            if pack_id in keep:
                stats.bytes_after += os.fstat(fd).st_size
                continue
            self._pack_path(pack_id).unlink(missing_ok=True)
            stats.packs_rewritten += 1
        fsync_dir(self._packs)

    # -- lifecycle ---------------------------------------------------------------
    def _release(self) -> None:
        self._drop_writer()
        self._env.close()

