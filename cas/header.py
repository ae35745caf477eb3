"""The fixed header versioned records start with: a magic, then a format version.

pathapi's persisted refs, history entries and Drive indexes (docs/format.md) each open with
a struct whose first two fields are a 4-byte magic and a u16 version. :func:`read_header` checks
those the same way for all of them, so a short, foreign or newer record is refused with
the same errors everywhere: :class:`~cas.errors.ManifestError` for bytes that are not such a
record, :class:`~cas.errors.UnsupportedVersionError` for a version this code does not read
(garbage collection stops on either before it deletes anything).
"""

from __future__ import annotations

import struct
from typing import Any

from .errors import ManifestError, UnsupportedVersionError


def read_header(raw: bytes | bytearray | memoryview, head: struct.Struct, magic: bytes, version: int,
                what: str) -> tuple[Any, ...]:
    """The fields of ``head`` after its magic and version, unpacked from the start of ``raw``
    (a ``what``: named in the errors)."""
    if len(raw) < head.size:
        raise ManifestError(f"{what} of {len(raw)} bytes is shorter than its header")
    found, found_version, *rest = head.unpack_from(raw)
    if found != magic:
        raise ManifestError(f"{what} starts with {found!r}, not {magic!r}")
    if found_version != version:
        raise UnsupportedVersionError(f"{what} format {found_version} is not supported (this version reads {version})")
    return tuple(rest)
