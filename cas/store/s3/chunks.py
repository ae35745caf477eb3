"""The chunk store in an S3 bucket (AWS S3 or any S3-compatible server): packs and their indexes.

Layout under a store's prefix (specified in docs/format.md, "S3 store layout")::

    <prefix>FORMAT             "cas-s3store 1"
    <prefix>packs/<16 hex>     pack objects: chunk records (:mod:`cas.store.pack`)
    <prefix>index/<16 hex>     one index object per pack: where each of its chunks lies

Chunks average ~320 KiB, and an S3 request costs about as much server and client time as
moving a few hundred KiB of payload (measured against SeaweedFS: one object per chunk
uploaded at half the speed of ``upload_file`` of the same bytes). So chunks are packed into
objects of ``pack_size`` bytes (8 MiB, the part size ``upload_file`` uses), uploaded
concurrently, and read back with ranged GETs that cover neighbouring chunks at once.

Consistency without locks (S3 has none; it has atomic object puts, strong read-after-write
consistency, and conditional puts):

- a pack object is immutable and is written, with ``If-None-Match: *``, before its index
  object; an index object is written only when every pack of its ``put_many`` batch is
  stored and every chunk of the batch verified. A chunk is in the store exactly when an
  index object names it, so a writer killed at any instant leaves at worst a pack no index
  names (invisible garbage, removed by :meth:`S3ChunkStore.compact`);
- ``delete_many`` replaces an index object by one without the deleted entries (one atomic
  put), or deletes the index object and then its pack when nothing in it is left;
- every chunk read is checked against its record header, decoded and verified by its id.

Each store keeps an in-memory copy of the index objects and brings it up to date (one LIST
of ``index/``, plus a GET of each index object that is new or changed) at every membership
question (``has_many``, ``put_many``, ``iter_ids``, ``delete_many``) and whenever a read
misses, so chunks deleted by another process are never taken as present.

One :class:`~cas.store.s3.bucket.S3Bucket` (one boto3 client and one thread pool, the
client's connection pool as large as the thread pool) is shared by every store of a bucket. Endpoint, credentials and
region come from the standard AWS environment variables and config files
(``AWS_ENDPOINT_URL`` for S3-compatible servers); nothing here logs or prints credentials.
"""

from __future__ import annotations

import logging
import secrets
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

from ...errors import ChunkCorruptError, ChunkNotFoundError, StoreError, UnsupportedVersionError
from ...hashing import ChunkId
from ..base import Payload
from ..pack import MOVED_RETRIES, CompactStats, PackedChunkStore, encode_record, read_record, record_size
from .bucket import S3Bucket, _norm_prefix

__all__ = ["FORMAT_TEXT", "ORPHAN_AGE", "S3ChunkStore", "decode_index", "encode_index"]

log = logging.getLogger(__name__)

FORMAT_TEXT = "cas-s3store 1\n"
INDEX_MAGIC = b"CASI"
INDEX_VERSION = 1
INDEX_HEAD = struct.Struct("<4sHHIQ")  # magic, version, reserved, entry count, pack size
INDEX_ENTRY = struct.Struct("<32sQIIB")  # chunk id, record offset, stored length, raw length, codec

#: Two wanted records of one pack at most this far apart are read with one ranged GET.
READ_GAP = 1 << 20
#: Packs without an index object this much older than the server's clock are a dead writer's.
ORPHAN_AGE = 3600.0
_PACK_NAME_TRIES = 4


@dataclass
class _Pack:
    """One pack as its index object describes it."""

    etag: str  # of the index object
    size: int  # of the pack object
    entries: dict[ChunkId, tuple[int, int, int, int]]  # id -> (offset, stored length, raw length, codec)
    gen: int = 0  # local change counter when this copy was installed


def encode_index(size: int, entries: dict[ChunkId, tuple[int, int, int, int]]) -> bytes:
    """The index object of a pack of ``size`` bytes holding ``entries`` (docs/format.md)."""
    out = [INDEX_HEAD.pack(INDEX_MAGIC, INDEX_VERSION, 0, len(entries), size)]
    for cid, (offset, stored, raw, codec) in sorted(entries.items(), key=lambda e: e[1][0]):
        out.append(INDEX_ENTRY.pack(cid, offset, stored, raw, codec))
    return b"".join(out)


def decode_index(raw: bytes, where: str) -> tuple[int, dict[ChunkId, tuple[int, int, int, int]]]:
    """(pack size, entries) of an index object; StoreError if it is not a whole one."""
    if len(raw) < INDEX_HEAD.size:
        raise StoreError(f"index object {where} is truncated ({len(raw)} bytes)", where)
    magic, version, _, count, size = INDEX_HEAD.unpack_from(raw)
    if magic != INDEX_MAGIC:
        raise StoreError(f"{where} is not a pack index object", where)
    if version != INDEX_VERSION:
        raise UnsupportedVersionError(f"pack index {where} has version {version}, this reads {INDEX_VERSION}")
    if len(raw) != INDEX_HEAD.size + count * INDEX_ENTRY.size:
        raise StoreError(f"index object {where} has {len(raw)} bytes, not the {count} entries it declares", where)
    entries: dict[ChunkId, tuple[int, int, int, int]] = {}
    for i in range(count):
        cid, offset, stored, rawlen, codec = INDEX_ENTRY.unpack_from(raw, INDEX_HEAD.size + i * INDEX_ENTRY.size)
        if offset + record_size(stored) > size:
            raise StoreError(f"index object {where}: chunk {cid.hex()} lies past the pack's end", where)
        entries[cid] = (offset, stored, rawlen, codec)
    return size, entries


@dataclass
class _Run:
    """One ranged GET: records of one pack between ``first`` and ``end`` (exclusive)."""

    pack: int
    first: int
    end: int
    records: list[tuple[ChunkId, int, int, int, int]]  # id, offset, stored, raw, codec


class _PackGone(Exception):
    def __init__(self, run: _Run) -> None:
        super().__init__(f"pack {run.pack:016x} is gone")
        self.run = run


class S3ChunkStore(PackedChunkStore):
    """Chunks packed into objects under ``s3://bucket/prefix`` (layout in the module docstring).

    Thread-safe. Several processes and machines may share a store: puts and reads need no
    coordination; deletes (garbage collection) must not run in two processes at once,
    which :mod:`cas.leases` ensures.

    ``pack_size``: bytes of chunk records per pack object. ``inflight``: bytes of packs
    being built or uploaded at once by ``put_many``, and of ranged reads ahead of the
    consumer in ``get_many``; the input iterator is consumed while earlier packs upload.
    ``orphan_age``: seconds after which :meth:`compact` takes a pack that no index object
    names for a dead writer's (by the server's clock: a younger one may be a put running).
    """

    def __init__(self, bucket: S3Bucket, prefix: str = "", *, pack_size: int = 8 << 20, inflight: int = 64 << 20,
                 orphan_age: float = ORPHAN_AGE) -> None:
        super().__init__()
        self.bucket = bucket.retain()
        self.prefix = _norm_prefix(prefix)
        self.location = bucket.url(self.prefix).rstrip("/")
        self.pack_size = pack_size
        self.inflight = max(inflight, pack_size)
        self.orphan_age = orphan_age
        self._packs: dict[int, _Pack] = {}
        self._where: dict[ChunkId, int] = {}  # id -> a pack holding it
        self._more: dict[ChunkId, set[int]] = {}  # id -> further packs holding it (rare)
        self._gen = 0
        self._tombs: dict[int, int] = {}  # pack id -> gen at which this process removed it
        self._state = threading.Lock()  # guards the fields above
        self._refreshing = threading.Lock()
        try:
            self._check_format()
        except BaseException:
            self.bucket.release()
            raise

    @classmethod
    def open(cls, url: str, *, workers: int = 16, **kwargs: Any) -> S3ChunkStore:
        """A store at ``s3://bucket/prefix`` with a connection of its own."""
        bucket, prefix = S3Bucket.from_url(url, workers=workers)
        try:
            return cls(bucket, prefix, **kwargs)
        finally:
            bucket.release()

    def _check_format(self) -> None:
        key = self.prefix + "FORMAT"
        for _ in range(2):
            got = self.bucket.get(key)
            if got is None:
                if self.bucket.put(key, FORMAT_TEXT.encode(), if_absent=True) is not None:
                    return
                continue  # another process created it just now: read theirs
            text = got[0].decode("utf-8", "replace")
            if text != FORMAT_TEXT:
                raise UnsupportedVersionError(
                    f"{self.location} is not a chunk store this version reads: FORMAT says {text.strip()!r}"
                )
            return
        raise StoreError(f"cannot read or create {self.bucket.url(key)}", self.location)

    # -- names -------------------------------------------------------------------------
    def _pack_key(self, pack: int) -> str:
        return f"{self.prefix}packs/{pack:016x}"

    def _index_key(self, pack: int) -> str:
        return f"{self.prefix}index/{pack:016x}"

    @staticmethod
    def _pack_of(name: str) -> int | None:
        if len(name) != 16:
            return None
        try:
            return int(name, 16)
        except ValueError:
            return None

    # -- the in-memory index -----------------------------------------------------------
    def _install(self, pack_id: int, pack: _Pack) -> None:
        if pack_id in self._packs:
            self._uninstall(pack_id)
        self._packs[pack_id] = pack
        for cid in pack.entries:
            if self._where.setdefault(cid, pack_id) != pack_id:
                self._more.setdefault(cid, set()).add(pack_id)

    def _uninstall(self, pack_id: int) -> None:
        pack = self._packs.pop(pack_id, None)
        if pack is None:
            return
        for cid in pack.entries:
            others = self._more.get(cid)
            if self._where.get(cid) == pack_id:
                if others:
                    self._where[cid] = others.pop()
                else:
                    self._where.pop(cid, None)
            elif others:
                others.discard(pack_id)
            if others is not None and not others:
                del self._more[cid]

    def _refresh(self) -> None:
        """Bring the in-memory index up to date with the bucket: LIST, GET what changed.

        Changes this process made while the LIST ran are newer than what it lists, so they
        are kept (each local change bumps ``_gen``; ``_tombs`` remembers removed packs).
        """
        with self._refreshing:
            with self._state:
                g0 = self._gen
                known = {pid: p.etag for pid, p in self._packs.items()}
            base = self.prefix + "index/"
            listed: dict[int, str] = {}
            for obj in self.bucket.objects(base):
                pid = self._pack_of(obj.key[len(base) :])
                if pid is not None:
                    listed[pid] = obj.etag
            changed = [pid for pid, etag in listed.items() if known.get(pid) != etag]
            fetched: dict[int, _Pack | None] = dict(zip(changed, self.bucket.map(self._fetch_index, changed), strict=True))
            with self._state:
                for pid, pack in fetched.items():
                    current = self._packs.get(pid)
                    if self._tombs.get(pid, -1) > g0 or (current is not None and current.gen > g0):
                        continue
                    if pack is None:  # deleted between the LIST and the GET
                        self._uninstall(pid)
                    else:
                        pack.gen = g0
                        self._install(pid, pack)
                for pid in [pid for pid, p in self._packs.items() if pid not in listed and p.gen <= g0]:
                    self._uninstall(pid)
                self._tombs = {pid: g for pid, g in self._tombs.items() if g > g0}

    def _fetch_index(self, pack_id: int) -> _Pack | None:
        key = self._index_key(pack_id)
        got = self.bucket.get(key)
        if got is None:
            return None
        size, entries = decode_index(got[0], self.bucket.url(key))
        return _Pack(got[1], size, entries)

    # -- reads -------------------------------------------------------------------------
    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        self._ensure_open()
        ids = list(ids)
        if not ids:
            return set()
        self._refresh()
        with self._state:
            return {cid for cid in ids if cid in self._where}

    def iter_ids(self) -> Iterator[ChunkId]:
        self._ensure_open()
        self._refresh()
        with self._state:
            return iter(list(self._where))

    def get_many(self, ids: Iterable[ChunkId]) -> Iterator[tuple[ChunkId, Payload]]:
        """Chunks in the order their ranged reads complete; reads run ``bucket.workers`` at a
        time, at most ``inflight`` bytes ahead of the consumer."""
        self._ensure_open()
        wanted = Counter(iter(ids))  # iter(): a dict given as ids is a list of keys, not counts
        remaining = list(wanted)
        moved = 0
        while remaining:
            runs = self._plan(remaining)
            gone: list[ChunkId] = []
            pending: dict[Future[list[tuple[ChunkId, Payload]]], _Run] = {}
            ahead = 0
            queue = iter(runs)
            nxt = next(queue, None)
            try:
                while nxt is not None or pending:
                    while nxt is not None and (not pending or ahead + nxt.end - nxt.first <= self.inflight):
                        pending[self.bucket.pool.submit(self._read_run, nxt)] = nxt
                        ahead += nxt.end - nxt.first
                        nxt = next(queue, None)
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        run = pending.pop(fut)
                        ahead -= run.end - run.first
                        try:
                            chunks = fut.result()
                        except _PackGone:
                            gone.extend(cid for cid, *_ in run.records)
                            continue
                        for cid, data in chunks:
                            for _ in range(wanted[cid]):
                                yield cid, data
            finally:
                for fut in pending:
                    fut.cancel()
            if gone:
                # Compaction moved them, or they were deleted: look them up again.
                moved += 1
                if moved > MOVED_RETRIES:
                    raise StoreError(f"chunk {gone[0].hex()} kept moving in {self.location}", self.location)
                self._refresh()
            remaining = gone

    def _plan(self, ids: list[ChunkId]) -> list[_Run]:
        """Ranged reads covering ``ids``: per pack, neighbouring records merged into one read."""
        with self._state:
            unknown = [cid for cid in ids if cid not in self._where]
        if unknown:
            self._refresh()
        by_pack: dict[int, list[tuple[ChunkId, int, int, int, int]]] = {}
        with self._state:
            for cid in ids:
                pid = self._where.get(cid)
                if pid is None:
                    raise ChunkNotFoundError(f"chunk {cid.hex()} is not in {self.location}", cid.hex())
                by_pack.setdefault(pid, []).append((cid, *self._packs[pid].entries[cid]))
        runs: list[_Run] = []
        for pid, records in by_pack.items():
            records.sort(key=lambda r: r[1])
            run: _Run | None = None
            for rec in records:
                start, end = rec[1], rec[1] + record_size(rec[2])
                if run is not None and start - run.end <= READ_GAP and end - run.first <= max(self.pack_size, end - start):
                    run.records.append(rec)
                    run.end = max(run.end, end)
                else:
                    run = _Run(pid, start, end, [rec])
                    runs.append(run)
        return runs

    def _read_run(self, run: _Run) -> list[tuple[ChunkId, Payload]]:
        """Fetch one run and return its chunks, each checked against header and id."""
        key = self._pack_key(run.pack)
        got = self.bucket.get(key, run.first, run.end - 1)
        if got is None:
            raise _PackGone(run)
        blob = memoryview(got[0])
        url = self.bucket.url(key)
        return [(cid, read_record(blob, offset - run.first, cid, stored, raw, codec, f"{url}@{offset}"))
                for cid, offset, stored, raw, codec in run.records]

    # -- writes ------------------------------------------------------------------------
    def _put_new(self, items: Iterator[tuple[ChunkId, Payload]]) -> int:
        """Pack the chunks the store lacks and upload the packs while reading on; then write
        the packs' index objects. A chunk that fails verification stops the batch: packs
        already uploaded are deleted and no index object is written, so nothing is added.
        After it returns, every chunk of the batch is durably in the bucket."""
        self._refresh()
        slots = threading.BoundedSemaphore(max(1, self.inflight // self.pack_size))
        uploads: list[Future[tuple[int, _Pack]]] = []
        buf: list[tuple[ChunkId, bytes]] = []
        size = 0
        try:
            for cid, data in items:
                if cid in self._where:
                    continue
                data = bytes(data)  # the caller may reuse its buffer once the iterator moves
                buf.append((cid, data))
                size += record_size(len(data))
                if size >= self.pack_size:
                    self._submit_pack(buf, slots, uploads)
                    buf, size = [], 0
            if buf:
                self._submit_pack(buf, slots, uploads)
            wait(uploads)
            packs = [f.result() for f in uploads]
        except BaseException:
            self._abandon(uploads)
            raise
        if not packs:
            return 0
        self.bucket.map(self._write_index, packs)
        with self._state:
            self._gen += 1
            for pid, pack in packs:
                pack.gen = self._gen
                self._install(pid, pack)
        return sum(len(pack.entries) for _, pack in packs)

    def _submit_pack(self, buf: list[tuple[ChunkId, bytes]], slots: threading.BoundedSemaphore,
                     uploads: list[Future[tuple[int, _Pack]]]) -> None:
        failed = next((f for f in uploads if f.done() and f.exception() is not None), None)
        if failed is not None:
            failed.result()  # raises: no point reading on
        slots.acquire()

        def task() -> tuple[int, _Pack]:
            try:
                return self._upload_pack(buf)
            finally:
                slots.release()

        try:
            uploads.append(self.bucket.pool.submit(task))
        except BaseException:
            slots.release()
            raise

    def _upload_pack(self, items: list[tuple[ChunkId, bytes]]) -> tuple[int, _Pack]:
        """Verify, compress and upload one pack under a new name; (pack id, its index).
        Empties ``items`` once the pack's bytes are assembled (they are not needed twice)."""
        parts: list[Payload] = []
        entries: dict[ChunkId, tuple[int, int, int, int]] = {}
        offset = 0
        for cid, data in items:
            rec = encode_record(cid, data, f"put to {self.location}")
            parts += (rec.header, rec.payload)
            entries[cid] = (offset, len(rec.payload), rec.raw, rec.codec)
            offset += rec.size
        body = b"".join(parts)
        del parts
        items.clear()
        for _ in range(_PACK_NAME_TRIES):
            # A fresh random name; if it is taken (in practice: by an attempt of this very
            # upload whose answer was lost) take another and leave that one to compaction.
            pid = secrets.randbits(64)
            if self.bucket.put(self._pack_key(pid), body, if_absent=True) is not None:
                return pid, _Pack("", len(body), entries)
        raise StoreError(f"no free pack name in {self.location} after {_PACK_NAME_TRIES} tries", self.location)

    def _write_index(self, item: tuple[int, _Pack]) -> None:
        pid, pack = item
        key = self._index_key(pid)
        body = encode_index(pack.size, pack.entries)
        etag = self.bucket.put(key, body, if_absent=True)
        if etag is None:  # an earlier attempt of this put landed, or the name is somehow taken
            got = self.bucket.get(key)
            if got is None or got[0] != body:
                raise StoreError(f"index object {self.bucket.url(key)} exists with other contents", self.location)
            etag = got[1]
        pack.etag = etag

    def _abandon(self, uploads: list[Future[tuple[int, _Pack]]]) -> None:
        """After a failed put: stop queued uploads, wait for running ones, delete what landed."""
        for f in uploads:
            f.cancel()
        wait(uploads)
        landed = [self._pack_key(f.result()[0]) for f in uploads if not f.cancelled() and f.exception() is None]
        if landed:
            try:
                self.bucket.delete(landed)
            except StoreError as e:  # unreachable now: compaction removes them later
                log.warning("could not remove %d packs of a failed put from %s: %s", len(landed), self.location, e)

    # -- deletes -----------------------------------------------------------------------
    def _delete(self, ids: set[ChunkId]) -> int:
        """Rewrite the index object of each pack holding one of ``ids`` without them (one
        atomic put each); a pack left with nothing is deleted, index object first."""
        self._refresh()
        with self._state:
            present = {cid for cid in ids if cid in self._where}
            touched = {self._where[cid] for cid in present} | {p for cid in present for p in self._more.get(cid, ())}
            plans = [(pid, self._packs[pid]) for pid in touched]
        results = self.bucket.map(lambda plan: self._shrink(plan[0], plan[1], ids), plans)
        with self._state:
            self._gen += 1
            new: _Pack | None
            for (pid, _), new in zip(plans, results, strict=True):
                if new is None:
                    self._uninstall(pid)
                    self._tombs[pid] = self._gen
                else:
                    new.gen = self._gen
                    self._install(pid, new)
        return len(present)

    def _shrink(self, pid: int, pack: _Pack, drop: set[ChunkId]) -> _Pack | None:
        """Pack ``pid`` without the ids in ``drop``: its new index, or None if it was removed."""
        keep = {cid: e for cid, e in pack.entries.items() if cid not in drop}
        if not keep:
            self.bucket.delete([self._index_key(pid)])
            self.bucket.delete([self._pack_key(pid)])
            return None
        etag = self.bucket.put(self._index_key(pid), encode_index(pack.size, keep))
        return _Pack(etag or "", pack.size, keep)

    # -- compaction --------------------------------------------------------------------
    def _compact(self, stats: CompactStats, min_garbage: float) -> None:
        """A pack whose garbage (bytes no index entry of it points at, counting a chunk that
        another pack also holds as garbage here) is at least ``min_garbage`` of its size is
        rewritten: the live records of such packs are read, verified and uploaded together
        as new packs of about ``pack_size`` with their index objects; then the old index
        objects and packs are deleted. A pack with no index object older than
        ``orphan_age`` is deleted. A killed compaction leaves at worst a chunk held by two
        packs or an orphan pack; the next one removes either. Readers whose pack vanished
        look their chunks up again.
        """
        self._refresh()
        now = self.bucket.server_time()
        indexed: dict[int, int] = {}
        orphans: list[str] = []
        base = self.prefix + "packs/"
        for obj in self.bucket.objects(base):
            pid = self._pack_of(obj.key[len(base) :])
            if pid is None:
                continue
            with self._state:
                known = pid in self._packs
            if known:
                indexed[pid] = obj.size
            elif now - obj.modified >= self.orphan_age and not self.bucket.head(self._index_key(pid)):
                orphans.append(obj.key)
                stats.bytes_before += obj.size
        if orphans:
            self.bucket.delete(orphans)
        with self._state:
            victims: list[tuple[int, _Pack, dict[ChunkId, tuple[int, int, int, int]]]] = []
            for pid, size in indexed.items():
                pack = self._packs.get(pid)
                if pack is None:
                    continue
                # A chunk that another pack also holds counts as garbage here.
                mine = {cid: e for cid, e in pack.entries.items() if self._where.get(cid) == pid}
                live = sum(record_size(e[1]) for e in mine.values())
                if size - live >= min_garbage * max(size, 1):
                    victims.append((pid, pack, mine))
        # Live records of several victims go into one new pack of about pack_size.
        group: list[tuple[int, _Pack, dict[ChunkId, tuple[int, int, int, int]]]] = []
        live = 0
        for victim in victims:
            group.append(victim)
            live += sum(record_size(e[1]) for e in victim[2].values())
            if live >= self.pack_size:
                self._rewrite(group, stats)
                group, live = [], 0
        if group:
            self._rewrite(group, stats)

    def _rewrite(self, group: list[tuple[int, _Pack, dict[ChunkId, tuple[int, int, int, int]]]], stats: CompactStats) -> None:
        """Copy the live chunks of ``group``'s packs (verified) into new packs, index those,
        then remove the old index objects and packs. A pack with a corrupt chunk keeps that
        chunk alone in its index (readers and scrubbing keep seeing the error)."""
        good: list[tuple[ChunkId, bytes]] = []
        bad: dict[int, set[ChunkId]] = {}
        done: list[tuple[int, _Pack]] = []
        for pid, pack, live in group:
            records = sorted(((cid, *e) for cid, e in live.items()), key=lambda r: r[1])
            try:
                if records:
                    end = max(r[1] + record_size(r[2]) for r in records)
                    try:
                        chunks = self._read_run(_Run(pid, records[0][1], end, records))
                    except ChunkCorruptError:
                        chunks = []
                        for rec in records:  # find the bad ones
                            try:
                                chunks += self._read_run(_Run(pid, rec[1], rec[1] + record_size(rec[2]), [rec]))
                            except ChunkCorruptError:
                                bad.setdefault(pid, set()).add(rec[0])
                                stats.corrupt.append(rec[0].hex())
                    good += [(cid, bytes(data)) for cid, data in chunks]
            except _PackGone:
                continue  # removed by someone else meanwhile
            done.append((pid, pack))
            stats.bytes_before += pack.size
        new: list[tuple[int, _Pack]] = []
        part: list[tuple[ChunkId, bytes]] = []
        size = 0
        for item in good:
            part.append(item)
            size += record_size(len(item[1]))
            if size >= self.pack_size:
                new.append(self._upload_pack(part))
                part, size = [], 0
        if part:
            new.append(self._upload_pack(part))
        self.bucket.map(self._write_index, new)
        with self._state:
            self._gen += 1
            for pid, pack in new:
                pack.gen = self._gen
                self._install(pid, pack)
        stats.chunks_moved += len(good)
        stats.bytes_after += sum(pack.size for _, pack in new)
        for pid, pack in done:
            if pid in bad:
                kept = {cid: e for cid, e in pack.entries.items() if cid in bad[pid]}
                etag = self.bucket.put(self._index_key(pid), encode_index(pack.size, kept))
                stats.bytes_after += pack.size
                with self._state:
                    self._gen += 1
                    self._install(pid, _Pack(etag or "", pack.size, kept, self._gen))
                continue
            self.bucket.delete([self._index_key(pid)])
            self.bucket.delete([self._pack_key(pid)])
            stats.packs_rewritten += 1
            with self._state:
                self._gen += 1
                self._uninstall(pid)
                self._tombs[pid] = self._gen

    # -- lifecycle ---------------------------------------------------------------------
    def _release(self) -> None:
        self.bucket.release()
