"""cas: a content-addressed store for trees of files.

Snapshot a tree into a manifest of BLAKE3-named, content-defined chunks; keep chunks in
stores; plan what a receiver lacks; materialize a tree from any chunk sources, crash-safely.
cas knows nothing of works or apps (that is :mod:`pathapi`).
"""

from .chunking import DEFAULT_PARAMS, Chunker, ChunkerParams
from .errors import (
    CasError,
    ChunkCorruptError,
    ChunkError,
    ChunkNotFoundError,
    FileChangedError,
    ManifestError,
    MaterializeError,
    SnapshotError,
    StoreError,
    UnsafePathError,
    UnsupportedVersionError,
)
from .hashing import ChunkId, chunk_id
from .manifest import Entry, Kind, Manifest
from .materialize import MaterializeResult, materialize, recover
from .plan import FetchPlan, UpdatePlan, plan_fetch, plan_update
from .repository import Pushed, Repository
from .snapshot import snapshot
from .sources import SeedSource
from .statcache import StatCache
from .store import ChunkSource, ChunkStore, LocalChunkStore, LocalRefStore, MemoryChunkStore, RefStore
from .workspace import Workspace

__all__ = [
    "DEFAULT_PARAMS", "CasError", "ChunkCorruptError", "ChunkError", "ChunkId",
    "ChunkNotFoundError", "ChunkSource", "ChunkStore", "Chunker", "ChunkerParams", "Entry",
    "FetchPlan", "FileChangedError", "Kind", "LocalChunkStore", "LocalRefStore", "Manifest", "ManifestError",
    "MaterializeError", "MaterializeResult", "MemoryChunkStore", "Pushed", "RefStore", "Repository", "SeedSource",
    "SnapshotError", "StatCache", "StoreError", "UnsafePathError", "UnsupportedVersionError", "UpdatePlan",
    "Workspace", "chunk_id", "materialize", "plan_fetch", "plan_update", "recover", "snapshot",
]
