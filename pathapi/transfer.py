"""``get``, ``exists_local``, ``exists_remote``: a Path's transfers, seen from the consumer.

``get`` always asks the origin for its current manifest, fetches only chunks that are in
none of the consumer's files, and materializes crash-safely (``cas.Workspace.sync``). When
the origin has stopped (or cannot be reached) the persisted manifest and chunks are used.
A file that changes at the origin during the transfer restarts it with a new manifest, a
bounded number of times.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from cas import Manifest
from cas.errors import CasError, ChunkNotFoundError
from cas.hashing import ChunkId
from cas.store.base import ChunkSource, DeltaSource, Payload

from . import transfer_log
from .errors import OlderVersionError, OriginUnreachableError, StaleManifestError, transfer_error
from .held import HeldVersions
from .paths import PathOutsideRootError, resolve_under
from .runtime.context import WorkContext, require_run
from .version import Version
from .wire.client import OriginClient, OriginSource
from .wire.samehost import SameHostSource

STALE_RETRIES = 5
PROGRESS_MIN_BYTES = 64 << 20


class SharedPath(Protocol):
    """What a transfer needs of a :class:`pathapi.Path`: its place and its origin's name
    (a Protocol, so this module needs no import of the class whose methods call it)."""

    def __fspath__(self) -> str: ...

    @property
    def origin_name(self) -> str | None: ...


@dataclass(frozen=True)
class TransferRecord:
    """What one ``get`` did. ``bytes_transferred`` counts payload bytes that crossed from the
    origin or store (compressed size where compressed); ``chunks_reused`` were found locally
    (already in place, or copied from a local file): ``chunks_transferred + chunks_reused`` is
    the number of distinct chunks in the tree."""

    files: int
    bytes_total: int
    chunks_transferred: int
    bytes_transferred: int
    chunks_reused: int
    seconds: float
    source: str  # "origin" or "artifacts"
    manifest_id: str
    #: the version of the tree this get found at its source (None: the source said none)
    version: Version | None = None
    #: True when the source held an older version than this work's files, which were kept
    #: (the automatic get at the start of a run); ``note`` then says which versions
    kept_local: bool = False
    note: str = ""
    #: chunks read straight from the origin's files on this host (wire/samehost.py): the
    #: rest of ``chunks_transferred`` crossed a socket
    same_host_chunks: int = 0
    #: plain bytes of the tree's distinct chunks that were found locally (not moved)
    bytes_reused: int = 0


class _Counting:
    """Wraps a chunk source to count (and optionally show) what it delivers."""

    def __init__(self, inner: ChunkSource, label: str, total: Callable[[], int] | None = None) -> None:
        self.inner = inner
        self.location = getattr(inner, "location", label)
        self.chunks = 0
        self.bytes = 0
        self._bar = None
        if total is not None and sys.stderr.isatty():  # what is to move costs a stat walk: only for a terminal
            size = total()
            if size >= PROGRESS_MIN_BYTES:
                from tqdm import tqdm

                # A terminal that reports no size (a bare pty) would make tqdm draw nothing.
                cols, rows = shutil.get_terminal_size()
                self._bar = tqdm(total=size, unit="B", unit_scale=True, desc=label, leave=False,
                                 file=sys.stderr, ncols=cols, nrows=rows)

    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        return self.inner.has_many(ids)

    @property
    def accepts_bases(self) -> bool:
        return isinstance(self.inner, DeltaSource) and self.inner.accepts_bases

    def get_many(self, ids: Iterable[ChunkId],
                 bases: Mapping[ChunkId, tuple[str, int]] | None = None) -> Iterator[tuple[ChunkId, Payload]]:
        try:
            chunks = self.inner.get_many(ids, bases=bases) if bases is not None else self.inner.get_many(ids)  # type: ignore[call-arg]
            for cid, data in chunks:
                self.chunks += 1
                self.bytes += len(data)
                if self._bar is not None:
                    self._bar.update(len(data))
                yield cid, data
        finally:
            if self._bar is not None:
                self._bar.close()


@dataclass(frozen=True)
class _Located:
    manifest: Manifest | None
    source: ChunkSource
    kind: str  # "origin" or "artifacts"
    version: Version | None


def _persisted(ctx: WorkContext, origin: str, rel: str) -> _Located | None:
    found = ctx.artifacts.lookup(origin, rel)
    if found is None:
        return None
    return _Located(found.manifest, ctx.artifacts.chunks, "artifacts", found.version)


def _locate(ctx: WorkContext, origin: str, rel: str) -> _Located:
    """The current manifest of ``origin``'s ``rel``, its version, and where its chunks come from."""
    url = ctx.registry.get(origin)
    if url:
        client = OriginClient(origin, url, ctx.secret, ctx.timeout, ctx.tls)
        try:
            m, version = client.current(rel)
        except OriginUnreachableError:
            persisted = _persisted(ctx, origin, rel)
            if persisted is None:
                raise
            return persisted
        if m is None:
            return _Located(None, ctx.artifacts.chunks, "origin", None)
        return _Located(m, client.source(m), "origin", version)
    return _persisted(ctx, origin, rel) or _Located(None, ctx.artifacts.chunks, "artifacts", None)


def _missing_bytes(ctx: WorkContext, target: Manifest, dest: str) -> Callable[[], int]:
    """What a sync of ``target`` into ``dest`` would still fetch, asked when a progress bar starts."""
    return lambda: ctx.workspace.fetch_plan(target, dest).missing_bytes


def _held(ctx: WorkContext) -> HeldVersions:
    return HeldVersions(os.fspath(ctx.workspace.state_dir))


def _dest(ctx: WorkContext, path: SharedPath) -> str:
    try:
        return resolve_under(ctx.root, os.fspath(path))
    except PathOutsideRootError as e:
        raise ValueError(f"{path!r} is not inside the work's root {ctx.root}: {e}") from None


def get(path: SharedPath, *, overwrite: bool, in_place: bool = False, missing_ok: bool = False,
        keep_newer: bool = False) -> TransferRecord | None:
    """Make this work's copy of ``path`` equal to the origin's current files (SPEC: Path.get).

    Without ``overwrite`` an existing local copy is refused with FileExistsError before
    anything is asked of the origin: this is pathapi's only overwrite check (its default,
    False, is :meth:`pathapi.Path.get`'s; ``cas.Workspace.sync`` repeats it under its lock).
    ``in_place`` patches changed files in place instead of renaming new inodes into place.
    ``missing_ok`` returns None when the path exists nowhere; ``keep_newer`` (the automatic
    get at the start of a run) keeps this work's files when only an older version than they
    hold is to be had, where a plain get raises :class:`OlderVersionError`.
    """
    ctx = require_run("Path.get()")
    origin = path.origin_name
    if origin is None:
        raise ValueError(f"{path!r} has no origin work: only lit:// paths set on a work can be fetched")
    rel = os.fspath(path)
    dest = _dest(ctx, path)
    if origin == ctx.name:
        raise ValueError(f"{path!r} belongs to this work ({ctx.name}): its files are already here")
    if not overwrite and os.path.lexists(dest):
        raise FileExistsError(17, f"{rel!r} exists in work {ctx.name!r} and overwrite is False", dest)
    t0 = time.perf_counter()
    held = _held(ctx)
    last: StaleManifestError | None = None
    for _ in range(STALE_RETRIES):
        try:
            found = _locate(ctx, origin, rel)
        except StaleManifestError as e:  # 409: the origin could not snapshot it consistently
            last = e
            continue
        except OriginUnreachableError as e:  # and nothing persisted to fall back on
            raise OriginUnreachableError(
                f"{e}. The get of {rel!r} from origin work {origin!r} moved nothing. The files at {dest} are unchanged",
                origin,
            ) from e
        except CasError as e:  # a persisted ref or manifest that cannot be read
            raise transfer_error(e, origin, rel, dest) from e
        m, source, kind = found.manifest, found.source, found.kind
        if m is None:
            if missing_ok:
                return None
            raise FileNotFoundError(2, f"{rel!r} does not exist at its origin {origin!r}", rel)
        mine = held.held(origin, rel) if kind == "artifacts" and os.path.lexists(dest) else None
        if mine is not None and (found.version is None or found.version < mine):
            return _keep_newer(ctx, origin, rel, dest, found, mine, keep_newer, t0)
        counting = _Counting(source, f"get {rel}", _missing_bytes(ctx, m, dest))
        try:
            r = ctx.workspace.sync(m, dest, remote=counting, overwrite=overwrite, in_place=in_place)
        except StaleManifestError as e:
            last = e
            continue
        except OriginUnreachableError as e:  # the origin died or went silent mid-transfer
            raise _lost(e, origin, rel, dest, counting) from e
        except ChunkNotFoundError as e:
            if kind != "artifacts":
                raise transfer_error(e, origin, rel, dest) from e
            # The persisted ref was replaced and a garbage collection removed chunks of the
            # manifest we read: the current one names chunks that exist.
            last = StaleManifestError(f"persisted manifest of {rel!r} was replaced during the get: {e}", origin)
            continue
        except CasError as e:  # the store, the chunks or the destination failed
            raise transfer_error(e, origin, rel, dest) from e
        if found.version is not None:
            held.record(origin, rel, found.version)
        wire = source.bytes_received if isinstance(source, (OriginSource, SameHostSource)) else counting.bytes
        sizes = m.chunk_sizes()
        return _recorded(ctx, origin, rel, TransferRecord(
            files=r.files, bytes_total=r.bytes_total, chunks_transferred=r.chunks_fetched,
            bytes_transferred=wire, chunks_reused=len(sizes) - r.chunks_fetched,
            seconds=time.perf_counter() - t0, source=kind, manifest_id=m.id.hex(), version=found.version,
            same_host_chunks=source.same_host_chunks if isinstance(source, SameHostSource) else 0,
            bytes_reused=max(0, sum(sizes.values()) - r.bytes_fetched),
        ))
    raise StaleManifestError(f"{rel!r} kept changing at {origin!r} during {STALE_RETRIES} attempts: {last}", origin)


def _keep_newer(ctx: WorkContext, origin: str, rel: str, dest: str, found: _Located, mine: Version,
                keep: bool, t0: float) -> TransferRecord:
    """The origin is gone and the store holds an older tree than this work's: never go back."""
    offered = found.version.describe() if found.version is not None else "an unversioned tree"
    note = (f"origin work {origin!r} is gone and the artifact store holds {offered} of {rel!r}, "
            f"older than the {mine.describe()} that this work holds at {dest}")
    if not keep:
        raise OlderVersionError(f"{note}: the files were kept. Get it again once {origin!r} runs, "
                                "or delete the local copy to take the stored one", origin)
    assert found.manifest is not None
    return _recorded(ctx, origin, rel, TransferRecord(
        files=0, bytes_total=0, chunks_transferred=0, bytes_transferred=0, chunks_reused=0,
        seconds=time.perf_counter() - t0, source=found.kind, manifest_id=found.manifest.id.hex(),
        version=found.version, kept_local=True, note=note + "; this work's files were kept",
    ))


def _recorded(ctx: WorkContext, origin: str, rel: str, record: TransferRecord) -> TransferRecord:
    """``record``, once it is kept in the artifact store's transfer log (for the storage
    browser and ``pathapi log``) and, when the app reports transfers, printed as one line.
    Neither can fail the get: a store that refuses the record costs only the record."""
    try:
        transfer_log.append(ctx.artifacts.refs, origin, rel, ctx.name, transfer_log.entry(vars(record)))
    except (CasError, OSError):
        pass
    if ctx.report_transfers:  # on stderr, beside the other "pathapi: " lines: the app's stdout stays its own
        print(transfer_log.describe(ctx.name, origin, rel, vars(record)), file=sys.stderr, flush=True)
    return record


def _lost(e: OriginUnreachableError, origin: str, rel: str, dest: str, counting: _Counting) -> OriginUnreachableError:
    """The error of a get whose origin was lost mid-transfer: which work, and what became of
    the transfer (nothing written; what arrived is kept, see materialize's resume)."""
    kept = (
        f"{counting.chunks} chunk(s) ({counting.bytes} bytes) had arrived and are kept: the next get fetches only the rest"
        if counting.chunks else "no chunk had arrived yet"
    )
    return OriginUnreachableError(
        f"lost origin work {origin!r} during the get of {rel!r}: {e}. The files at {dest} are unchanged; {kept}", origin
    )


def exists_local(path: SharedPath) -> bool:
    ctx = require_run("Path.exists_local()")
    return os.path.lexists(_dest(ctx, path))


def exists_remote(path: SharedPath) -> bool:
    ctx = require_run("Path.exists_remote()")
    origin = path.origin_name
    if origin is None:
        return False
    rel = os.fspath(path)
    if origin == ctx.name:  # the same rule as the origin's /v1/exists: what get could fetch
        try:
            real = resolve_under(ctx.root, rel)
        except PathOutsideRootError:
            return False
        return os.path.isfile(real) or os.path.isdir(real)
    url = ctx.registry.get(origin)
    if url:
        try:
            return OriginClient(origin, url, ctx.secret, ctx.timeout, ctx.tls).exists(rel)
        except OriginUnreachableError:
            if ctx.artifacts.lookup(origin, rel) is None:
                raise
            return True
    return ctx.artifacts.lookup(origin, rel) is not None
