"""Chunk stores: the interface and its implementations."""

from .base import ChunkSource, ChunkStore, Payload
from .local import LocalChunkStore
from .memory import MemoryChunkStore
from .refs import LocalRefStore, RefStore

__all__ = ["ChunkSource", "ChunkStore", "LocalChunkStore", "LocalRefStore", "MemoryChunkStore", "Payload", "RefStore"]
