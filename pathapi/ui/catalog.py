"""What an app stored, as plain data: the one query module behind the storage browser and
the CLI views (``pathapi ls``, ``log``, ``diff``, ``cat``), so both always say the same.

Everything is read from the artifact store alone (a folder or ``s3://``), never from a
work's files, so it works on a finished app, on another machine, and beside a running app
(each call reads the store afresh). Nothing here writes to the store.

Sources: the persisted refs ``<work>/<path>`` (the newest tree of each Path), the version
history (:mod:`pathapi.history`: older trees, bounded), and the transfer logs
(:mod:`pathapi.transfer_log`). A Path persisted before the history existed has one version,
its ref's.

Names users type (``pathapi log root.train/outputs/ckpt``) are ``<work>/<path>[/<file>]``;
versions are ``1`` (the oldest kept), ``-1`` or ``latest`` (the newest), the version text
``APP_RUN.RUN.PHASE``, or a prefix of a manifest id (8 hex digits at least).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import blake3

from cas.errors import CasError, ManifestError
from cas.manifest import Entry, Kind, Manifest
from cas.repository import Repository

from .. import history, transfer_log
from ..artifacts import ArtifactStore, decode_ref, subtree
from ..drive import list_drives, read_drive
from ..errors import PathapiError
from ..version import Version
from . import chunkio, safetensors

#: Bytes of a file a text, JSON or CSV preview reads at most.
PREVIEW_TEXT = 256 << 10
#: Bytes of a file an image preview reads at most (larger images get no preview).
PREVIEW_IMAGE = 1 << 20
CSV_ROWS = 50
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp"}  # never SVG: it can carry scripts


class CatalogError(PathapiError, ValueError):
    """A store that cannot be opened or read, or a name that cannot be understood; the
    message says which and what to give instead."""


class NotFoundError(CatalogError, LookupError):
    """No such work, Path, file or version in the store."""


# -- the data ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PathSummary:
    work: str
    path: str
    kind: str  # "dir" or "file"
    size: int
    files: int
    chunks: int
    versions: int
    version: str
    #: when the newest version was persisted (ns since the epoch), None if not recorded
    last_change: int | None
    manifest_id: str
    consumers: int


@dataclass(frozen=True)
class WorkSummary:
    name: str
    paths: list[PathSummary]


@dataclass(frozen=True)
class VersionInfo:
    number: int  # 1 = the oldest kept
    version: str
    run: int
    app_run: int
    ended: bool
    persisted: int | None
    manifest_id: str
    files: int
    size: int
    chunks: int
    #: chunks (and their bytes) no older kept version has: what this version added
    new_chunks: int
    new_bytes: int
    current: bool


@dataclass(frozen=True)
class TreeNode:
    path: str
    kind: str  # "dir", "file" or "link"
    size: int
    mode: str  # "0644"; "" for a link
    chunks: int
    target: str = ""

    @property
    def depth(self) -> int:
        return self.path.count("/")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class PathDetail:
    summary: PathSummary
    tree: list[TreeNode]
    versions: list[VersionInfo]
    transfers: list[dict[str, Any]]
    #: logical bytes / bytes of distinct chunks, in the newest version and over every kept one
    dedup: float
    dedup_history: float
    unique_bytes: int
    history_unique_bytes: int
    history_logical_bytes: int


@dataclass(frozen=True)
class FileChange:
    path: str
    status: str  # "added", "removed", "changed"
    kind: str
    old_size: int
    new_size: int
    chunks_added: int
    bytes_added: int
    chunks_removed: int
    bytes_removed: int
    old_mode: str
    new_mode: str
    tensors: list[safetensors.TensorChange] | None = None
    note: str = ""


@dataclass(frozen=True)
class Diff:
    work: str
    path: str
    a: VersionInfo
    b: VersionInfo
    changes: list[FileChange]
    unchanged: int
    chunks_added: int
    bytes_added: int

    def by_status(self, status: str) -> list[FileChange]:
        return [c for c in self.changes if c.status == status]


@dataclass(frozen=True)
class Preview:
    kind: str  # "text", "json", "csv", "image", "safetensors", "binary", "empty", "too-large"
    size: int
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)
    truncated: bool = False
    tensors: list[safetensors.Tensor] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    mime: str = ""
    error: str = ""


@dataclass(frozen=True)
class Target:
    """What a name resolves to: a persisted Path, a place inside it, a version's tree there."""

    work: str
    path: str
    sub: str  # "" for the Path itself
    version: VersionInfo
    tree: Manifest  # the tree at ``sub``

    @property
    def entry(self) -> Entry | None:
        """The file at the target, if it is one."""
        return self.tree.entries[0] if self.tree.root_kind == Kind.FILE else None

    @property
    def name(self) -> str:
        return os.path.basename(self.sub or self.path) or self.work


def _mode(e: Entry) -> str:
    return "" if e.kind == Kind.SYMLINK else f"{e.perm:04o}"


def _node(e: Entry) -> TreeNode:
    kind = {Kind.DIR: "dir", Kind.FILE: "file", Kind.SYMLINK: "link"}[e.kind]
    return TreeNode(e.path, kind, e.size, _mode(e), e.chunk_count, e.target)


def _unique_bytes(m: Manifest) -> int:
    return sum(m.chunk_sizes().values())


# -- the catalog ------------------------------------------------------------------------
class Catalog:
    """Queries over one artifact store; every method reads the store afresh."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.location = store.location

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None, store: str | None = None, *,
             create: bool = False) -> Catalog:
        """The store given by ``store`` (a folder or ``s3://bucket/prefix``), else the one under
        the app folder ``root`` (default ``./.pathapi``). A local store must exist unless
        ``create`` (the browser started with an app that has not persisted anything yet)."""
        try:
            if store is not None:
                url = store
            else:
                url = os.fspath(FsPath(root if root is not None else ".pathapi") / "artifacts")
            local = not url.startswith("s3://")
            if local and not create:
                path = FsPath(url.removeprefix("file://"))
                if not (path / "chunks" / "FORMAT").is_file():
                    where = f"--store {store}" if store is not None else f"the app folder {os.path.abspath(root or '.pathapi')}"
                    raise CatalogError(f"no artifact store at {path.absolute()} ({where}): give the app's folder with "
                                       "--root or its store with --store")
            return cls(ArtifactStore(Repository.open(url)))
        except CasError as e:
            raise CatalogError(f"cannot open the artifact store: {e}") from None

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading refs ---------------------------------------------------------------
    def _read(self, name: str) -> bytes | None:
        try:
            return self.store.refs.get(name)
        except CasError as e:
            raise CatalogError(f"cannot read {name!r} from {self.location}: {e}") from None

    def _names(self, prefix: str = "") -> list[str]:
        try:
            return list(self.store.refs.names(prefix))
        except CasError as e:
            raise CatalogError(f"cannot list {self.location}: {e}") from None

    def persisted(self) -> list[tuple[str, str]]:
        """(work, path) of every persisted Path, sorted."""
        out = []
        for name in self._names():
            work, slash, rel = name.partition("/")
            if slash and work and rel and ":" not in work:
                out.append((work, rel))
        return sorted(out)

    def drives(self) -> list[dict[str, Any]]:
        """The Drives stored here, for the landing page and ``pathapi ls``: name, the works
        that put into it, files and bytes (one listing, then one ref read per Drive)."""
        try:
            names = list_drives(self.store)
        except CasError as e:
            raise CatalogError(f"cannot list the Drives of {self.location}: {e}") from None
        out: list[dict[str, Any]] = []
        for name in names:
            try:
                index = read_drive(self.store, name)
            except (CasError, ManifestError) as e:
                raise CatalogError(f"the index of Drive {name!r} cannot be read: {e}") from None
            trees = [space.manifest for space in index.spaces.values()]
            out.append({"name": name, "components": sorted(index.spaces),
                        "files": sum(sum(1 for _ in m.files()) for m in trees),
                        "size": sum(m.total_size for m in trees)})
        return out

    def _current(self, work: str, rel: str) -> tuple[Manifest, Version]:
        raw = self._read(ArtifactStore.ref_name(work, rel))
        if raw is None:
            raise NotFoundError(f"{work}/{rel} is not a persisted Path in {self.location} (pathapi ls lists them)")
        try:
            return decode_ref(raw)
        except ManifestError as e:
            raise CatalogError(f"the persisted ref of {work}/{rel} cannot be read: {e}") from None

    def _history(self, work: str, rel: str) -> list[tuple[Manifest, Version, int | None]]:
        """(tree, version, persisted at) of every kept version, oldest first, the current one last."""
        path_ref = ArtifactStore.ref_name(work, rel)
        out: list[tuple[Manifest, Version, int | None]] = []
        for e in history.entries(self.store.refs, path_ref):
            raw = self._read(e.ref)
            if raw is None:
                continue  # dropped from the bounded log since the listing
            try:
                at, _, pref = history.decode(raw)
                m, v = decode_ref(pref)
            except ManifestError:
                continue  # a damaged entry hides one old version, nothing else
            out.append((m, v, at))
        m, v = self._current(work, rel)
        if not out or out[-1][0].id != m.id:
            out.append((m, v, None))
        return out

    # -- the landing page / pathapi ls ------------------------------------------------
    def works(self) -> list[WorkSummary]:
        """Every work with persisted Paths, each Path summed up."""
        kept: dict[str, list[history.HistoryEntry]] = {}
        for e in history.entries(self.store.refs):
            kept.setdefault(e.path_ref, []).append(e)
        consumers = transfer_log.logs(self.store.refs)
        by_work: dict[str, list[PathSummary]] = {}
        for work, rel in self.persisted():
            by_work.setdefault(work, []).append(self._summary(work, rel, kept.get(f"{work}/{rel}", []),
                                                              consumers.get((work, rel), 0)))
        return [WorkSummary(w, ps) for w, ps in sorted(by_work.items())]

    def _summary(self, work: str, rel: str, kept: list[history.HistoryEntry], consumers: int) -> PathSummary:
        m, v = self._current(work, rel)
        versions, last = len(kept), None
        if kept:
            raw = self._read(kept[-1].ref)
            try:
                at, mid, _ = history.decode(raw) if raw is not None else (None, b"", b"")
            except ManifestError:
                at, mid = None, b""
            if mid == m.id:
                last = at
            else:
                versions += 1  # the ref moved on without a history entry
        else:
            versions = 1
        return PathSummary(work, rel, "dir" if m.root_kind == Kind.DIR else "file", m.total_size,
                           sum(1 for _ in m.files()), len(m.chunk_sizes()), versions, str(v), last, m.id.hex(), consumers)

    # -- a Path's page / pathapi log --------------------------------------------------
    def versions(self, work: str, rel: str) -> list[VersionInfo]:
        return self._versions(self._history(work, rel))

    def _versions(self, kept: list[tuple[Manifest, Version, int | None]]) -> list[VersionInfo]:
        seen: set[bytes] = set()
        out = []
        for i, (m, v, at) in enumerate(kept):
            sizes = m.chunk_sizes()
            new = {c: n for c, n in sizes.items() if c not in seen}
            seen |= sizes.keys()
            out.append(VersionInfo(i + 1, str(v), v.run, v.app_run, v.phase == Version.ENDED, at, m.id.hex(),
                                   sum(1 for _ in m.files()), m.total_size, len(sizes), len(new), sum(new.values()),
                                   i == len(kept) - 1))
        return out

    def transfers(self, work: str, rel: str) -> list[dict[str, Any]]:
        """The kept transfer records of the Path and of paths under it, oldest first."""
        try:
            return transfer_log.read(self.store.refs, work, rel, below=True)
        except CasError as e:
            raise CatalogError(f"cannot read the transfer records of {work}/{rel}: {e}") from None

    def path(self, work: str, rel: str) -> PathDetail:
        kept = self._history(work, rel)
        m = kept[-1][0]
        versions = self._versions(kept)
        tree = sorted((_node(e) for e in m.entries), key=lambda n: n.path.split("/"))
        union: dict[bytes, int] = {}
        logical = 0
        for km, _, _ in kept:
            union.update(km.chunk_sizes())
            logical += km.total_size
        unique = _unique_bytes(m)
        hist_unique = sum(union.values())
        transfers = self.transfers(work, rel)
        consumers = len({t.get("consumer") for t in transfers})
        cur = versions[-1]
        summary = PathSummary(work, rel, "dir" if m.root_kind == Kind.DIR else "file", m.total_size, cur.files,
                              cur.chunks, len(versions), cur.version, cur.persisted, cur.manifest_id, consumers)
        return PathDetail(summary, tree, versions, transfers, m.total_size / unique if unique else 1.0,
                          logical / hist_unique if hist_unique else 1.0, unique, hist_unique, logical)

    # -- names ------------------------------------------------------------------------
    def resolve(self, spec: str, version: str | None = None) -> Target:
        """``<work>/<path>[/<sub>]`` at ``version`` (default the newest): the longest persisted
        Path the name starts with, and the tree at ``sub`` inside it."""
        spec = spec.strip("/")
        work, _, rest = spec.partition("/")
        rest = os.path.normpath(rest) if rest else ""
        best: str | None = None
        for w, rel in self.persisted():
            if w == work and (rest == rel or rest.startswith(rel + "/")) and (best is None or len(rel) > len(best)):
                best = rel
        if best is None:
            known = sorted({w for w, _ in self.persisted()})
            if work not in known:
                raise NotFoundError(f"no work {work!r} with persisted Paths in {self.location} "
                                    f"(works: {', '.join(known) or 'none'})")
            raise NotFoundError(f"{spec!r} is not inside a persisted Path of {work} (pathapi ls {work} lists them)")
        return self.target(work, best, rest[len(best) + 1:], version)

    def target(self, work: str, rel: str, sub: str = "", version: str | None = None) -> Target:
        kept = self._history(work, rel)
        infos = self._versions(kept)
        i = pick_version(infos, version)
        m = kept[i][0]
        tree = subtree(m, sub) if sub else m
        if tree is None:
            raise NotFoundError(f"{sub!r} is not in {work}/{rel} (version {infos[i].number})")
        return Target(work, rel, sub, infos[i], tree)

    # -- a file -----------------------------------------------------------------------
    def read_range(self, entry: Entry, start: int, end: int) -> bytes:
        return chunkio.read_range(self.store.chunks, entry, start, end)

    def iter_file(self, entry: Entry) -> Iterator[bytes]:
        return chunkio.iter_file(self.store.chunks, entry)

    def write_tar(self, t: Target, write: Callable[[bytes], None]) -> None:
        mtime = (t.version.persisted or t.version.app_run) // 1_000_000_000
        chunkio.write_tar(self.store.chunks, t.tree, t.name, write, mtime)

    def preview(self, t: Target) -> Preview:
        """What a file's page shows, from at most its first :data:`PREVIEW_IMAGE` bytes (the
        tensor table of a safetensors file: its header)."""
        e = t.entry
        if e is None:
            raise CatalogError(f"{t.work}/{t.path}/{t.sub} is a folder: it has no preview")
        ext = os.path.splitext(t.name)[1].lower()
        if e.size == 0:
            return Preview("empty", 0)
        if ext == safetensors.SUFFIX:
            try:
                tensors, meta = safetensors.header(self.store.chunks, e)
                return Preview("safetensors", e.size, tensors=tensors, metadata=meta)
            except safetensors.NotSafetensorsError as err:
                return Preview("binary", e.size, text=_hexdump(self.read_range(e, 0, 512)), error=str(err))
        if ext in IMAGE_TYPES:
            if e.size > PREVIEW_IMAGE:
                return Preview("too-large", e.size, mime=IMAGE_TYPES[ext],
                               error=f"images larger than {PREVIEW_IMAGE >> 20} MiB are not previewed")
            return Preview("image", e.size, mime=IMAGE_TYPES[ext])
        data = self.read_range(e, 0, PREVIEW_TEXT)
        truncated = e.size > len(data)
        text = _text(data, truncated)
        if text is None:
            return Preview("binary", e.size, text=_hexdump(data[:512]), truncated=True)
        if ext == ".json" and not truncated:
            try:
                return Preview("json", e.size, text=json.dumps(json.loads(text), indent=2, ensure_ascii=False))
            except (ValueError, RecursionError):
                pass
        if ext in (".csv", ".tsv"):
            lines = text.splitlines()
            if truncated and lines:
                lines = lines[:-1]  # the last line may be cut
            rows = list(csv.reader(io.StringIO("\n".join(lines[:CSV_ROWS + 1])), delimiter="\t" if ext == ".tsv" else ","))
            return Preview("csv", e.size, rows=rows, truncated=truncated or len(lines) > CSV_ROWS + 1)
        return Preview("text", e.size, text=text, truncated=truncated)

    def image(self, t: Target) -> tuple[bytes, str]:
        """An image's bytes (at most :data:`PREVIEW_IMAGE`) and its media type."""
        e = t.entry
        mime = IMAGE_TYPES.get(os.path.splitext(t.name)[1].lower())
        if e is None or mime is None or e.size > PREVIEW_IMAGE:
            raise NotFoundError(f"{t.name!r} has no image preview")
        return self.read_range(e, 0, PREVIEW_IMAGE), mime

    # -- a diff -----------------------------------------------------------------------
    def diff(self, work: str, rel: str, a: str | None, b: str | None) -> Diff:
        """What changed from version ``a`` to version ``b``: each file added, removed or
        changed, with the chunks (and bytes) each side has that the other lacks; per tensor
        for safetensors files."""
        kept = self._history(work, rel)
        infos = self._versions(kept)
        ia, ib = pick_version(infos, a), pick_version(infos, b)
        ma, mb = kept[ia][0], kept[ib][0]
        old = {e.path: e for e in ma.entries}
        new = {e.path: e for e in mb.entries}
        changes: list[FileChange] = []
        unchanged = 0
        for path in sorted(old.keys() | new.keys(), key=lambda p: p.split("/")):
            x, y = old.get(path), new.get(path)
            if x is not None and y is not None and x.same_content(y):
                unchanged += 1
                continue
            changes.append(self._change(path, x, y))
        added = mb.chunk_sizes()
        for cid in ma.chunk_ids():
            added.pop(cid, None)
        return Diff(work, rel, infos[ia], infos[ib], changes, unchanged, len(added), sum(added.values()))

    def _change(self, path: str, x: Entry | None, y: Entry | None) -> FileChange:
        ca = dict(x.chunk_refs()) if x is not None else {}
        cb = dict(y.chunk_refs()) if y is not None else {}
        plus = {c: n for c, n in cb.items() if c not in ca}
        minus = {c: n for c, n in ca.items() if c not in cb}
        status = "added" if x is None else "removed" if y is None else "changed"
        some = y if y is not None else x
        assert some is not None
        kind = _node(some).kind
        note = ""
        if x is not None and y is not None:
            if x.kind != y.kind:
                note = f"was a {_node(x).kind}"
            elif x.kind == Kind.SYMLINK:
                note = f"link target {x.target} -> {y.target}"
            elif x.chunks == y.chunks:
                note = "mode only"
        tensors = None
        if (path.lower().endswith(safetensors.SUFFIX) and x is not None and y is not None
                and x.kind == y.kind == Kind.FILE and x.chunks != y.chunks):
            try:
                tensors = safetensors.diff(self.store.chunks, x, y)
            except safetensors.NotSafetensorsError as e:
                note = str(e)
        return FileChange(path, status, kind, x.size if x else 0, y.size if y else 0, len(plus), sum(plus.values()),
                          len(minus), sum(minus.values()), _mode(x) if x else "", _mode(y) if y else "", tensors, note)

    # -- live -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Changes whenever a persist, a new version or a transfer record lands in the store."""
        h = blake3.blake3()
        for name in sorted(self._names()):
            raw = self._read(name)
            h.update(name.encode("utf-8", "surrogateescape") + b"\x00" + blake3.blake3(raw or b"").digest())
        return h.hexdigest()


def pick_version(infos: list[VersionInfo], spec: str | None) -> int:
    """The index in ``infos`` of the version ``spec`` names (module docstring); NotFoundError."""
    if spec is None or spec in ("", "latest", "current"):
        return len(infos) - 1
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n and "." not in spec:
        i = n - 1 if n > 0 else len(infos) + n
        if 0 <= i < len(infos):
            return i
        raise NotFoundError(f"version {spec} does not exist: {len(infos)} version(s) are kept (1 to {len(infos)})")
    for i, v in enumerate(infos):
        if v.version == spec or (len(spec) >= 8 and v.manifest_id.startswith(spec.lower())):
            return i
    raise NotFoundError(f"no kept version {spec!r}: give 1..{len(infos)}, -1, latest, a version text or a manifest id "
                        "(pathapi log lists them)")


def _text(data: bytes, truncated: bool) -> str | None:
    """``data`` as text, or None if it looks binary (a NUL, or not UTF-8 beyond a cut character)."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if truncated and e.start >= len(data) - 3:
            return data[:e.start].decode("utf-8")
        return None


def _hexdump(data: bytes) -> str:
    lines = []
    for off in range(0, len(data), 16):
        row = data[off:off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{off:08x}  {row.hex(' '):<47}  {text}")
    return "\n".join(lines)


def to_json(obj: Any) -> Any:
    """A catalog value as JSON-able data (``--json`` and the browser's ``/api``)."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, safetensors.Tensor):
            out["size"] = obj.size
        return out
    if isinstance(obj, (list, tuple)):
        return [to_json(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    return obj
