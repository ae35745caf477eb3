"""The artifact store: where works persist their Paths so others can fetch them after the
origin stopped. A chunk store plus a ref store; the ref ``<work name>/<path>`` holds the
manifest, written only after all its chunks are stored."""

from __future__ import annotations

import os
from pathlib import Path as FsPath

from cas import LocalChunkStore, Manifest, SeedSource
from cas.errors import FileChangedError
from cas.gc import GcReport, collect_garbage
from cas.leases import Leases
from cas.store import ChunkStore, LocalRefStore, RefStore
from cas.workspace import Workspace

#: Bytes of chunks read and stored per batch while persisting (bounds memory).
PERSIST_BATCH = 64 << 20


class ArtifactStore:
    """``chunks`` and ``refs`` hold the data; ``leases`` (a ref store of its own) keep
    garbage collection and persists apart (:mod:`cas.leases`)."""

    def __init__(self, chunks: ChunkStore, refs: RefStore, location: str, leases: RefStore) -> None:
        self.chunks = chunks
        self.refs = refs
        self.location = location
        self.lease_refs = leases
        self.leases = Leases(leases)

    @classmethod
    def open(cls, url: str | os.PathLike[str] | None, app_root: str | os.PathLike[str]) -> ArtifactStore:
        """``None``: a folder under the app root; a path: that folder; ``s3://bucket/prefix``:
        that prefix of an existing bucket (endpoint, credentials and region from the standard
        AWS environment variables and config files; ``AWS_ENDPOINT_URL`` for S3-compatible
        servers). The bucket is not created: a mistyped name raises StoreError instead of
        quietly starting an empty store."""
        if url is None:
            url = FsPath(app_root) / "artifacts"
        text = os.fspath(url)
        if text.startswith("s3://"):
            from cas.store.s3 import S3Bucket, S3ChunkStore, S3RefStore

            bucket, prefix = S3Bucket.from_url(text)
            try:  # one client and thread pool for the three stores
                return cls(S3ChunkStore(bucket, prefix + "chunks/"), S3RefStore(bucket, prefix + "refs/"),
                           bucket.url(prefix).rstrip("/"), S3RefStore(bucket, prefix + "leases/"))
            finally:
                bucket.release()
        if "://" in text and not text.startswith("file://"):
            raise ValueError(f"unsupported artifact store {text!r}: give a folder or s3://bucket/prefix")
        root = FsPath(text.removeprefix("file://")).absolute()
        return cls(LocalChunkStore(root / "chunks"), LocalRefStore(root / "refs"), str(root), LocalRefStore(root / "leases"))

    @staticmethod
    def ref_name(work: str, rel: str) -> str:
        return f"{work}/{rel}"

    def manifest(self, work: str, rel: str) -> Manifest | None:
        raw = self.refs.get(self.ref_name(work, rel))
        return Manifest.decode(raw) if raw is not None else None

    def persist(self, work: str, rel: str, root: str, workspace: Workspace, attempts: int = 3) -> Manifest | None:
        """Store the current tree at ``root`` as ``work``'s ``rel``: chunks the store lacks,
        then the manifest. None if nothing exists at ``root``.

        Runs under a shared lease, so a garbage collection never deletes a chunk this
        persist found present and relies on.
        """
        with self.leases.shared(f"persist of {work}/{rel}"):
            return self._persist(work, rel, root, workspace, attempts)

    def _persist(self, work: str, rel: str, root: str, workspace: Workspace, attempts: int) -> Manifest | None:
        for _ in range(attempts):
            if not os.path.lexists(root):
                return None
            m = workspace.snapshot(root)
            missing = sorted(m.chunk_ids() - self.chunks.has_many(m.chunk_ids()))
            seed = SeedSource(m, root)
            sizes = m.chunk_sizes()
            batch: list[bytes] = []
            size = 0
            for cid in missing:
                batch.append(cid)
                size += sizes[cid]
                if size >= PERSIST_BATCH:
                    self.chunks.put_many(seed.get_many(batch))
                    batch, size = [], 0
            self.chunks.put_many(seed.get_many(batch))
            if not seed.stale:
                self.refs.put(self.ref_name(work, rel), m.encode())
                return m
        raise FileChangedError(f"{root} kept changing while it was persisted ({attempts} attempts)", root)

    def gc(self, *, dry_run: bool = False, min_garbage: float = 0.2) -> GcReport:
        """Delete the chunks no persisted manifest names (see :func:`cas.gc.collect_garbage`)."""
        return collect_garbage(self.chunks, self.refs, self.leases, dry_run=dry_run, min_garbage=min_garbage)

    def close(self) -> None:
        self.chunks.close()
        self.refs.close()
        self.lease_refs.close()
