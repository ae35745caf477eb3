"""The origin service: each work serves the files under its root to the works of its app.

HTTP (aiohttp) on loopback by default; every request must carry the app run's secret
(compared in constant time). A consumer asks for the *current* manifest of a path (a fresh
snapshot, cheap thanks to the stat cache), then for chunks of it by id. Chunks are read
straight from the files and checked against their ids before they are sent: a file that
changed since the manifest answers "stale", and the consumer starts over with a new one.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from cas import Kind, Manifest, delta
from cas.chunking import iter_chunk_spans
from cas.compress import maybe_compress
from cas.errors import FileChangedError, SnapshotError, UnsafePathError
from cas.hashing import ID_SIZE, chunk_id
from cas.workspace import Workspace

from .protocol import (
    DELTA_HEAD, DELTA_ITEM, FRAME, HEADER_MANIFEST_ID, HEADER_PROTOCOL, MAX_BATCH_IDS, MAX_DELTA_IDS,
    PROTOCOL_VERSION, STATUS_DELTA, STATUS_OK, STATUS_STALE, STATUS_UNKNOWN,
)

_KEEP_MANIFESTS = 32


def _parse_delta_request(body: bytes) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
    """(manifest id, block size, [(chunk id, base digests)]) of a /v1/deltas body."""
    if len(body) < ID_SIZE + DELTA_HEAD.size:
        raise ValueError("truncated header")
    block, count = DELTA_HEAD.unpack_from(body, ID_SIZE)
    if block < 4096 or block > (1 << 20) or block & (block - 1):
        raise ValueError(f"block size {block} is not a power of two in [4 KiB, 1 MiB]")
    if count > MAX_DELTA_IDS:
        raise ValueError(f"{count} chunks (at most {MAX_DELTA_IDS})")
    pos = ID_SIZE + DELTA_HEAD.size
    wants: list[tuple[bytes, bytes]] = []
    for _ in range(count):
        if pos + DELTA_ITEM.size > len(body):
            raise ValueError("truncated entry")
        cid, n = DELTA_ITEM.unpack_from(body, pos)
        pos += DELTA_ITEM.size
        if n * delta.DIGEST_SIZE + pos > len(body):
            raise ValueError("truncated digests")
        wants.append((cid, body[pos : pos + n * delta.DIGEST_SIZE]))
        pos += n * delta.DIGEST_SIZE
    if pos != len(body):
        raise ValueError(f"{len(body) - pos} trailing bytes")
    return body[:ID_SIZE], block, wants


class PathOutsideRootError(ValueError):
    """A request named a path that is not inside the origin's root."""


def resolve_under(root: str, rel: str) -> str:
    """The absolute path of ``rel`` inside ``root``; refuses anything that leaves ``root``
    (absolute paths, ``..``, NULs, or symlinks that resolve outside)."""
    if not rel or "\x00" in rel or rel.startswith("/") or "\\" in rel:
        raise PathOutsideRootError(f"path {rel!r} is not a relative path inside the work's root")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise PathOutsideRootError(f"path {rel!r} has a '..' component")
    real_root = os.path.realpath(root)
    full = os.path.join(real_root, *parts) if parts else real_root
    real = os.path.realpath(full)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise PathOutsideRootError(f"path {rel!r} resolves outside the work's root")
    return full


@dataclass
class _Served:
    manifest: Manifest
    root: str
    where: dict[bytes, tuple[str, int, int]]


class OriginService:
    """Serves ``root`` (a work's folder) to holders of ``secret``."""

    def __init__(self, name: str, root: str, secret: str, workspace: Workspace, host: str = "127.0.0.1") -> None:
        self.name = name
        self.root = os.path.abspath(root)
        self.secret = secret.encode()
        self.workspace = workspace
        self.host = host
        self.url = ""
        self._served: OrderedDict[bytes, _Served] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pathapi-origin")
        self._runner: web.AppRunner | None = None
        #: Chunk reads from disk, for tests and benchmarks ("each chunk read once").
        self.chunks_read = 0
        self._count_lock = threading.Lock()

    async def start(self, port: int = 0) -> str:
        app = web.Application(middlewares=[self._auth], client_max_size=1 << 20)
        app.router.add_get("/v1/manifest", self._manifest)
        app.router.add_get("/v1/exists", self._exists)
        app.router.add_post("/v1/chunks", self._chunks)
        app.router.add_post("/v1/deltas", self._deltas)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- middleware --------------------------------------------------------------
    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        got = request.headers.get("Authorization", "")
        token = got[7:].encode() if got.startswith("Bearer ") else b""
        if not hmac.compare_digest(token, self.secret):
            return web.json_response({"error": "missing or wrong app secret"}, status=401)
        if request.headers.get(HEADER_PROTOCOL) != PROTOCOL_VERSION:
            return web.json_response({"error": f"protocol version {PROTOCOL_VERSION} required"}, status=400)
        return await handler(request)

    # -- handlers ----------------------------------------------------------------
    def _target(self, request: web.Request) -> str:
        rel = request.query.get("path", "")
        try:
            return resolve_under(self.root, rel)
        except PathOutsideRootError as e:
            raise web.HTTPForbidden(text=str(e)) from None

    async def _exists(self, request: web.Request) -> web.StreamResponse:
        full = self._target(request)
        return web.json_response({"exists": os.path.lexists(full)})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        full = self._target(request)
        loop = asyncio.get_running_loop()
        try:
            m = await loop.run_in_executor(self._pool, self.workspace.snapshot, full)
        except FileNotFoundError:
            return web.json_response({"error": f"{request.query.get('path')!r} does not exist at {self.name}"}, status=404)
        except FileChangedError as e:
            return web.json_response({"error": str(e)}, status=409)
        except UnsafePathError as e:
            return web.json_response({"error": str(e)}, status=403)
        except SnapshotError as e:
            return web.json_response({"error": str(e)}, status=500)
        self._remember(m, full)
        return web.Response(body=m.encode(), content_type="application/octet-stream",
                            headers={HEADER_MANIFEST_ID: m.id.hex()})

    def _remember(self, m: Manifest, full: str) -> None:
        # A root that is a symlink to a file was resolved by the snapshot; chunks are read with
        # O_NOFOLLOW, so they are read from the file it resolved to.
        base = full if m.root_kind == Kind.DIR else os.path.realpath(full)
        # Manifests name content, not places: two paths (or a link before and after it was
        # retargeted) holding equal trees share an id. Chunks are read from where the tree
        # was snapshotted last: the other place may have changed or gone since.
        known = self._served.get(m.id)
        if known is not None and known.root == base:
            self._served.move_to_end(m.id)
            return
        where: dict[bytes, tuple[str, int, int]] = {}
        for e in m.files():
            path = os.path.join(base, e.path) if e.path else base
            for cid, off, n in iter_chunk_spans(e.chunks):
                where.setdefault(cid, (path, off, n))
        self._served[m.id] = _Served(m, base, where)
        self._served.move_to_end(m.id)
        while len(self._served) > _KEEP_MANIFESTS:
            self._served.popitem(last=False)

    async def _chunks(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if len(body) < ID_SIZE or (len(body) - ID_SIZE) % ID_SIZE:
            return web.json_response({"error": "body must be a manifest id and chunk ids, 32 bytes each"}, status=400)
        ids = [body[i : i + ID_SIZE] for i in range(ID_SIZE, len(body), ID_SIZE)]
        if len(ids) > MAX_BATCH_IDS:
            return web.json_response({"error": f"at most {MAX_BATCH_IDS} ids per request"}, status=413)
        served = self._served.get(body[:ID_SIZE])
        if served is None:
            return web.json_response({"error": "unknown manifest (expired or never served): ask for a new one"}, status=410)
        frames = await asyncio.get_running_loop().run_in_executor(self._pool, self._read_frames, served, ids)
        return web.Response(body=frames, content_type="application/octet-stream")

    async def _deltas(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            manifest_id, block, wants = _parse_delta_request(body)
        except ValueError as e:
            return web.json_response({"error": f"bad delta request: {e}"}, status=400)
        if len(wants) > MAX_DELTA_IDS:
            return web.json_response({"error": f"at most {MAX_DELTA_IDS} chunks per delta request"}, status=413)
        served = self._served.get(manifest_id)
        if served is None:
            return web.json_response({"error": "unknown manifest (expired or never served): ask for a new one"}, status=410)
        frames = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._read_frames, served, [cid for cid, _ in wants], dict(wants), block
        )
        return web.Response(body=frames, content_type="application/octet-stream")

    def _read_frames(
        self, served: _Served, ids: list[bytes], bases: dict[bytes, bytes] | None = None, block: int = delta.BLOCK_SIZE
    ) -> bytes:
        """Frames for ``ids``, each read from its file and checked against its id; as a block
        delta where ``bases`` holds the requester's block digests and a delta pays."""
        out: list[bytes | memoryview] = []
        fds: dict[str, int] = {}
        try:
            for cid in ids:
                loc = served.where.get(cid)
                if loc is None:
                    out.append(FRAME.pack(STATUS_UNKNOWN, 0, cid, 0, 0))
                    continue
                path, off, n = loc
                try:
                    fd = fds.get(path)
                    if fd is None:
                        fd = fds[path] = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    data = os.pread(fd, n, off)
                except OSError:
                    data = b""
                with self._count_lock:
                    self.chunks_read += 1
                if len(data) != n or chunk_id(data) != cid:
                    out.append(FRAME.pack(STATUS_STALE, 0, cid, 0, 0))
                    continue
                status = STATUS_OK
                digests = bases.get(cid) if bases else None
                body = delta.encode(data, digests, block) if digests else None
                if body is not None:
                    status, data = STATUS_DELTA, body
                codec, payload = maybe_compress(data)
                out.append(FRAME.pack(status, codec, cid, len(data), len(payload)))  # plain length of what is sent
                out.append(payload)
        finally:
            for fd in fds.values():
                os.close(fd)
        return b"".join(out)
