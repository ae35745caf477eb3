"""Ref stores: named, replaceable pointers to manifests (name -> encoded manifest).

Chunks are immutable and named by content; refs are the only mutable thing in a repository.
A ref is written only after every chunk its manifest names is in the chunk store, so a
reader that finds a ref can fetch the whole tree.
"""

from __future__ import annotations

import os
import secrets
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import blake3

from ..errors import StoreError, UnsupportedVersionError
from ..fsutil import fsync_dir

MAGIC = b"CASR"
VERSION = 2
_HEAD = struct.Struct("<4sHI")  # magic, version, name length
_SUM = 32  # BLAKE3 of everything before it: a flipped bit must not silently rename a chunk


def encode(name: str, value: bytes) -> bytes:
    """The bytes of one ref (docs/format.md, "Ref store")."""
    enc = name.encode("utf-8", "surrogateescape")
    body = _HEAD.pack(MAGIC, VERSION, len(enc)) + enc + value
    return body + blake3.blake3(body).digest()


class RefStore(ABC):
    """name -> bytes, each put atomic (a reader sees the old or the new value, whole)."""

    location: str = ""

    @abstractmethod
    def get(self, name: str) -> bytes | None:
        """The value of ``name``, or None."""

    @abstractmethod
    def put(self, name: str, value: bytes) -> None:
        """Set ``name`` to ``value`` durably, replacing any previous value."""

    @abstractmethod
    def delete(self, name: str) -> bool:
        """Remove ``name``; whether it existed."""

    @abstractmethod
    def names(self, prefix: str = "") -> Iterator[str]:
        """The names that start with ``prefix``. A ref that cannot be read raises StoreError,
        never silently left out: garbage collection must see every ref."""

    def close(self) -> None:  # noqa: B027  (optional to override)
        """Release resources. The default does nothing."""


class LocalRefStore(RefStore):
    """One file per ref, ``<root>/<blake3(name) hex>``, replaced by write + fsync + rename."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = str(self.root)

    def _file(self, name: str) -> Path:
        return self.root / blake3.blake3(name.encode("utf-8", "surrogateescape")).hexdigest()

    def get(self, name: str) -> bytes | None:
        try:
            raw = self._file(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:  # a folder in its place, no permission...
            raise StoreError(f"cannot read ref {name!r} from {self._file(name)}: {e}", self.location) from e
        got, value = decode(raw, str(self._file(name)))
        if got != name:
            raise StoreError(f"ref file {self._file(name)} holds {got!r}, not {name!r}", self.location)
        return value

    def put(self, name: str, value: bytes) -> None:
        tmp = self.root / f".tmp-{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as f:
                f.write(encode(name, value))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._file(name))
            fsync_dir(self.root)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write ref {name!r} in {self.location}: {e}", self.location) from e

    def delete(self, name: str) -> bool:
        try:
            self._file(name).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.root)
        return True

    def names(self, prefix: str = "") -> Iterator[str]:
        """Names starting with ``prefix``; StoreError if a ref file is damaged."""
        for f in sorted(self.root.iterdir()):
            if f.name.startswith("."):
                continue
            try:
                name, _ = decode(f.read_bytes(), str(f))
            except FileNotFoundError:
                continue  # deleted since the listing
            except OSError as e:
                raise StoreError(f"cannot read ref file {f}: {e}", self.location) from e
            # A damaged ref raises: skipping it would hide it from garbage collection, which
            # would then delete the chunks it names.
            if name.startswith(prefix):
                yield name


def decode(raw: bytes, where: str) -> tuple[str, bytes]:
    """(name, value) of one encoded ref; StoreError if it is not whole and intact."""
    if len(raw) < _HEAD.size:
        raise StoreError(f"ref file {where} is truncated", where)
    magic, version, n = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise StoreError(f"{where} is not a ref file", where)
    if version != VERSION:
        raise UnsupportedVersionError(f"ref file {where} has version {version}, this reads {VERSION}")
    if _HEAD.size + n + _SUM > len(raw):
        raise StoreError(f"ref file {where} is truncated", where)
    body = memoryview(raw)[: len(raw) - _SUM]
    if blake3.blake3(body).digest() != raw[len(raw) - _SUM :]:
        raise StoreError(f"ref file {where} is damaged (checksum mismatch)", where)
    return bytes(body[_HEAD.size : _HEAD.size + n]).decode("utf-8", "surrogateescape"), bytes(body[_HEAD.size + n :])

