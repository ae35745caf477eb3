"""A repository: a chunk store, a ref store and a lease store that belong together, with the
one way trees go into it (:meth:`Repository.push`) and the one way chunks leave it
(:meth:`Repository.gc`).

Layout (docs/format.md, "Repository"): ``<root>/chunks``, ``<root>/refs`` and
``<root>/leases`` in a local folder, or the same three prefixes under ``s3://bucket/prefix``.
A ref names a manifest whose chunks are all in the chunk store; pushes and collections
agree through the leases (:mod:`cas.leases`) so that stays true while both run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import BadStoreUrlError, FileChangedError, StoreError
from .gc import GcReport, collect_garbage
from .hashing import ChunkId
from .leases import Leases
from .manifest import Manifest
from .sources import SeedSource
from .store.base import ChunkStore
from .store.local import LocalChunkStore
from .store.refs import LocalRefStore, RefStore
from .workspace import Workspace

#: Snapshots a push takes before it gives up on a tree that keeps changing.
PUSH_ATTEMPTS = 3
#: Bytes of chunks read and handed to the store at once (``put_many`` holds a batch in memory).
PUSH_BATCH = 64 << 20


@dataclass(frozen=True)
class Pushed:
    """What a push stored: the manifest its ref now names, and how many chunks it added."""

    manifest: Manifest
    added: int


class Repository:
    """``chunks`` and ``refs`` hold the data; ``leases`` (a ref store of its own) keep
    pushes and garbage collection apart. ``location`` names the whole in messages."""

    def __init__(self, chunks: ChunkStore, refs: RefStore, leases: RefStore, location: str) -> None:
        self.chunks = chunks
        self.refs = refs
        self.lease_refs = leases
        self.leases = Leases(leases)
        self.location = location

    @staticmethod
    def resolve_url(url: str | os.PathLike[str]) -> str:
        """``url`` as :meth:`open` reads it, checked without opening anything: an
        ``s3://bucket/prefix`` URL as given, a folder (``file://`` optional) as an absolute
        path. BadStoreUrlError for a scheme no store reads or a malformed S3 URL."""
        text = os.fspath(url)
        if text.startswith("s3://"):
            from .store.s3.bucket import parse_url

            try:
                parse_url(text)
            except ValueError as e:
                raise BadStoreUrlError(f"{text}: {e}", text) from None
            return text
        if "://" in text and not text.startswith("file://"):
            scheme = text.split("://", 1)[0]
            raise BadStoreUrlError(f"{text}: unsupported store scheme {scheme!r}; give a folder, file://folder "
                                   "or s3://bucket/prefix", text)
        return str(Path(text.removeprefix("file://")).absolute())

    @classmethod
    def open(cls, url: str | os.PathLike[str], *, must_exist: bool = False) -> Repository:
        """The repository at ``url``: a folder (``file://`` optional) or ``s3://bucket/prefix``.

        A local folder is created as needed unless ``must_exist``, which raises StoreError
        for a folder that holds no chunk store (a mistyped path must not read as an empty
        store). An S3 bucket is never created (endpoint, credentials and region come from
        the standard AWS environment and config files; ``AWS_ENDPOINT_URL`` for
        S3-compatible servers). Any other scheme raises :class:`BadStoreUrlError`.
        """
        text = cls.resolve_url(url)
        if text.startswith("s3://"):
            return cls._open_s3(text)
        root = Path(text)
        if must_exist:
            _require_local(root)
        elif (root / "FORMAT").is_file() and not (root / "chunks").exists():
            raise StoreError(_old_layout(root), str(root))
        return cls(LocalChunkStore(root / "chunks"), LocalRefStore(root / "refs"), LocalRefStore(root / "leases"),
                   str(root))

    @classmethod
    def _open_s3(cls, url: str) -> Repository:
        from .store.s3 import S3Bucket, S3ChunkStore, S3RefStore

        try:
            bucket, prefix = S3Bucket.from_url(url)
        except ValueError as e:
            raise BadStoreUrlError(f"{url}: {e}", url) from e
        try:  # one client and thread pool for the three stores
            return cls(S3ChunkStore(bucket, prefix + "chunks/"), S3RefStore(bucket, prefix + "refs/"),
                       S3RefStore(bucket, prefix + "leases/"), bucket.url(prefix).rstrip("/"))
        finally:
            bucket.release()

    def push(self, ref: str, path: str | os.PathLike[str], workspace: Workspace, *,
             encode: Callable[[Manifest], bytes] = Manifest.encode, attempts: int = PUSH_ATTEMPTS,
             missing_ok: bool = False) -> Pushed | None:
        """Snapshot the tree at ``path``, store the chunks the store lacks, then set ``ref``
        to ``encode(manifest)``.

        Guarantee: when ``ref`` is set, every chunk its manifest names is in the store, and
        stays there while the ref names it. The chunks are read back from the files after
        the snapshot and verified; a file that changed in between (``SeedSource.stale``)
        makes the tree be snapshotted again, up to ``attempts`` times, then
        :class:`FileChangedError` is raised and the ref is left as it was. The whole push
        holds a shared lease, so a garbage collection cannot delete a chunk between
        ``has_many`` finding it present and the ref that relies on it (a collection running
        when the push starts is waited for). A ref already holding the same value is not
        rewritten: a second push of an unchanged tree stores nothing at all.

        None (and nothing written) if nothing is at ``path`` and ``missing_ok``.
        """
        with self.leases.shared(f"push of {ref}"):
            for _ in range(attempts):
                if missing_ok and not (os.path.isfile(path) or os.path.isdir(path)):
                    return None  # nothing there, or a link that leads nowhere
                m = workspace.snapshot(path)
                ids = m.chunk_ids()
                seed = SeedSource(m, path)
                added = self._store_chunks(seed, sorted(ids - self.chunks.has_many(ids)), m.chunk_sizes())
                if not seed.stale:
                    value = encode(m)
                    if self.refs.get(ref) != value:
                        self.refs.put(ref, value)
                    return Pushed(m, added)
        where = os.path.abspath(path)
        raise FileChangedError(
            f"{where} kept changing while it was pushed ({attempts} snapshots, each changed before its chunks "
            f"were stored): no manifest written, {ref!r} left as it was; push again once nothing writes to it", where,
        )

    def _store_chunks(self, seed: SeedSource, ids: list[ChunkId], sizes: dict[ChunkId, int]) -> int:
        """Copy ``ids`` from ``seed`` into the store in batches of about PUSH_BATCH bytes (a
        chunk that no longer verifies is skipped and lands in ``seed.stale``)."""
        added = 0
        batch: list[ChunkId] = []
        size = 0
        for cid in ids:
            batch.append(cid)
            size += sizes[cid]
            if size >= PUSH_BATCH:
                added += self.chunks.put_many(seed.get_many(batch))
                batch, size = [], 0
        if batch:
            added += self.chunks.put_many(seed.get_many(batch))
        return added

    def gc(self, *, dry_run: bool = False, compact: bool = True, min_garbage: float = 0.2,
           decode: Callable[[bytes], Manifest] = Manifest.decode) -> GcReport:
        """Delete the chunks no ref's manifest names: :func:`cas.gc.collect_garbage`, whose
        guarantees hold (``decode`` turns a ref's value into its manifest)."""
        return collect_garbage(self.chunks, self.refs, self.leases, dry_run=dry_run, compact=compact,
                               min_garbage=min_garbage, decode=decode)

    def close(self) -> None:
        self.chunks.close()
        self.refs.close()
        self.lease_refs.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _require_local(root: Path) -> None:
    """StoreError unless ``root`` is a folder holding a chunk store (``chunks/FORMAT``)."""
    if not root.is_dir():
        what = "no such folder" if not os.path.lexists(root) else "not a folder"
        raise StoreError(f"no chunk store at {root} ({what}): give the folder `cas push` stored the chunks in",
                         str(root))
    if not (root / "chunks" / "FORMAT").is_file():
        if (root / "FORMAT").is_file():
            raise StoreError(_old_layout(root), str(root))
        raise StoreError(f"{root} is not a chunk store (it has no chunks/FORMAT file): give the folder `cas push` "
                         "stored the chunks in", str(root))


def _old_layout(root: Path) -> str:
    return (f"{root} is a chunk store as `cas push` wrote them before repositories (chunks at the top, no refs): "
            f"move its FORMAT, index and packs into {root / 'chunks'} to use it")
