"""A Drive's index: one ref that holds, per component, the tree of everything it put.

The whole state of one Drive is one value (format "Drive index" in docs/format.md), so:

- ``list`` and ``get`` cost one ref read, whatever else the store holds;
- a put or a delete is one atomic replace of that value (under the ref's mutex, see
  :meth:`cas.repository.Repository.swap`), so a reader sees the state before it or after it,
  never half of it, and two works changing the Drive at once never lose each other's entries;
- garbage collection keeps what the Drive needs by decoding this one value
  (:meth:`DriveIndex.chunk_ids`).

A component's *space* is a directory manifest whose paths are the paths the component put,
relative to its work's root (``a.txt``, ``data/b.bin``). Putting ``rel`` replaces whatever the
space held at ``rel`` (and below it) by the new tree; deleting ``rel`` removes it and the
folders that it leaves empty. A component whose space becomes empty leaves the index.

Pure: no I/O here; :mod:`pathapi.drive` reads and writes the ref.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from cas.errors import ManifestError
from cas.hashing import ChunkId
from cas.header import read_header
from cas.manifest import Entry, Kind, Manifest

MAGIC = b"PDRV"
VERSION = 1
_HEAD = struct.Struct("<4sHHQI")  # magic, version, reserved, generation, component count
_NAME = struct.Struct("<H")
_SPACE = struct.Struct("<qI")  # updated (unix ns), manifest length
#: Longest component name (a work's attribute path from the root flow) the index holds.
MAX_NAME_BYTES = 4096


@dataclass(frozen=True)
class Space:
    """What one component has in the Drive: a folder tree, and when it last changed it."""

    manifest: Manifest
    updated_ns: int


def check_component(name: str) -> bytes:
    """The UTF-8 of a component name the index can hold (non-empty, no ``/`` or NUL), else
    ManifestError: the name becomes a folder name wherever the Drive is shown as one tree."""
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"drive component name {name!r} is not UTF-8") from None
    if not raw or len(raw) > MAX_NAME_BYTES or "/" in name or "\x00" in name or name in (".", ".."):
        raise ManifestError(f"{name!r} cannot name a component of a drive (non-empty, no '/' or NUL, not . or ..)")
    return raw


@dataclass(frozen=True)
class DriveIndex:
    """The decoded index: component name -> :class:`Space`; ``generation`` counts changes."""

    spaces: Mapping[str, Space] = field(default_factory=dict)
    generation: int = 0

    # -- encoding ----------------------------------------------------------------------
    def encode(self) -> bytes:
        out = [_HEAD.pack(MAGIC, VERSION, 0, self.generation, len(self.spaces))]
        for name in sorted(self.spaces, key=lambda n: n.encode("utf-8")):
            raw = check_component(name)
            space = self.spaces[name]
            m = space.manifest.encode()
            out += [_NAME.pack(len(raw)), raw, _SPACE.pack(space.updated_ns, len(m)), m]
        return b"".join(out)

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview) -> DriveIndex:
        """Parse and validate an index (every manifest in it included): ManifestError, or
        UnsupportedVersionError for a version this code does not read."""
        data = bytes(raw)
        reserved, generation, count = read_header(data, _HEAD, MAGIC, VERSION, "drive index")
        if reserved:
            raise ManifestError(f"drive index has reserved field {reserved}, not 0")
        pos = _HEAD.size
        spaces: dict[str, Space] = {}
        prev = b""
        for _ in range(count):
            (n,) = _NAME.unpack_from(_take(data, pos, _NAME.size))
            pos += _NAME.size
            name_raw = _take(data, pos, n)
            pos += n
            if spaces and name_raw <= prev:
                raise ManifestError("drive index components are not strictly sorted")
            prev = name_raw
            try:
                name = name_raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ManifestError("drive index has a component name that is not UTF-8") from None
            check_component(name)
            updated, length = _SPACE.unpack_from(_take(data, pos, _SPACE.size))
            pos += _SPACE.size
            m = Manifest.decode(_take(data, pos, length))
            pos += length
            if m.root_kind != Kind.DIR or not m.entries:
                raise ManifestError(f"drive index: the space of {name!r} is not a non-empty folder tree")
            spaces[name] = Space(m, updated)
        if pos != len(data):
            raise ManifestError(f"drive index has {len(data) - pos} bytes after its last component")
        return cls(spaces, generation)

    # -- what garbage collection keeps -------------------------------------------------
    def chunk_ids(self) -> set[ChunkId]:
        """Every chunk some component's files need."""
        out: set[ChunkId] = set()
        for space in self.spaces.values():
            out |= space.manifest.chunk_ids()
        return out

    # -- changes (each returns a new index) --------------------------------------------
    def with_put(self, component: str, rel: str, tree: Manifest, now_ns: int) -> DriveIndex:
        """``component`` put ``tree`` at ``rel``: its space holds ``tree`` there instead of
        whatever it held at or below ``rel``. ``self`` if that changes nothing."""
        check_component(component)
        old = self.spaces.get(component)
        m = put_tree(old.manifest if old is not None else None, rel, tree)
        if old is not None and old.manifest == m:
            return self
        return self._with(component, Space(m, now_ns))

    def without(self, component: str, rel: str, now_ns: int) -> DriveIndex | None:
        """``component``'s space without what it holds at ``rel``; None if it holds nothing there."""
        old = self.spaces.get(component)
        if old is None:
            return None
        m = remove_tree(old.manifest, rel)
        if m is None:
            return None
        return self._with(component, Space(m, now_ns) if m.entries else None)

    def _with(self, component: str, space: Space | None) -> DriveIndex:
        spaces = dict(self.spaces)
        if space is None:
            spaces.pop(component, None)
        else:
            spaces[component] = space
        return DriveIndex(spaces, self.generation + 1)


def put_tree(space: Manifest | None, rel: str, tree: Manifest) -> Manifest:
    """``space`` (a folder tree, or None for an empty one) with ``tree`` at ``rel``: entries at
    and below ``rel`` are replaced, a file or link where a folder on the way must be is
    replaced by that folder, and missing folders on the way are added (mode not recorded)."""
    if space is not None and space.params != tree.params:
        raise ManifestError(f"cannot put a tree cut with {tree.params} into a drive space cut with {space.params}")
    parts = rel.split("/")
    ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
    prefix = rel + "/"
    kept: list[Entry] = []
    for e in space.entries if space is not None else ():
        if e.path == rel or e.path.startswith(prefix):
            continue
        if e.kind != Kind.DIR and e.path in ancestors:
            continue
        kept.append(e)
    have = {e.path for e in kept}
    kept += [Entry(a, Kind.DIR) for a in ancestors if a not in have]
    if tree.root_kind == Kind.FILE:
        kept.append(dataclasses.replace(tree.entries[0], path=rel))
    else:
        kept.append(Entry(rel, Kind.DIR, mode=tree.root_mode))
        kept += [dataclasses.replace(e, path=prefix + e.path) for e in tree.entries]
    return Manifest.build(tree.params, Kind.DIR, kept, root_mode=space.root_mode if space is not None else None)


def remove_tree(space: Manifest, rel: str) -> Manifest | None:
    """``space`` without its entries at and below ``rel``, and without the folders above
    ``rel`` that this leaves empty; None if nothing is at ``rel``."""
    prefix = rel + "/"
    kept = [e for e in space.entries if not (e.path == rel or e.path.startswith(prefix))]
    if len(kept) == len(space.entries):
        return None
    paths = {e.path for e in kept}
    parts = rel.split("/")
    for i in range(len(parts) - 1, 0, -1):
        folder = "/".join(parts[:i])
        if any(p.startswith(folder + "/") for p in paths):
            break
        paths.discard(folder)
    return Manifest.build(space.params, Kind.DIR, [e for e in kept if e.path in paths], root_mode=space.root_mode)


def _take(data: bytes, pos: int, n: int) -> bytes:
    if pos + n > len(data):
        raise ManifestError(f"drive index is truncated (needs {pos + n} bytes, has {len(data)})")
    return data[pos:pos + n]
