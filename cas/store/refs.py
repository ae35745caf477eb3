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

from ..errors import BadRefNameError, StoreError, UnsupportedVersionError
from ..fsutil import fsync_dir
from .base import Closable, Payload

MAGIC = b"CASR"
VERSION = 2
_HEAD = struct.Struct("<4sHI")  # magic, version, name length
_SUM = 32  # BLAKE3 of everything before it: a flipped bit must not silently rename a chunk


def encode(name: str, value: bytes) -> bytes:
    """The bytes of one ref (docs/format.md, "Ref store")."""
    enc = name.encode("utf-8", "surrogateescape")
    body = _HEAD.pack(MAGIC, VERSION, len(enc)) + enc + value
    return body + blake3.blake3(body).digest()


def check_ref_name(name: object) -> str:
    """``name`` if it is a name every ref store takes (a non-empty string), else
    BadRefNameError. One rule for every store, so a ref written to one can be copied to any."""
    if not isinstance(name, str):
        raise BadRefNameError(f"a ref name must be a str, not {type(name).__name__}")
    if not name:
        raise BadRefNameError("a ref name must not be empty")
    return name


class RefStore(Closable, ABC):
    """name -> bytes, each put atomic (a reader sees the old or the new value, whole).

    The public calls are written here once: each checks that the store is open and that the
    name is one every store takes (:func:`check_ref_name`); an implementation provides
    ``_get``, ``_put``, ``_delete`` and ``_names``. The conformance suite,
    :class:`cas.testing.RefStoreTests`, is the specification.
    """

    kind = "ref store"

    def get(self, name: str) -> bytes | None:
        """The value of ``name``, or None."""
        self._ensure_open()
        return self._get(check_ref_name(name))

    def put(self, name: str, value: Payload) -> None:
        """Set ``name`` to ``value`` (any bytes-like) durably, replacing any previous value."""
        self._ensure_open()
        self._put(check_ref_name(name), bytes(value))

    def delete(self, name: str) -> bool:
        """Remove ``name``; whether it existed."""
        self._ensure_open()
        return self._delete(check_ref_name(name))

    def names(self, prefix: str = "") -> Iterator[str]:
        """The names that start with ``prefix``. A ref that cannot be read raises StoreError,
        never silently left out: garbage collection must see every ref."""
        self._ensure_open()
        if not isinstance(prefix, str):
            raise BadRefNameError(f"a ref name prefix must be a str, not {type(prefix).__name__}")
        return self._names(prefix)

    @abstractmethod
    def _get(self, name: str) -> bytes | None: ...

    @abstractmethod
    def _put(self, name: str, value: bytes) -> None: ...

    @abstractmethod
    def _delete(self, name: str) -> bool: ...

    @abstractmethod
    def _names(self, prefix: str) -> Iterator[str]: ...


class LocalRefStore(RefStore):
    """One file per ref, ``<root>/<blake3(name) hex>``, replaced by write + fsync + rename."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = str(self.root)

    def _file(self, name: str) -> Path:
        return self.root / blake3.blake3(name.encode("utf-8", "surrogateescape")).hexdigest()

    def _get(self, name: str) -> bytes | None:
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

    def _put(self, name: str, value: bytes) -> None:
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

    def _delete(self, name: str) -> bool:
        try:
            self._file(name).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.root)
        return True

    def _names(self, prefix: str) -> Iterator[str]:
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

