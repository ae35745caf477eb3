"""Chunk stores: the interface and its implementations."""

from .base import ChunkSource, ChunkStore, Payload
from .local import LocalChunkStore
from .memory import MemoryChunkStore

__all__ = ["ChunkSource", "ChunkStore", "LocalChunkStore", "MemoryChunkStore", "Payload"]
