"""Garbage collection: delete the chunks that no manifest in a ref store names.

Mark and sweep under the exclusive lease of :mod:`cas.leases`, so no writer is between
"the store already has this chunk" and writing the ref that relies on it while chunks are
deleted. The mark reads every ref; a ref that cannot be read or decoded aborts the whole
collection before anything is deleted (an unreadable manifest's chunks would otherwise look
like garbage). Stores that can reclaim space after deletes (the local store's packs) are
compacted afterwards.

Readers are not leased: a reader that fetched a manifest just before its ref was replaced
and collected may miss chunks of the old manifest. It gets ChunkNotFoundError and fetches
the current manifest again (``pathapi`` does so on its own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from .errors import CasError, GcError
from .hashing import ChunkId
from .leases import Leases
from .manifest import Manifest
from .store.base import ChunkStore
from .store.pack import Compactable, CompactStats
from .store.refs import RefStore

_DELETE_BATCH = 1000


class NamesChunks(Protocol):
    """What a ref's value decodes to for a collection: anything that names the chunks it
    needs (a :class:`~cas.manifest.Manifest`; a layer above may keep several trees in one ref)."""

    def chunk_ids(self) -> set[ChunkId]: ...


@dataclass
class GcReport:
    """What a collection found and did."""

    refs: int = 0
    live_chunks: int = 0
    stored_chunks: int = 0
    deleted_chunks: int = 0
    dry_run: bool = False
    compaction: CompactStats | None = None

    def __str__(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        text = (f"{self.refs} manifests name {self.live_chunks} chunks; the store holds {self.stored_chunks}; "
                f"{verb} {self.deleted_chunks}")
        if self.compaction is not None:
            c = self.compaction
            text += (f"; compaction rewrote {c.packs_rewritten} packs, reclaimed {c.bytes_reclaimed / 2**20:.1f} MiB")
            if c.corrupt:
                text += f"; {len(c.corrupt)} corrupt chunks left in place (first: {c.corrupt[0]})"
        return text


def live_chunks(refs: RefStore, decode: Callable[[bytes], NamesChunks] = Manifest.decode) -> tuple[int, set[ChunkId]]:
    """(number of refs, every chunk id their manifests name). Raises GcError if any ref is unreadable."""
    live: set[ChunkId] = set()
    count = 0
    try:
        names = list(refs.names())
    except CasError as e:
        raise GcError(f"the refs of {refs.location} cannot all be listed, so nothing was deleted: {e}",
                      refs.location) from e
    for name in names:
        try:
            raw = refs.get(name)
            if raw is None:
                continue  # deleted since the listing: its chunks are no longer needed
            live |= decode(raw).chunk_ids()
        except CasError as e:
            raise GcError(f"ref {name!r} in {refs.location} cannot be read, so nothing was deleted: {e}",
                          refs.location) from e
        count += 1
    return count, live


def collect_garbage(
    chunks: ChunkStore,
    refs: RefStore,
    leases: Leases,
    *,
    dry_run: bool = False,
    compact: bool = True,
    min_garbage: float = 0.2,
    decode: Callable[[bytes], NamesChunks] = Manifest.decode,
) -> GcReport:
    """Delete every chunk of ``chunks`` that no manifest in ``refs`` names.

    Raises StoreBusyError at once if a persist (or another GC) holds a lease on the store,
    and GcError (deleting nothing) if a ref cannot be read. ``decode`` turns a ref's value
    into its manifest, or anything that names its chunks (a layer above may wrap manifests
    in refs of its own format, or keep several in one ref).
    """
    report = GcReport(dry_run=dry_run)
    leases.break_dead()
    with leases.exclusive("garbage collection"):
        report.refs, live = live_chunks(refs, decode)
        report.live_chunks = len(live)
        garbage: list[ChunkId] = []
        for cid in chunks.iter_ids():
            report.stored_chunks += 1
            if cid not in live:
                garbage.append(cid)
        if dry_run:
            report.deleted_chunks = len(garbage)
            return report
        for batch in _batches(garbage, _DELETE_BATCH):
            report.deleted_chunks += chunks.delete_many(batch)
        if compact and isinstance(chunks, Compactable):
            report.compaction = chunks.compact(min_garbage=min_garbage)
    return report


def _batches(items: list[ChunkId], n: int) -> Iterable[list[ChunkId]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
