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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cas import Manifest
from cas.errors import ChunkNotFoundError
from cas.hashing import ChunkId
from cas.store.base import ChunkSource, Payload

from .client import OriginClient, OriginSource
from .context import WorkContext, require_run
from .errors import OriginUnreachableError, StaleManifestError
from .origin import PathOutsideRootError, resolve_under

if TYPE_CHECKING:
    from .path import Path

STALE_RETRIES = 5
PROGRESS_MIN_BYTES = 64 << 20


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
        return bool(getattr(self.inner, "accepts_bases", False))

    def get_many(self, ids: Iterable[ChunkId], **kw: Any) -> Iterator[tuple[ChunkId, Payload]]:
        try:
            for cid, data in self.inner.get_many(ids, **kw):
                self.chunks += 1
                self.bytes += len(data)
                if self._bar is not None:
                    self._bar.update(len(data))
                yield cid, data
        finally:
            if self._bar is not None:
                self._bar.close()


def _locate(ctx: WorkContext, origin: str, rel: str) -> tuple[Manifest | None, ChunkSource, str]:
    """The current manifest of ``origin``'s ``rel`` and where its chunks come from."""
    url = ctx.registry.get(origin)
    if url:
        client = OriginClient(origin, url, ctx.secret, ctx.timeout)
        try:
            m = client.manifest(rel)
        except OriginUnreachableError:
            persisted = ctx.artifacts.manifest(origin, rel)
            if persisted is None:
                raise
            return persisted, ctx.artifacts.chunks, "artifacts"
        return m, (OriginSource(client, m) if m is not None else ctx.artifacts.chunks), "origin"
    return ctx.artifacts.manifest(origin, rel), ctx.artifacts.chunks, "artifacts"


def _dest(ctx: WorkContext, path: Path) -> str:
    try:
        return resolve_under(ctx.root, os.fspath(path))
    except PathOutsideRootError as e:
        raise ValueError(f"{path!r} is not inside the work's root {ctx.root}: {e}") from None


def get(path: Path, overwrite: bool = False, *, missing_ok: bool = False) -> TransferRecord | None:
    """Make this work's copy of ``path`` equal to the origin's current files (SPEC: Path.get)."""
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
    last: StaleManifestError | None = None
    for _ in range(STALE_RETRIES):
        try:
            m, source, kind = _locate(ctx, origin, rel)
        except StaleManifestError as e:  # 409: the origin could not snapshot it consistently
            last = e
            continue
        except OriginUnreachableError as e:  # and nothing persisted to fall back on
            raise OriginUnreachableError(
                f"{e}. The get of {rel!r} from origin work {origin!r} moved nothing. The files at {dest} are unchanged",
                origin,
            ) from e
        if m is None:
            if missing_ok:
                return None
            raise FileNotFoundError(2, f"{rel!r} does not exist at its origin {origin!r}", rel)
        target = m
        counting = _Counting(source, f"get {rel}", lambda: ctx.workspace.fetch_plan(target, dest).missing_bytes)
        try:
            r = ctx.workspace.sync(m, dest, remote=counting, overwrite=overwrite)
        except StaleManifestError as e:
            last = e
            continue
        except OriginUnreachableError as e:  # the origin died or went silent mid-transfer
            raise _lost(e, origin, rel, dest, counting) from e
        except ChunkNotFoundError as e:
            if kind != "artifacts":
                raise
            # The persisted ref was replaced and a garbage collection removed chunks of the
            # manifest we read: the current one names chunks that exist.
            last = StaleManifestError(f"persisted manifest of {rel!r} was replaced during the get: {e}", origin)
            continue
        wire = source.bytes_received if isinstance(source, OriginSource) else counting.bytes
        return TransferRecord(
            files=r.files, bytes_total=r.bytes_total, chunks_transferred=r.chunks_fetched,
            bytes_transferred=wire, chunks_reused=len(m.chunk_sizes()) - r.chunks_fetched,
            seconds=time.perf_counter() - t0, source=kind, manifest_id=m.id.hex(),
        )
    raise StaleManifestError(f"{rel!r} kept changing at {origin!r} during {STALE_RETRIES} attempts: {last}", origin)


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


def exists_local(path: Path) -> bool:
    ctx = require_run("Path.exists_local()")
    return os.path.lexists(_dest(ctx, path))


def exists_remote(path: Path) -> bool:
    ctx = require_run("Path.exists_remote()")
    origin = path.origin_name
    if origin is None:
        return False
    rel = os.fspath(path)
    if origin == ctx.name:
        return os.path.lexists(_dest(ctx, path))
    url = ctx.registry.get(origin)
    if url:
        try:
            return OriginClient(origin, url, ctx.secret, ctx.timeout).exists(rel)
        except OriginUnreachableError:
            if ctx.artifacts.manifest(origin, rel) is None:
                raise
            return True
    return ctx.artifacts.manifest(origin, rel) is not None
