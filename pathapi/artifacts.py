"""The artifact store: where works persist their Paths so others can fetch them after the
origin stopped. A chunk store plus a ref store; the ref ``<work name>/<path>`` holds the
manifest and the :class:`~pathapi.version.Version` that produced it (format "Persisted ref"
in docs/format.md), written only after all its chunks are stored.

A sub-path of a persisted Path (``ckpt/model.bin`` of a persisted ``ckpt``) is found in the
manifest of its nearest persisted ancestor: :meth:`ArtifactStore.lookup`.

Beside those refs the store keeps, for the storage browser, each Path's older versions
(:mod:`pathapi.history`) and its transfer records (:mod:`pathapi.transfer_log`); garbage
collection reads all of them through :func:`chunks_of_ref`.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path as FsPath

from cas import ChunkerParams, Manifest
from cas.errors import CasError, ManifestError, UnsafePathError
from cas.gc import GcReport, NamesChunks
from cas.header import read_header
from cas.manifest import Kind, resolve_link
from cas.repository import PUSH_ATTEMPTS, Repository
from cas.workspace import Workspace

from . import history, transfer_log
from .driveindex import MAGIC as DRIVE_MAGIC
from .driveindex import DriveIndex
from .errors import PathapiError
from .paths import PathOutsideRootError, resolve_under
from .version import UNKNOWN, Version

REF_MAGIC = b"PREF"
REF_VERSION = 1
_REF_HEAD = struct.Struct("<4sHH")  # magic, format version, length of the version text
_LEGACY_MAGIC = b"CASM"  # refs written before versions: a bare manifest


def encode_ref(manifest: Manifest, version: Version) -> bytes:
    """A persisted ref's value: the version that produced the tree, then its manifest."""
    text = str(version).encode("ascii")
    return _REF_HEAD.pack(REF_MAGIC, REF_VERSION, len(text)) + text + manifest.encode()


def decode_ref(raw: bytes) -> tuple[Manifest, Version]:
    """(manifest, version) of a persisted ref; :class:`ManifestError` if it is malformed.
    A bare manifest (written before refs carried versions) has version ``UNKNOWN``; a
    history entry (:mod:`pathapi.history`) reads as the persisted ref it keeps."""
    if history.is_history(raw):
        raw = history.decode(raw)[2]
    if raw[:4] == _LEGACY_MAGIC:
        return Manifest.decode(raw), UNKNOWN
    (n,) = read_header(raw, _REF_HEAD, REF_MAGIC, REF_VERSION, "persisted ref")
    text = raw[_REF_HEAD.size:_REF_HEAD.size + n]
    try:
        version = Version.parse(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"persisted ref has a malformed version: {e}") from None
    return Manifest.decode(raw[_REF_HEAD.size + n:]), version


_NO_CHUNKS = Manifest.build(ChunkerParams(), Kind.DIR, [])


def chunks_of_ref(raw: bytes) -> NamesChunks:
    """What a ref of the artifact store keeps alive (garbage collection's decoder): a
    persisted ref's (or ``cas push``'s) or a history entry's manifest, a Drive's index with
    every component's tree (:mod:`pathapi.driveindex`), nothing for a transfer log. Anything
    else raises ManifestError, which stops a collection before it deletes anything."""
    if raw[:4] == DRIVE_MAGIC:
        return DriveIndex.decode(raw)
    if transfer_log.is_log(raw):
        return _NO_CHUNKS
    return decode_ref(raw)[0]


@dataclass(frozen=True)
class Persisted:
    """What the store holds for a path: its tree, the version that produced it, and the
    persisted Path it was found in (``ref_rel``, equal to the path asked for or an ancestor)."""

    manifest: Manifest
    version: Version
    ref_rel: str


class SubPathError(PathapiError, ValueError):
    """A sub-path of a persisted tree cannot be described on its own (a link in it leaves it)."""


def subtree(m: Manifest, sub: str) -> Manifest | None:
    """The tree at ``sub`` (root-relative, links on the way followed as the kernel would)
    inside the tree ``m``, or None if ``m`` holds nothing there."""
    if m.root_kind != Kind.DIR:
        return None
    try:
        parts = resolve_link(m.by_path, ".", sub)
    except UnsafePathError:
        return None  # a link on the way leaves the tree: not part of what was persisted
    real = "/".join(parts)
    if not real:
        return m  # a link back to the root: the whole tree
    entry = m.by_path.get(real)
    if entry is None:
        return None
    if entry.kind == Kind.FILE:
        return Manifest.build(m.params, Kind.FILE, [dataclasses.replace(entry, path="")])
    if entry.kind != Kind.DIR:
        return None
    prefix = real + "/"
    entries = [dataclasses.replace(e, path=e.path[len(prefix):]) for e in m.entries if e.path.startswith(prefix)]
    try:
        return Manifest.build(m.params, Kind.DIR, entries, root_mode=entry.mode)
    except UnsafePathError as e:
        raise SubPathError(
            f"{sub!r} cannot be fetched on its own from the persisted tree: the link {prefix + (e.path or '')!r} "
            "in it points outside it. Get the whole persisted Path instead"
        ) from None


class ArtifactStore:
    """A :class:`~cas.repository.Repository` whose refs are named ``<work>/<path>`` and hold
    persisted refs (a manifest and its version). Pushes, collections and the store layout
    are the repository's; this class only names and decodes."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.chunks = repo.chunks
        self.refs = repo.refs
        self.location = repo.location
        self.leases = repo.leases

    @classmethod
    def open(cls, url: str | os.PathLike[str] | None, app_root: str | os.PathLike[str]) -> ArtifactStore:
        """``None``: a folder under the app root; otherwise the repository at ``url`` (a folder
        or ``s3://bucket/prefix``: :meth:`Repository.open`, which never creates a bucket)."""
        return cls(Repository.open(FsPath(app_root) / "artifacts" if url is None else url))

    @staticmethod
    def ref_name(work: str, rel: str) -> str:
        return f"{work}/{rel}"

    def manifest(self, work: str, rel: str) -> Manifest | None:
        """The persisted tree of ``work``'s ``rel`` (a sub-path of a persisted Path too)."""
        found = self.lookup(work, rel)
        return found.manifest if found is not None else None

    def lookup(self, work: str, rel: str) -> Persisted | None:
        """What is persisted for ``work``'s ``rel``: its own ref, else the tree at ``rel``
        inside the newest persisted ancestor that holds it. None if nothing holds it."""
        rel = os.path.normpath(rel)
        raw = self.refs.get(self.ref_name(work, rel))
        if raw is not None:
            m, version = decode_ref(raw)
            return Persisted(m, version, rel)
        best: Persisted | None = None
        parts = rel.split("/")
        for n in range(len(parts) - 1, 0, -1):
            ancestor = "/".join(parts[:n])
            raw = self.refs.get(self.ref_name(work, ancestor))
            if raw is None:
                continue
            m, version = decode_ref(raw)
            if best is not None and version <= best.version:
                continue
            sub = subtree(m, "/".join(parts[n:]))
            if sub is not None:
                best = Persisted(sub, version, ancestor)
        return best

    def persist(self, work: str, rel: str, path: str, workspace: Workspace, *, version: Version,
                attempts: int = PUSH_ATTEMPTS) -> Manifest | None:
        """Store the current tree at ``path`` as ``work``'s ``rel``, produced by ``version``:
        :meth:`Repository.push` to the ref ``<work>/<rel>`` (chunks the store lacks, then the
        ref, under a lease no garbage collection runs against). None if nothing exists at
        ``path``; FileChangedError if it kept changing through ``attempts`` snapshots."""
        name = self.ref_name(work, os.path.normpath(rel))
        pushed = self.repo.push(name, path, workspace, encode=lambda m: encode_ref(m, version), attempts=attempts,
                                missing_ok=True)
        if pushed is None:
            return None
        try:  # after the ref: its chunks are live, so the entry never names a collected chunk
            history.record(self.refs, name, version, pushed.manifest.id, encode_ref(pushed.manifest, version),
                           time.time_ns())
        except (CasError, OSError):
            pass  # the newest tree is in its ref; only the browser's older versions miss one
        return pushed.manifest

    def persist_in_root(self, work: str, rel: str, work_root: str, workspace: Workspace, *,
                        version: Version) -> Manifest | None:
        """:meth:`persist` of ``rel`` inside the work's root folder. ``rel`` must stay inside
        it (relative, no ``..``, no link out of it): PathOutsideRootError otherwise, so that
        nothing from outside a work's root ever reaches the store."""
        try:
            path = resolve_under(work_root, rel)
        except PathOutsideRootError as e:
            raise PathOutsideRootError(f"{e} ({work_root}): not persisted; a lit:// path stays inside its work's root") from None
        return self.persist(work, rel, path, workspace, version=version)

    def gc(self, *, dry_run: bool = False, min_garbage: float = 0.2) -> GcReport:
        """Delete the chunks no persisted manifest and no Drive names (:meth:`Repository.gc`). A history
        entry (:mod:`pathapi.history`) keeps its chunks while its Path's ref exists; the
        history of a deleted Path is dropped (its entries listed before the collection, so
        one a persist adds meanwhile stays)."""
        try:
            orphans = history.orphans(self.refs)
        except CasError:
            orphans = []  # a damaged ref: the collection itself refuses it (GcError), deleting nothing
        dead = set(orphans)

        def live_tree(raw: bytes) -> NamesChunks:
            if history.is_history(raw):
                name, _, _, pref = history.decode_full(raw)
                if history.ref_name(name, decode_ref(pref)[1]) in dead:
                    return _NO_CHUNKS
            return chunks_of_ref(raw)

        report = self.repo.gc(dry_run=dry_run, min_garbage=min_garbage, decode=live_tree)
        if not dry_run:
            for name in orphans:
                self.refs.delete(name)
        return report

    def close(self) -> None:
        self.repo.close()
