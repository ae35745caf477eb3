"""Refs in an S3 bucket: one object per ref, in the local ref files' encoding.

Layout under a ref store's prefix (docs/format.md, "S3 store layout")::

    <prefix><escaped name>         the ref's CASR encoding (name, value, BLAKE3 checksum)
    <prefix>%%<BLAKE3 of the name>  the same, for a name whose escaped key would be too long

A put is one atomic PUT, so a reader sees the old or the new value, whole; the name inside
the object is checked on every read, so a key that somehow holds another ref is an error,
never a wrong value.
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import blake3

from ...errors import StoreError
from ..refs import RefStore
from ..refs import decode as decode_ref
from ..refs import encode as encode_ref
from .bucket import S3Bucket, _norm_prefix

__all__ = ["S3RefStore", "decode_ref_name", "encode_ref_name"]

_MAX_KEY_BYTES = 1024  # S3's limit on a key's UTF-8 length

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_HASHED = "%%"  # key prefix of refs whose escaped name would be too long (escapes never make "%%")


def encode_ref_name(name: str) -> str:
    """The key suffix of ref ``name``: its UTF-8 bytes, those outside ``[A-Za-z0-9._-]``
    (and a leading ``.``) written ``%XX``. One segment (no ``/`` left), never ``.`` or ``..``,
    and prefix-preserving: the names starting with P are the keys starting with enc(P)."""
    raw = name.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in _SAFE and not (i == 0 and b == 0x2E) else f"%{b:02X}" for i, b in enumerate(raw))


def decode_ref_name(text: str) -> str:
    return urllib.parse.unquote_to_bytes(text).decode("utf-8", "surrogateescape")


class S3RefStore(RefStore):
    """One object per ref, ``<prefix><escaped name>``, holding the ref's CASR encoding (the
    local ref files' format: name, value, BLAKE3 checksum). A put is one atomic PUT; a
    name too long for an S3 key is stored under ``<prefix>%%<BLAKE3 of the name>``."""

    def __init__(self, bucket: S3Bucket, prefix: str) -> None:
        self.bucket = bucket.retain()
        self.prefix = _norm_prefix(prefix)
        self.location = bucket.url(self.prefix).rstrip("/")
        self._lock = threading.Lock()

    @classmethod
    def open(cls, url: str, **kwargs: Any) -> S3RefStore:
        bucket, prefix = S3Bucket.from_url(url, **kwargs)
        try:
            return cls(bucket, prefix)
        finally:
            bucket.release()

    def _key(self, name: str) -> str:
        key = self.prefix + encode_ref_name(name)
        if len(key.encode()) > _MAX_KEY_BYTES:
            key = self.prefix + _HASHED + blake3.blake3(name.encode("utf-8", "surrogateescape")).hexdigest()
        return key

    def _get(self, name: str) -> bytes | None:
        key = self._key(name)
        got = self.bucket.get(key)
        if got is None:
            return None
        stored, value = decode_ref(got[0], self.bucket.url(key))
        if stored != name:
            raise StoreError(f"ref object {self.bucket.url(key)} holds {stored!r}, not {name!r}", self.location)
        return value

    def _put(self, name: str, value: bytes) -> None:
        self.bucket.put(self._key(name), encode_ref(name, value))

    def _delete(self, name: str) -> bool:
        key = self._key(name)
        if not self.bucket.head(key):
            return False
        self.bucket.delete([key])
        return True

    def _names(self, prefix: str) -> Iterator[str]:
        for obj in self.bucket.objects(self.prefix + encode_ref_name(prefix)):
            text = obj.key[len(self.prefix) :]
            if text and not text.startswith(_HASHED):
                yield decode_ref_name(text)
        for obj in self.bucket.objects(self.prefix + _HASHED):
            got = self.bucket.get(obj.key)
            if got is not None:
                name, _ = decode_ref(got[0], self.bucket.url(obj.key))
                if name.startswith(prefix):
                    yield name

    def _release(self) -> None:
        self.bucket.release()
