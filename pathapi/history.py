"""The version history of persisted Paths: older manifests, kept so they can be browsed and
diffed after the ref ``<work>/<path>`` moved on.

A persisted ref holds only the newest tree. Each time a persist stores a tree whose manifest
differs from the newest one in the history, a history ref is added beside it:
``pathapi:history/<work>/<path>#<version>``, holding the persisted ref's value with a small
header (when it was persisted, its manifest id, the Path's ref name). Format "Version
history" in docs/format.md.

What is guaranteed:

- at most :data:`KEEP` entries per Path: adding one beyond that deletes the oldest;
- every entry's chunks stay in the store while the entry and its Path's ref exist: garbage
  collection reads history refs like any other ref (:meth:`pathapi.artifacts.ArtifactStore.gc`),
  so an older version stays downloadable until it falls out of the bounded log; the history
  of a Path whose ref was deleted is not live, and the collection deletes it;
- a history that cannot be written (a full disk) never fails the persist: the newest tree is
  still in its ref, and readers list it as a version of its own.

This module knows the names and the header; the persisted ref inside is opaque bytes here
(:mod:`pathapi.artifacts` decodes it), so either can change without the other.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cas.errors import ManifestError
from cas.header import read_header
from cas.store.refs import RefStore

from .version import Version

PREFIX = "pathapi:history/"
MAGIC = b"PHST"
FORMAT_VERSION = 1
#: magic, format version, persisted at (ns since the epoch), manifest id, length of the Path's ref name
_HEAD = struct.Struct("<4sHq32sI")
#: Versions kept per Path (older ones are deleted, and their chunks become garbage).
KEEP = 16


@dataclass(frozen=True)
class HistoryEntry:
    """One kept version of a Path: the ref holding it, its version, when it was persisted."""

    ref: str
    path_ref: str  # "<work>/<path>"
    version: Version


def ref_name(path_ref: str, version: Version) -> str:
    return f"{PREFIX}{path_ref}#{version}"


def parse_name(name: str) -> HistoryEntry | None:
    """The entry a history ref name stands for, or None for a name that is not one."""
    if not name.startswith(PREFIX):
        return None
    path_ref, sep, text = name[len(PREFIX):].rpartition("#")
    if not sep or not path_ref:
        return None
    try:
        return HistoryEntry(name, path_ref, Version.parse(text))
    except ValueError:
        return None


def encode(path_ref: str, persisted_ns: int, manifest_id: bytes, pref: bytes) -> bytes:
    name = path_ref.encode("utf-8", "surrogateescape")
    return _HEAD.pack(MAGIC, FORMAT_VERSION, persisted_ns, manifest_id, len(name)) + name + pref


def is_history(raw: bytes) -> bool:
    return raw[:4] == MAGIC


def decode(raw: bytes) -> tuple[int, bytes, bytes]:
    """(persisted at in ns, manifest id, the persisted ref's value); ManifestError if malformed."""
    return decode_full(raw)[1:]


def decode_full(raw: bytes) -> tuple[str, int, bytes, bytes]:
    """(the Path's ref name, persisted at in ns, manifest id, the persisted ref's value)."""
    at, mid, n = read_header(raw, _HEAD, MAGIC, FORMAT_VERSION, "history entry")
    if _HEAD.size + n > len(raw):
        raise ManifestError("history entry is truncated")
    name = raw[_HEAD.size:_HEAD.size + n].decode("utf-8", "surrogateescape")
    return name, at, mid, raw[_HEAD.size + n:]


def entries(refs: RefStore, path_ref: str | None = None) -> list[HistoryEntry]:
    """The kept versions of one Path (``"<work>/<path>"``), oldest first; of every Path when
    ``path_ref`` is None. One listing of the ref store."""
    prefix = PREFIX if path_ref is None else f"{PREFIX}{path_ref}#"
    found = [e for e in map(parse_name, refs.names(prefix)) if e is not None]
    if path_ref is not None:
        found = [e for e in found if e.path_ref == path_ref]  # "a#b" also starts with "a#"
    return sorted(found, key=lambda e: (e.path_ref, e.version))


def record(refs: RefStore, path_ref: str, version: Version, manifest_id: bytes, pref: bytes, persisted_ns: int,
           keep: int = KEEP) -> bool:
    """Add ``version`` of ``path_ref`` (its manifest id and persisted ref value) unless the
    newest entry already holds that manifest; then drop entries beyond ``keep``. Whether an
    entry was added. Call it after the persisted ref is written (its chunks are then live)."""
    kept = entries(refs, path_ref)
    if kept:
        raw = refs.get(kept[-1].ref)
        if raw is not None:
            try:
                if decode(raw)[1] == manifest_id:
                    return False
            except ManifestError:
                pass  # a damaged entry: a fresh one replaces it below
    refs.put(ref_name(path_ref, version), encode(path_ref, persisted_ns, manifest_id, pref))
    names = [e.ref for e in kept if e.version != version] + [ref_name(path_ref, version)]
    for old in names[:max(0, len(names) - keep)]:
        refs.delete(old)
    return True


def orphans(refs: RefStore) -> list[str]:
    """History refs whose Path's ref no longer exists (a deleted Path's old versions)."""
    alive: dict[str, bool] = {}
    out = []
    for e in entries(refs):
        if e.path_ref not in alive:
            alive[e.path_ref] = refs.get(e.path_ref) is not None
        if not alive[e.path_ref]:
            out.append(e.ref)
    return out
