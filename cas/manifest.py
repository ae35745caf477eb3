"""Manifests: the tree of a snapshot (files, directories, symlinks) and its canonical encoding.

A manifest is a value: built once, validated once, never mutated. Its encoding is canonical
(one byte string per tree), so its id, BLAKE3 of that encoding, names the tree: equal trees
have equal ids. The format is specified in ``docs/format.md`` (section "Manifest"); keep the
two in step and bump ``VERSION`` on any change.

Validation is part of decoding: a manifest that decodes is safe to materialize (no entry
leaves the root, no symlink resolves outside it, parents precede children, sizes add up).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cached_property

import blake3

from .chunking import RECORD_SIZE, ChunkerParams, iter_chunks, pack_chunks
from .errors import ManifestError, UnsafePathError, UnsupportedVersionError
from .hashing import ChunkId

MAGIC = b"CASM"
#: Version 2 records mode bits (files, folders, the root folder); version 1 is still read.
VERSION = 2
READABLE_VERSIONS = (1, 2)

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_SYMLINK_HOPS = 40

_HEADER = struct.Struct("<4sHBIIIBI")  # magic, version, algorithm, min, avg, max, root kind, count
_ROOT_MODE = struct.Struct("<H")  # version 2: the root folder's mode (after the header)
_ENTRY = struct.Struct("<BBH")  # version 1: kind, flags, path length
_ENTRY_V2 = struct.Struct("<BBHH")  # version 2: kind, flags, path length, mode
_FILE = struct.Struct("<QI")  # size, chunk count
_LINK = struct.Struct("<H")  # target length
_LEN = struct.Struct("<I")

FLAG_EXECUTABLE = 0x01
#: The mode of an entry that records none (a symlink; anything decoded from version 1).
NO_MODE = 0xFFFF
#: The permission bits a manifest carries: rwx for user, group and other. setuid, setgid and
#: sticky bits are never recorded (a receiver must not grant them).
MODE_BITS = 0o777
DEFAULT_FILE_MODE = 0o644
DEFAULT_EXEC_MODE = 0o755
DEFAULT_DIR_MODE = 0o755

_ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class Kind(IntEnum):
    DIR = 0
    FILE = 1
    SYMLINK = 2


_KINDS = frozenset(Kind)
_KIND_OF = {int(k): k for k in Kind}  # a dict lookup: Kind(n) costs ~1 us per entry


@dataclass(frozen=True, slots=True)
class Entry:
    """One node of the tree. ``path`` is relative POSIX; ``""`` is the root itself.

    Files carry ``size`` and ``chunks`` (a packed chunk list, see :mod:`cas.chunking`);
    symlinks carry ``target`` (relative, resolving inside the root). Files and folders may
    carry ``mode``, their permission bits (``MODE_BITS``); None where none was recorded, which
    materializes as the defaults (0644, 0755 when ``executable``, 0755 for a folder). A file's
    ``executable`` is its owner's x bit.
    """

    path: str
    kind: Kind
    executable: bool = False
    size: int = 0
    chunks: bytes = b""
    target: str = ""
    mode: int | None = None

    @property
    def perm(self) -> int:
        """The permission bits to give this file or folder (its mode, or the default)."""
        if self.mode is not None:
            return self.mode
        if self.kind == Kind.DIR:
            return DEFAULT_DIR_MODE
        return DEFAULT_EXEC_MODE if self.executable else DEFAULT_FILE_MODE

    def chunk_refs(self) -> list[tuple[ChunkId, int]]:
        return list(iter_chunks(self.chunks))

    @property
    def chunk_count(self) -> int:
        return len(self.chunks) // RECORD_SIZE

    def same_content(self, other: Entry) -> bool:
        """Equal in everything materialize writes (kind, bytes, mode, link target)."""
        return (
            self.kind == other.kind
            and (self.kind == Kind.SYMLINK or self.perm == other.perm)
            and self.chunks == other.chunks
            and self.target == other.target
        )


@dataclass(frozen=True)
class Manifest:
    """A validated tree. Build with :meth:`build` or :meth:`decode`, never by hand."""

    params: ChunkerParams
    root_kind: Kind
    entries: tuple[Entry, ...]
    _encoded: bytes = field(repr=False, compare=False)
    #: A folder tree's root folder mode (None: not recorded, materialized as 0755).
    root_mode: int | None = None

    # -- construction ------------------------------------------------------------
    @classmethod
    def build(cls, params: ChunkerParams, root_kind: Kind, entries: list[Entry],
              root_mode: int | None = None) -> Manifest:
        """Sort, validate and encode ``entries`` (UnsafePathError/ManifestError if not valid)."""
        ordered = tuple(sorted(entries, key=lambda e: e.path.encode("utf-8", "surrogateescape")))
        if root_kind != Kind.DIR:
            root_mode = None
        _check_mode("the root folder", root_mode)
        encoded = _encode(params, root_kind, ordered, root_mode)
        # The checks a receiver runs after parsing (what parsing itself checks, _encode
        # enforces: UTF-8, field ranges); re-parsing our own bytes would cost a third of a
        # snapshot of many small cached files.
        _validate(root_kind, ordered, params)
        return cls(params, Kind(root_kind), ordered, encoded, root_mode)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Manifest:
        """Parse and validate an encoded manifest; :class:`ManifestError` on anything wrong."""
        data = bytes(data)
        params, root_kind, entries, root_mode = _decode(data)
        _validate(root_kind, entries, params)
        return cls(params, root_kind, entries, data, root_mode)

    @property
    def root_perm(self) -> int:
        """The permission bits of a folder tree's root folder (its mode, or 0755)."""
        return DEFAULT_DIR_MODE if self.root_mode is None else self.root_mode

    def encode(self) -> bytes:
        return self._encoded

    # -- identity ----------------------------------------------------------------
    @cached_property
    def id(self) -> bytes:
        return blake3.blake3(self._encoded).digest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and self._encoded == other._encoded

    def __hash__(self) -> int:
        return hash(self._encoded)

    # -- queries -----------------------------------------------------------------
    @cached_property
    def by_path(self) -> Mapping[str, Entry]:
        return {e.path: e for e in self.entries}

    def files(self) -> Iterator[Entry]:
        return (e for e in self.entries if e.kind == Kind.FILE)

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files())

    def chunk_ids(self) -> set[ChunkId]:
        return set(self._chunk_sizes)

    def chunk_sizes(self) -> dict[ChunkId, int]:
        """Chunk id -> length, in order of first use (a new dict: callers may change it)."""
        return dict(self._chunk_sizes)

    @cached_property
    def _chunk_sizes(self) -> dict[ChunkId, int]:
        # Asked for several times per transfer (planning, the remote source, the record):
        # built once per manifest.
        return {cid: n for e in self.files() for cid, n in iter_chunks(e.chunks)}

    def __repr__(self) -> str:
        return (
            f"Manifest(id={self.id.hex()[:16]}, root={self.root_kind.name}, "
            f"entries={len(self.entries)}, bytes={self.total_size})"
        )


def file_entry(path: str, refs: list[tuple[ChunkId, int]], executable: bool = False) -> Entry:
    """A file entry from (id, length) pairs; its size is their sum."""
    return Entry(path, Kind.FILE, executable, sum(n for _, n in refs), pack_chunks(refs))


# -- encoding ---------------------------------------------------------------------
def _encode(params: ChunkerParams, root_kind: Kind, entries: tuple[Entry, ...], root_mode: int | None) -> bytes:
    out = [
        _HEADER.pack(
            MAGIC, VERSION, params.algorithm, params.min_size, params.avg_size,
            params.max_size, int(root_kind), len(entries),
        ),
        _ROOT_MODE.pack(NO_MODE if root_mode is None else root_mode),
    ]
    for e in entries:
        path = _utf8(e.path)
        try:
            mode = NO_MODE if e.mode is None else e.mode
            out.append(_ENTRY_V2.pack(int(e.kind), FLAG_EXECUTABLE if e.executable else 0, len(path), mode))
            out.append(path)
            if e.kind == Kind.FILE:
                if len(e.chunks) % RECORD_SIZE:
                    raise ManifestError(f"{e.path!r}: chunk list is not whole records")
                out.append(_FILE.pack(e.size, len(e.chunks) // RECORD_SIZE))
                out.append(e.chunks)
            elif e.kind == Kind.SYMLINK:
                target = _utf8(e.target)
                out.append(_LINK.pack(len(target)))
                out.append(target)
        except struct.error as err:  # a path, target or size too large (or negative) to encode
            raise ManifestError(f"{e.path[:80]!r}: cannot encode entry: {err}") from None
    return b"".join(out)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"name is not valid UTF-8: {text!r}") from None


def _decode(data: bytes) -> tuple[ChunkerParams, Kind, tuple[Entry, ...], int | None]:
    if len(data) < _HEADER.size:
        raise ManifestError(f"manifest truncated: {len(data)} bytes, header needs {_HEADER.size}")
    magic, version, algo, mn, avg, mx, root, count = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise ManifestError(f"not a manifest (magic {magic!r}, want {MAGIC!r})")
    if version not in READABLE_VERSIONS:
        raise UnsupportedVersionError(
            f"manifest format version {version} is not supported (this reads {', '.join(map(str, READABLE_VERSIONS))})")
    try:
        params = ChunkerParams(algo, mn, avg, mx)
        root_kind = Kind(root)
    except ValueError as e:
        raise ManifestError(f"bad manifest header: {e}") from None
    if root_kind == Kind.SYMLINK:
        raise ManifestError("manifest root cannot be a symlink")
    pos = _HEADER.size
    root_mode: int | None = None
    entry_head = _ENTRY
    if version >= 2:
        if len(data) < pos + _ROOT_MODE.size:
            raise ManifestError(f"manifest truncated: {len(data)} bytes, header needs {pos + _ROOT_MODE.size}")
        (raw_root,) = _ROOT_MODE.unpack_from(data, pos)
        pos += _ROOT_MODE.size
        root_mode = _mode_of(raw_root, "the root folder")
        if root_mode is not None and root_kind != Kind.DIR:
            raise ManifestError("a file manifest records no root folder mode")
        entry_head = _ENTRY_V2
    # Every entry takes at least entry_head.size bytes: refuse absurd counts before allocating.
    if count > (len(data) - pos) // entry_head.size:
        raise ManifestError(f"manifest declares {count} entries but has only {len(data)} bytes")
    entries: list[Entry] = []
    try:
        for _ in range(count):
            if version >= 2:
                kind_no, flags, plen, raw_mode = _ENTRY_V2.unpack_from(data, pos)
            else:
                kind_no, flags, plen = _ENTRY.unpack_from(data, pos)
                raw_mode = NO_MODE
            pos += entry_head.size
            path = _take(data, pos, plen).decode("utf-8")
            mode = _mode_of(raw_mode, repr(path))
            pos += plen
            kind = _KIND_OF.get(kind_no)
            if kind is None:
                raise ManifestError(f"bad manifest entry at byte {pos}: {kind_no} is not a valid Kind")
            if flags & ~FLAG_EXECUTABLE:
                raise ManifestError(f"{path!r}: unknown flags {flags:#x}")
            if kind == Kind.FILE:
                size, nchunks = _FILE.unpack_from(data, pos)
                pos += _FILE.size
                chunks = _take(data, pos, nchunks * RECORD_SIZE)
                pos += len(chunks)
                entries.append(Entry(path, kind, bool(flags & FLAG_EXECUTABLE), size, chunks, mode=mode))
            elif kind == Kind.SYMLINK:
                if flags or mode is not None:
                    raise ManifestError(f"{path!r}: a symlink carries no flags and no mode")
                (tlen,) = _LINK.unpack_from(data, pos)
                pos += _LINK.size
                target = _take(data, pos, tlen).decode("utf-8")
                pos += tlen
                entries.append(Entry(path, kind, target=target))
            else:
                if flags:
                    raise ManifestError(f"{path!r}: a directory carries no flags")
                entries.append(Entry(path, kind, mode=mode))
    except struct.error:
        raise ManifestError(f"manifest truncated at byte {pos} of {len(data)}") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest has a name that is not UTF-8: {e}") from None
    except ValueError as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError(f"bad manifest entry at byte {pos}: {e}") from None
    if pos != len(data):
        raise ManifestError(f"manifest has {len(data) - pos} trailing bytes")
    return params, root_kind, tuple(entries), root_mode


def _mode_of(raw: int, what: str) -> int | None:
    if raw == NO_MODE:
        return None
    if raw & ~MODE_BITS:
        raise ManifestError(f"{what}: mode {raw:#o} has bits beyond {MODE_BITS:#o}")
    return raw


def _check_mode(what: str, mode: int | None) -> None:
    if mode is not None and (not isinstance(mode, int) or isinstance(mode, bool) or mode & ~MODE_BITS or mode < 0):
        raise ManifestError(f"{what}: mode {mode!r} is not permission bits within {MODE_BITS:#o}")


def _take(data: bytes, pos: int, n: int) -> bytes:
    if pos + n > len(data):
        raise ManifestError(f"manifest truncated: needs {n} bytes at {pos}, has {len(data) - pos}")
    return data[pos : pos + n]


# -- validation -------------------------------------------------------------------
def check_relpath(path: str) -> list[str]:
    """Components of a safe relative POSIX path; :class:`UnsafePathError` otherwise."""
    if not path:
        raise UnsafePathError("empty path", path)
    if path.startswith("/") or (len(path) > 1 and path[1] == ":" and path[0] in _ASCII_LETTERS):
        raise UnsafePathError(f"absolute path {path!r} in manifest", path)
    if "\x00" in path or "\\" in path:
        raise UnsafePathError(f"path {path!r} contains a NUL or a backslash", path)
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise UnsafePathError(f"path longer than {MAX_PATH_BYTES} bytes: {path[:80]!r}...", path)
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePathError(f"path {path!r} has a {part or 'empty'!r} component", path)
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise UnsafePathError(f"name longer than {MAX_NAME_BYTES} bytes in {path!r}", path)
    return parts


def plain_name(name: str, top: bool = False) -> bool:
    """Whether ``name`` is a path component :func:`check_relpath` accepts (``top``: the
    first component of a path), by a quick test that holds for nearly every real name: ASCII,
    1 to 255 characters, not ``.`` or ``..``, no NUL or backslash (and no ``/``), no drive
    letter. False means "not known to be plain": ask :func:`check_relpath`."""
    return (
        name.isascii()
        and 0 < len(name) <= MAX_NAME_BYTES
        and name != "."
        and name != ".."
        and "/" not in name
        and "\x00" not in name
        and "\\" not in name
        and not (top and len(name) > 1 and name[1] == ":" and name[0] in _ASCII_LETTERS)
    )


def _validate(root_kind: Kind, entries: tuple[Entry, ...], params: ChunkerParams) -> None:
    if root_kind not in (Kind.DIR, Kind.FILE):
        raise ManifestError(f"manifest root must be a directory or a file, not {root_kind!r}")
    if root_kind == Kind.FILE:
        if len(entries) != 1 or entries[0].path != "" or entries[0].kind != Kind.FILE:
            raise ManifestError("a file manifest holds exactly one file entry, with path ''")
    kinds: dict[str, Kind] = {}
    prev = b""
    for i, e in enumerate(entries):
        key = e.path.encode("utf-8", "surrogateescape")
        if i and key <= prev:
            what = "duplicate" if key == prev else "out-of-order"
            raise ManifestError(f"{what} entry {e.path!r} (entries must be strictly sorted)")
        prev = key
        if root_kind == Kind.DIR:
            # Fast path: a parent that is a directory entry passed these checks already, so
            # only the last name (and the whole length) is new. Anything else: the full check.
            parent, sep, name = e.path.rpartition("/")
            if not (
                (kinds.get(parent) == Kind.DIR if sep else True)
                and len(key) <= MAX_PATH_BYTES
                and plain_name(name, top=not sep)
            ):
                parts = check_relpath(e.path)
                parent = "/".join(parts[:-1])
                if parent and kinds.get(parent) != Kind.DIR:
                    raise ManifestError(f"{e.path!r}: its parent {parent!r} is not a directory entry")
        kinds[e.path] = e.kind
        if e.kind not in _KINDS:
            raise ManifestError(f"{e.path!r}: unknown entry kind {e.kind!r}")
        if e.executable and e.kind != Kind.FILE:
            raise ManifestError(f"{e.path!r}: only a file can be executable")
        if e.mode is not None:
            _check_mode(repr(e.path), e.mode)
            if e.kind == Kind.SYMLINK:
                raise ManifestError(f"{e.path!r}: a symlink has no mode")
            if e.kind == Kind.FILE and e.executable != bool(e.mode & 0o100):
                raise ManifestError(f"{e.path!r}: executable={e.executable} but mode {e.mode:#o}")
        if e.kind == Kind.FILE:
            total = 0
            for cid, n in iter_chunks(e.chunks):
                if not 0 < n <= params.max_size:
                    raise ManifestError(f"{e.path!r}: chunk {cid.hex()} has length {n}")
                total += n
            if total != e.size:
                raise ManifestError(f"{e.path!r}: size {e.size} but its chunks hold {total} bytes")
    links = [e for e in entries if e.kind == Kind.SYMLINK]
    if not links:
        return
    for e in links:  # bound every target before resolving any (resolution expands targets)
        _check_target(e.path, e.target)
    by_path = {e.path: e for e in entries}
    for e in links:
        resolve_link(by_path, e.path, e.target)


def _check_target(link_path: str, target: str) -> None:
    if not target:
        raise UnsafePathError(f"symlink {link_path!r} has an empty target", link_path)
    if target.startswith("/") or "\x00" in target or "\\" in target:
        raise UnsafePathError(f"symlink {link_path!r} -> {target!r} is absolute or malformed", link_path)
    if len(target.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise UnsafePathError(f"symlink {link_path!r}: target longer than {MAX_PATH_BYTES} bytes", link_path)


def resolve_link(by_path: Mapping[str, Entry], link_path: str, target: str) -> list[str]:
    """Where a symlink of the tree points, as root-relative components.

    Resolution follows other symlinks of the tree, as the kernel would; any step above the
    root, an absolute target, or more than MAX_SYMLINK_HOPS hops is :class:`UnsafePathError`.
    """
    _check_target(link_path, target)
    hops = 0
    # dirs[i] is the root-relative path of the i-th directory on the way down (so the
    # path of the next component is one concatenation away, not a join of all of them).
    dirs: list[str] = []
    for part in link_path.split("/")[:-1]:
        dirs.append(f"{dirs[-1]}/{part}" if dirs else part)
    pending = target.split("/")[::-1]  # next component last: pop() is O(1)
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not dirs:
                raise UnsafePathError(f"symlink {link_path!r} -> {target!r} leaves the root", link_path)
            dirs.pop()
            continue
        here = f"{dirs[-1]}/{part}" if dirs else part
        node = by_path.get(here)
        if node is not None and node.kind == Kind.SYMLINK:
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise UnsafePathError(f"symlink {link_path!r}: too many levels of links", link_path)
            if node.target.startswith("/"):
                raise UnsafePathError(f"symlink {here!r} -> {node.target!r} is absolute", here)
            if len(node.target) > MAX_PATH_BYTES:
                raise UnsafePathError(f"symlink {here!r}: target longer than {MAX_PATH_BYTES} bytes", here)
            pending.extend(reversed(node.target.split("/")))
            continue
        dirs.append(here)
    return dirs[-1].split("/") if dirs else []
