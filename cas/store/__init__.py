"""Chunk stores: the interface and its implementations."""

from typing import Any

from .base import ChunkSource, ChunkStore, Payload
from .local import LocalChunkStore
from .memory import MemoryChunkStore
from .refs import LocalRefStore, RefStore

__all__ = ["ChunkSource", "ChunkStore", "LocalChunkStore", "LocalRefStore", "MemoryChunkStore", "Payload", "RefStore",
           "S3Bucket", "S3ChunkStore", "S3RefStore"]

_S3 = {"S3Bucket", "S3ChunkStore", "S3RefStore"}


def __getattr__(name: str) -> Any:
    # The S3 stores load boto3 (optional, slow to import) only when first used.
    if name in _S3:
        from . import s3

        return getattr(s3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
