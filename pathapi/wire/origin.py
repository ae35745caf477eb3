"""The origin service: each work serves the files under its root to the works of its app.

HTTP (aiohttp) on loopback by default, or HTTPS only when the app run speaks TLS (a server
context from :mod:`.tls`: a certificate signed by the run's CA; a plain-HTTP request then
fails the handshake and gets no answer); every request must carry the app run's secret
(compared in constant time). A consumer asks for the *current* manifest of a path (a fresh
snapshot, cheap thanks to the stat cache), then for chunks of it by id. Chunks are read
straight from the files and checked against their ids before they are sent: a file that
changed since the manifest answers "stale", and the consumer starts over with a new one.

Connections are admitted by :class:`_Slots`: one that has not presented the secret within
HEADER_TIMEOUT is closed, and such connections can never take the slots a consumer needs
(docs/format.md, "Origin protocol": Connections).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import logging
import os
import resource
import ssl
import stat
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from cas import Manifest, delta
from cas.chunking import iter_chunk_spans
from cas.compress import decompress, maybe_compress
from cas.errors import FileChangedError, SnapshotError, UnsafePathError
from cas.fsutil import open_beneath
from cas.hashing import chunk_id
from cas.manifest import MAX_NAME_BYTES
from cas.workspace import Workspace

from ..chunkcache import Frame, FrameCache, PriorityGate
from ..paths import PathOutsideRootError, resolve_under
from ..version import Version
from . import codec, samehost
from .codec import decode_chunk_request, decode_delta_request, frame_head
from .protocol import (
    HEADER_PROTOCOL,
    MAX_ANSWER_BYTES,
    MAX_BATCH_IDS,
    MAX_DELTA_IDS,
    PROTOCOL_VERSION,
    ROUTE_CHUNKS,
    ROUTE_DELTAS,
    ROUTE_EXISTS,
    ROUTE_MANIFEST,
    ROUTE_STATS,
    STATUS_DELTA,
    STATUS_OK,
    STATUS_STALE,
    STATUS_UNKNOWN,
)

log = logging.getLogger(__name__)

#: Manifests kept for consumers still fetching one (older ones answer 410: ask again), and
#: the chunk locations they may hold in all beyond the newest two: a manifest of 100k small
#: files costs ~60 MiB here, so 32 of them would be 2 GiB.
_KEEP_MANIFESTS = 32
_KEEP_CHUNKS = 1 << 16
#: Bytes of recently served chunk frames kept for other consumers (see chunkcache.py).
CACHE_BYTES = int(os.environ.get("PATHAPI_ORIGIN_CACHE_MB", "64")) << 20
#: Chunk answers (each up to BATCH_BYTES, held about twice over while it is built and written)
#: built or being sent at once, whatever the number of consumers: two build on the pool while
#: one goes out. Bounds the origin's memory when many consumers ask together, and serves them
#: in arrival order, which keeps them close together in the file (the frame cache then serves
#: the followers).
MAX_ANSWERS = 3
#: With TLS, how long a closing connection waits for the client's close_notify.
TLS_SHUTDOWN_TIMEOUT = 10.0
#: With TLS, an answer is handed to the transport in pieces of this size (see _answer).
TLS_WRITE = int(os.environ.get("PATHAPI_TLS_WRITE_KB", "1024")) << 10

# What a hostile or broken client can hold, and for how long (docs/reliability.md):
#: A new connection must have presented the app secret (complete request headers with a
#: valid ``Authorization``) within HEADER_TIMEOUT of being accepted, or it is closed: a
#: client without the secret holds a slot for at most this long. A consumer sends its
#: headers right after connecting, so this only has to cover a slow network.
HEADER_TIMEOUT = 5.0
#: On a connection that presented the secret, the next request's headers must have arrived
#: IDLE_TIMEOUT after the previous answer was sent (aiohttp's keep-alive timer, not
#: restarted by a trickle of header bytes). Longer than the client's own keep-alive (15 s),
#: so a pooled connection is never cut under a consumer that reuses it.
IDLE_TIMEOUT = 60.0
#: A request body must be read, and an answer taken by the client, within IO_TIMEOUT.
IO_TIMEOUT = 60.0
#: Connections held at once (at most half the process's descriptors). Bounds what slow
#: clients hold until the timeouts above cut them.
MAX_CONNECTIONS = 1024
#: The share of those slots (1/RESERVED_SHARE of them, at least one) that only connections
#: which presented the secret may hold: connections that have not (yet) may hold the rest.
#: When a new connection finds no slot for it, the oldest connection that has not presented
#: the secret is closed to make room (a consumer presents it within milliseconds of
#: connecting, an idle or hostile client never does); only when every slot is held by
#: clients with the secret is the new one answered 503.
RESERVED_SHARE = 8
#: What a 503 (all slots held by clients with the secret) tells the client to wait, seconds.
BUSY_RETRY_AFTER = 1
#: A 503 connection reads (and drops) what the client sends for at most this long before it
#: is closed, so that the client sees the answer rather than a reset; at most
#: MAX_BUSY_LINGERING such connections linger at once (the others are closed at once).
BUSY_LINGER = 2.0
MAX_BUSY_LINGERING = 64
#: Request line and header limits. A path of 4096 bytes is 12 KiB percent-encoded.
MAX_REQUEST_LINE = 16 << 10
MAX_HEADER_FIELD = 8 << 10
MAX_HEADERS = 32
_PATH_MAX = 4096  # Linux: a longer path cannot be opened, so it cannot exist here
#: errno values for which a path (or a link on the way) leads to nothing: it does not exist.
_NOTHING_THERE = {errno.ENOENT: "does not exist", errno.ENOTDIR: "does not exist (a file where a folder is on its way)",
                  errno.ELOOP: "is a symlink loop", errno.ENAMETOOLONG: "is too long to exist"}


def origin_url(host: str, port: int, *, tls: bool) -> str:
    """The URL an origin is reached at: ``https://`` with TLS, else ``http://`` (an IPv6
    address in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def busy_answer(reason: str, retry_after: int = BUSY_RETRY_AFTER) -> bytes:
    """The raw 503 answer of a connection refused for want of a slot (see codec.busy_answer)."""
    return codec.busy_answer(reason, retry_after)


class _Busy(asyncio.Protocol):
    """A connection for which there is no slot: answered 503 at once, never parsed. What the
    client sends is read and dropped for up to BUSY_LINGER seconds (closing on unread bytes
    would reset the connection and could destroy the answer before the client reads it)."""

    def __init__(self, answer: bytes, slots: _Slots) -> None:
        self._answer = answer
        self._slots = slots
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._slots.lingering >= MAX_BUSY_LINGERING:
            _shut(transport, None if self._slots.tls is not None else self._answer)
            return
        self._slots.lingering += 1  # with TLS, from the start of the handshake
        self._counted = True
        if self._slots.tls is None:
            self._answer_on(transport)
        else:  # the answer goes inside TLS, so that the client sees "busy" and retries
            _start_tls(transport, self, self._slots, self._answer_on, self._gone)

    def _answer_on(self, transport: asyncio.Transport) -> None:
        transport.write(self._answer)
        self._timer = asyncio.get_running_loop().call_later(BUSY_LINGER, transport.close)

    def _gone(self) -> None:
        if self._counted:
            self._counted = False
            self._slots.lingering -= 1

    def data_received(self, data: bytes) -> None:
        pass  # the request of a client we cannot serve: dropped

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._gone()


def _start_tls(raw: asyncio.Transport, protocol: asyncio.Protocol, slots: _Slots,
               made: Callable[[asyncio.Transport], None], failed: Callable[[], None]) -> None:
    """Run the TLS handshake of a connection on its plain transport ``raw`` (which stays
    ours until it is done, so that it can be closed at once, its descriptor freed, whatever
    the client does), within the header timeout; then ``made(tls transport)``, or
    ``failed()`` once the connection is closed (handshake failed, timed out, or aborted)."""
    raw.pause_reading()  # nothing is read before the TLS layer takes the transport over
    context = slots.tls
    assert context is not None

    async def handshake() -> None:
        try:
            secure = await asyncio.get_running_loop().start_tls(
                raw, protocol, context, server_side=True, ssl_handshake_timeout=slots.header_timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
        except Exception:  # noqa: BLE001 - whatever a client did, it is closed and forgotten
            secure = None
        if secure is None or secure.is_closing():
            raw.abort()
            failed()
            return
        made(secure)

    task = asyncio.get_running_loop().create_task(handshake())
    slots.handshakes.add(task)
    task.add_done_callback(slots.handshakes.discard)


class _Tracked(asyncio.Protocol):
    """One connection in a slot: aiohttp's handler, seen by :class:`_Slots` as it is made
    and lost (every protocol event is passed on unchanged)."""

    def __init__(self, handler: RequestHandler, slots: _Slots) -> None:
        self.handler = handler
        self.slots = slots
        self.transport: asyncio.Transport | None = None
        self.requested = False  # a request reached the service on it (an answer may be on its way)
        self.timer: asyncio.TimerHandle | None = None
        #: Closed by _Slots before the loop made the connection (accepts come in bursts):
        #: the answer to send it, if any, once it is made; the handler never sees it.
        self.doomed: tuple[bytes | None] | None = None
        #: With TLS: the handshake is under way on ``transport`` (the plain one), which is
        #: then only ever aborted (a plain answer would be garbage to a TLS client).
        self.handshaking = False
        #: With TLS: what came in between the end of the handshake and the handler's start
        #: (the TLS layer delivers the client's first bytes as soon as it has them, at most
        #: one read of them before the handler starts), and whether the client's EOF did.
        self._early: list[bytes] = []
        self._early_eof = False
        self._started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.doomed is not None:
            _shut(transport, self.doomed[0] if self.slots.tls is None else None)
            return
        if self.slots.tls is None:
            self._start(transport)
            return
        self.handshaking = True
        _start_tls(transport, self, self.slots, self._secured, self._failed)

    def _secured(self, transport: asyncio.Transport) -> None:
        self.handshaking = False
        self.transport = transport
        self._start(transport)
        early, self._early = self._early, []
        for data in early:
            self.handler.data_received(data)
        if self._early_eof:
            self.handler.eof_received()

    def _failed(self) -> None:
        self.handshaking = False
        self.slots.forget(self)

    def _start(self, transport: asyncio.Transport) -> None:
        self._started = True
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._started:
            self.handler.data_received(data)
        elif self.handshaking:
            self._early.append(data)

    def eof_received(self) -> None:
        if self._started:
            self.handler.eof_received()  # None: the transport closes, as for aiohttp alone
        elif self.handshaking:
            self._early_eof = True

    def pause_writing(self) -> None:
        if self._started:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self._started:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            if self._started:
                self.handler.connection_lost(exc)
        finally:
            self.slots.forget(self)


def _shut(transport: asyncio.Transport, answer: bytes | None) -> None:
    """Close a connection now: with ``answer`` as the only bytes it gets (they fit any
    socket buffer, so the close is immediate), or aborted, which frees the descriptor at once."""
    if answer is None:
        transport.abort()
        return
    transport.write(answer)
    transport.close()


class _Slots:
    """Who holds the origin's connection slots (docs/reliability.md, "Hostile input").

    At most ``cap`` connections at once. A connection is *pending* from its accept until a
    request on it presents the app secret, then *trusted* until it closes. Guarantees:

    - a pending connection is closed ``header_timeout`` seconds after its accept;
    - pending connections hold at most ``cap - reserved`` slots: ``reserved`` are left to
      trusted ones, so clients without the secret can never take every slot;
    - a new connection that finds no slot closes the oldest pending one (answered 503 if no
      request reached the service on it yet) and takes its place: idle or hostile clients
      that never present the secret cannot keep a consumer out, however many they open;
    - only when all ``cap`` slots are trusted is a new connection answered 503, with the
      reason and ``Retry-After``; the client retries (pathapi.wire.client).
    """

    def __init__(self, name: str, cap: int, reserved: int, header_timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        #: With TLS, each connection's handshake runs in the slot it was admitted to (see
        #: _start_tls): a connection that never completes it is closed like any pending one.
        self.tls = tls
        self.handshakes: set[asyncio.Task[None]] = set()
        self.cap = cap
        self.reserved = min(max(1, reserved), cap - 1) if cap > 1 else 0
        self.header_timeout = header_timeout
        self._pending: OrderedDict[_Tracked, None] = OrderedDict()  # oldest first
        self._trusted: set[_Tracked] = set()
        self._by_handler: dict[RequestHandler, _Tracked] = {}
        self.lingering = 0  # _Busy connections reading out their request
        #: Connections closed to make room, closed for not presenting the secret in time, and
        #: answered 503 (for tests and operators).
        self.evicted = 0
        self.expired = 0
        self.refused = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def trusted(self) -> int:
        return len(self._trusted)

    @property
    def known(self) -> int:
        """Connections this object still holds anything of (pending, trusted, or accepted
        and not yet made): bounded by the slots, whatever clients do (tests check it)."""
        return len(self._by_handler)

    def admit(self, make_handler: Callable[[], RequestHandler]) -> asyncio.BaseProtocol:
        """The protocol for a connection just accepted: a slot of its own, or a 503."""
        full = len(self._pending) + len(self._trusted) >= self.cap
        if full or len(self._pending) >= self.cap - self.reserved:
            if not self._pending:
                self.refused += 1
                return _Busy(busy_answer(
                    f"origin {self.name!r} is at its limit of {self.cap} connections, all held by clients "
                    f"with the app secret: retry in {BUSY_RETRY_AFTER} s"), self)
            self._evict(next(iter(self._pending)))
        conn = _Tracked(make_handler(), self)
        self._pending[conn] = None
        self._by_handler[conn.handler] = conn
        conn.timer = asyncio.get_running_loop().call_later(self.header_timeout, self._expire, conn)
        return conn

    def trust(self, handler: RequestHandler) -> None:
        """A request on ``handler``'s connection presented the secret: it keeps its slot."""
        conn = self._by_handler.get(handler)
        if conn is None or conn in self._trusted:
            return
        self._pending.pop(conn, None)
        self._trusted.add(conn)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def saw_request(self, handler: RequestHandler) -> None:
        conn = self._by_handler.get(handler)
        if conn is not None:
            conn.requested = True

    def forget(self, conn: _Tracked) -> None:
        """``conn`` closed: its slot is free."""
        self._pending.pop(conn, None)
        self._trusted.discard(conn)
        self._by_handler.pop(conn.handler, None)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def _expire(self, conn: _Tracked) -> None:
        conn.timer = None
        if conn in self._pending:
            self.expired += 1
            self._close(conn, answer=None)

    def _evict(self, conn: _Tracked) -> None:
        self.evicted += 1
        answer = None if conn.requested else busy_answer(
            f"origin {self.name!r} gave this connection's slot to a newer one: the app secret did not come in time")
        self._close(conn, answer)

    def _close(self, conn: _Tracked, answer: bytes | None) -> None:
        """Close a pending connection now (its slot is free at once, whatever the client does)."""
        self._pending.pop(conn, None)
        transport = conn.transport
        if transport is None:  # accepted, not yet made: closed as soon as it is
            conn.doomed = (answer,)
        elif conn.handshaking:
            transport.abort()  # no TLS yet: nothing can be said to the client
        elif not transport.is_closing():
            _shut(transport, answer)


def _rank(served: _Served, ids: list[bytes]) -> int:
    """Where an answer's chunks lie in the manifest's order: its first known chunk's rank."""
    for cid in ids:
        loc = served.where.get(cid)
        if loc is not None:
            return loc[3]
    return 0


@dataclass
class _Served:
    manifest: Manifest
    root: str
    #: chunk id -> (file, offset, length, rank: the chunk's place in the manifest's order)
    where: dict[bytes, tuple[str, int, int, int]]
    #: the manifest's files under ``root``, in manifest order (the same-host numbering),
    #: made when a same-host consumer first asks
    paths: list[str] | None = None


class OriginService:
    """Serves ``root`` (a work's folder) to holders of ``secret``."""

    def __init__(self, name: str, root: str, secret: str, workspace: Workspace, host: str = "127.0.0.1",
                 cache_bytes: int = CACHE_BYTES, *, idle_timeout: float = IDLE_TIMEOUT, io_timeout: float = IO_TIMEOUT,
                 header_timeout: float = HEADER_TIMEOUT, max_connections: int | None = None,
                 reserved_connections: int | None = None, version: Callable[[], Version] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        #: the server context when the origin speaks TLS (pathapi.wire.tls): then it accepts
        #: TLS only (a plain-HTTP request fails the handshake and gets no answer) and its URL is https://
        self.tls = tls
        #: which run of the work produced its files now (stamped on every manifest served)
        self.version = version
        self.root = os.path.abspath(root)
        self.secret = secret.encode()
        self.workspace = workspace
        self.host = host
        self.url = ""
        self._served: OrderedDict[bytes, _Served] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pathapi-origin")
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self.idle_timeout = idle_timeout
        self.io_timeout = io_timeout
        if max_connections is None:
            max_connections = max(16, min(MAX_CONNECTIONS, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2))
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        #: Slots only connections that presented the secret may hold (see _Slots).
        self.reserved_connections = max(1, max_connections // RESERVED_SHARE) if reserved_connections is None else reserved_connections
        self.slots = _Slots(name, max_connections, self.reserved_connections, header_timeout, tls)
        #: Chunk reads from disk, for tests and benchmarks ("each chunk read once").
        self.chunks_read = 0
        self.bytes_read = 0
        self._count_lock = threading.Lock()
        self.cache = FrameCache(cache_bytes)
        self._answers: PriorityGate | None = None
        #: the same-host fast path (samehost.py), where this host allows it
        self.fd_server: samehost.FdServer | None = None

    async def start(self, port: int = 0) -> str:
        self._answers = PriorityGate(MAX_ANSWERS)
        app = web.Application(middlewares=[self._auth], client_max_size=1 << 20)
        app.router.add_get(ROUTE_MANIFEST, self._manifest)
        app.router.add_get(ROUTE_EXISTS, self._exists)
        app.router.add_post(ROUTE_CHUNKS, self._chunks)
        app.router.add_post(ROUTE_DELTAS, self._deltas)
        app.router.add_get(ROUTE_STATS, self._stats)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=self.idle_timeout,
            max_line_size=MAX_REQUEST_LINE, max_field_size=MAX_HEADER_FIELD, max_headers=MAX_HEADERS,
            # Request bodies are never compressed in this protocol: a gzip body stays gzip
            # (and fails to parse), never a bomb inflated by the server, not even while it
            # drains the body of a request it refused.
            auto_decompress=False,
            # After answering early (401, 413, 408), the rest of a body is read and dropped
            # so the client sees the answer, for at most this long.
            lingering_time=min(10.0, self.io_timeout),
        )
        await self._runner.setup()
        server = self._runner.server
        assert server is not None

        # aiohttp has no connection limit of its own: _Slots admits (or refuses) each one.
        # With TLS the listener is plain and each admitted connection runs its handshake in
        # its slot (_start_tls): it counts against the connection's header_timeout (its
        # timer starts at the accept), and a connection closed meanwhile is gone at once.
        self._listener = await asyncio.get_running_loop().create_server(
            lambda: self.slots.admit(server), self.host, port)
        sock = self._listener.sockets[0]
        host, port = sock.getsockname()[:2]
        self.url = origin_url(host, port, tls=self.tls is not None)
        if samehost.enabled():
            try:
                self.fd_server = samehost.FdServer(self.secret, self._served_files, self.io_timeout)
            except OSError as e:  # no Unix sockets here: every consumer uses HTTP
                log.info("origin %s: no same-host fast path: %s", self.name, e)
        return self.url

    async def stop(self) -> None:
        if self.fd_server is not None:
            self.fd_server.close()
        if self._listener is not None:
            self._listener.close()
        for handshake in list(self.slots.handshakes):
            handshake.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._listener is not None:
            await self._listener.wait_closed()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- middleware --------------------------------------------------------------
    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        token = codec.bearer_token(request.headers.get("Authorization", ""))
        conn = request.protocol
        self.slots.saw_request(conn)
        if not hmac.compare_digest(token, self.secret):
            # Never kept alive: a client without the secret gets no slot beyond this answer.
            refused = web.json_response({"error": "missing or wrong app secret"}, status=401)
            refused.force_close()
            return refused
        self.slots.trust(conn)
        if request.headers.get(HEADER_PROTOCOL) != PROTOCOL_VERSION:
            return web.json_response({"error": f"protocol version {PROTOCOL_VERSION} required"}, status=400)
        resp = await handler(request)
        if not resp.prepared:
            async with self._sending(request):
                await resp.prepare(request)
                await resp.write_eof()
        return resp

    async def _body(self, request: web.Request) -> bytes:
        """The request body (at most client_max_size), read within io_timeout (else 408)."""
        try:
            async with asyncio.timeout(self.io_timeout):
                return await request.read()
        except TimeoutError:
            raise web.HTTPRequestTimeout(text=f"request body not received within {self.io_timeout:g} s") from None

    @asynccontextmanager
    async def _sending(self, request: web.Request) -> AsyncIterator[None]:
        """Bounds how long a client may take to accept an answer: one that does not read it
        within io_timeout is cut off (what was buffered for it is dropped)."""
        try:
            async with asyncio.timeout(self.io_timeout):
                yield
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            pass  # the client is gone: nothing more to send it

    @staticmethod
    def _too_big(served: _Served, ids: list[bytes]) -> web.StreamResponse | None:
        """413 if the chunks asked for (each time it is asked) add up to more than one answer may hold."""
        total = sum(served.where[cid][2] for cid in ids if cid in served.where)
        if total <= MAX_ANSWER_BYTES:
            return None
        return web.json_response({"error": f"{total} bytes asked for, at most {MAX_ANSWER_BYTES} per answer"}, status=413)

    # -- handlers ----------------------------------------------------------------
    def _target(self, request: web.Request) -> str:
        rel = request.query.get("path", "")
        try:
            return resolve_under(self.root, rel)
        except PathOutsideRootError as e:
            raise web.HTTPForbidden(text=str(e)) from None

    def _lookup(self, rel: str, full: str) -> tuple[str | None, str]:
        """Where the files of ``rel`` (at ``full``) are served from, or None and why not.

        A symlink at the path itself (or on its way) is resolved: the answer is the place
        it leads to, written below ``self.root`` with no link left under the root, which is
        where the snapshot walks and chunks are read from (with ``O_NOFOLLOW`` below the
        root). None for a path that leads to nothing: missing, a dangling link, a link loop,
        a file where a folder is on its way, or neither a file nor a folder (a FIFO, a
        socket, a device). A link that leads out of the root is a 403 here, as in
        ``resolve_under``: its target may have changed since that check.
        """
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(full)
        if real != real_root and not real.startswith(real_root + os.sep):
            raise web.HTTPForbidden(text=f"path {rel!r} resolves outside the work's root")
        try:
            st = os.stat(real)
        except OSError as e:
            why = _NOTHING_THERE.get(e.errno or 0)
            if why is None:
                return real, ""  # e.g. EACCES on the way: the snapshot says what it is
            return None, f"{rel!r} {why} at {self.name}"
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return None, f"{rel!r} is neither a file nor a folder at {self.name}: nothing that can be fetched"
        return (self.root if real == real_root else os.path.join(self.root, os.path.relpath(real, real_root))), ""

    async def _exists(self, request: web.Request) -> web.StreamResponse:
        """Whether ``get`` finds files at the path: true exactly when it resolves, inside the
        root, to a file or a folder (a dangling link or a loop is not there; a link out of
        the root is refused with 403, as the manifest is)."""
        rel = request.query.get("path", "")
        where, _ = self._lookup(rel, self._target(request))
        return web.json_response({"exists": where is not None})

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        """Counters for benchmarks and operators: chunk reads from disk and the frame cache."""
        with self._count_lock:
            reads = {"chunks_read": self.chunks_read, "bytes_read": self.bytes_read}
        return web.json_response({**reads, "cache": self.cache.stats()})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        full = self._target(request)
        rel = request.query.get("path", "")
        if len(os.fsencode(full)) >= _PATH_MAX or any(len(os.fsencode(p)) > MAX_NAME_BYTES for p in full.split(os.sep)):
            return web.json_response({"error": f"{rel!r} is too long to exist at {self.name}"}, status=404)
        where, why = self._lookup(rel, full)
        if where is None:
            return web.json_response({"error": why}, status=404)
        loop = asyncio.get_running_loop()
        # Read before the snapshot: a run that ends meanwhile makes the stamp older than the
        # tree, never newer (a consumer then treats what it got as older, the safe side).
        version = self.version() if self.version is not None else None
        try:
            m = await loop.run_in_executor(self._pool, self.workspace.snapshot, where)
        except FileNotFoundError:
            return web.json_response({"error": f"{request.query.get('path')!r} does not exist at {self.name}"}, status=404)
        except FileChangedError as e:
            return web.json_response({"error": str(e)}, status=409)
        except UnsafePathError as e:
            return web.json_response({"error": str(e)}, status=403)
        except SnapshotError as e:
            return web.json_response({"error": str(e)}, status=500)
        self._remember(m, where)
        headers = codec.manifest_headers(m.id, version)
        if self.fd_server is not None:
            headers[samehost.HEADER_SAME_HOST] = self.fd_server.advertisement
        return web.Response(body=m.encode(), content_type="application/octet-stream", headers=headers)

    def _served_files(self, manifest_id: bytes) -> samehost.ServedFiles | None:
        """The files a same-host consumer of ``manifest_id`` may open (called on its link's
        thread: one dict read, and the path list made once per manifest)."""
        served = self._served.get(manifest_id)
        if served is None:
            return None
        if served.paths is None:
            served.paths = samehost.file_paths(served.manifest, served.root)
        return samehost.ServedFiles(self.root, served.paths)

    def _remember(self, m: Manifest, base: str) -> None:
        """Keep where ``m``'s chunks lie: in the files under ``base``, the link-free place
        (see _lookup) the snapshot walked, so that chunks read with ``O_NOFOLLOW`` below the
        root come from the files the manifest describes (a Path that is a link to a file or
        a folder included)."""
        # Manifests name content, not places: two paths (or a link before and after it was
        # retargeted) holding equal trees share an id. Chunks are read from where the tree
        # was snapshotted last: the other place may have changed or gone since.
        known = self._served.get(m.id)
        if known is not None and known.root == base:
            self._served.move_to_end(m.id)
            return
        where: dict[bytes, tuple[str, int, int, int]] = {}
        for e in m.files():
            path = os.path.join(base, e.path) if e.path else base
            for cid, off, n in iter_chunk_spans(e.chunks):
                where.setdefault(cid, (path, off, n, len(where)))
        self._served[m.id] = _Served(m, base, where)
        self._served.move_to_end(m.id)
        while len(self._served) > 2 and (
            len(self._served) > _KEEP_MANIFESTS or sum(len(s.where) for s in self._served.values()) > _KEEP_CHUNKS
        ):
            self._served.popitem(last=False)

    async def _chunks(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        try:
            manifest_id, ids = decode_chunk_request(body)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        if len(ids) > MAX_BATCH_IDS:
            return web.json_response({"error": f"at most {MAX_BATCH_IDS} ids per request"}, status=413)
        served = self._served.get(manifest_id)
        if served is None:
            return web.json_response({"error": "unknown manifest (expired or never served): ask for a new one"}, status=410)
        too_big = self._too_big(served, ids)
        if too_big is not None:
            return too_big
        return await self._answer(request, _rank(served, ids), self._read_frames, served, ids)

    async def _deltas(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        try:
            manifest_id, block, wants = decode_delta_request(body)
        except ValueError as e:
            return web.json_response({"error": f"bad delta request: {e}"}, status=400)
        if len(wants) > MAX_DELTA_IDS:
            return web.json_response({"error": f"at most {MAX_DELTA_IDS} chunks per delta request"}, status=413)
        served = self._served.get(manifest_id)
        if served is None:
            return web.json_response({"error": "unknown manifest (expired or never served): ask for a new one"}, status=410)
        too_big = self._too_big(served, [cid for cid, _ in wants])
        if too_big is not None:
            return too_big
        ids = [cid for cid, _ in wants]
        return await self._answer(request, _rank(served, ids), self._read_frames, served, ids, dict(wants), block)

    async def _answer(
        self, request: web.Request, rank: int, build: Callable[..., bytes], *args: object
    ) -> web.StreamResponse:
        """Build a chunk answer on the pool and send it, at most MAX_ANSWERS at a time (the
        slot is held until the body has been handed to the socket); waiting answers go
        lowest ``rank`` (place in the file) first, which keeps concurrent consumers of one
        checkpoint together (see chunkcache.PriorityGate)."""
        assert self._answers is not None
        await self._answers.acquire(rank)
        try:
            frames = await asyncio.get_running_loop().run_in_executor(self._pool, build, *args)
            # Headers, then the body on its own: handing both to the transport at once would
            # join them into one more copy of the body.
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = len(frames)
            async with self._sending(request):
                await resp.prepare(request)
                if self.tls is None:
                    await resp.write(frames)
                else:
                    # asyncio's TLS transport encrypts what it is handed into a memory buffer
                    # in one go, then copies it out: in TLS_WRITE pieces that buffer stays
                    # small (docs/benchmarks.md, "TLS").
                    view = memoryview(frames)
                    for at in range(0, len(view), TLS_WRITE):
                        await resp.write(view[at : at + TLS_WRITE])
                    view.release()
                del frames
                await resp.write_eof()
            return resp
        finally:
            self._answers.release()

    def _read_frames(
        self, served: _Served, ids: list[bytes], bases: dict[bytes, bytes] | None = None, block: int = delta.BLOCK_SIZE
    ) -> bytes:
        """Frames for ``ids``, each read from its file and checked against its id (or taken
        from the frame cache, where only verified chunks enter); as a block delta where
        ``bases`` holds the requester's block digests and a delta pays."""
        out: list[bytes | memoryview] = []
        fds: dict[str, int] = {}
        try:
            for cid in ids:
                loc = served.where.get(cid)
                if loc is None:
                    out.append(frame_head(STATUS_UNKNOWN, 0, cid, 0, 0))
                    continue
                frame = self.cache.get_or_load(cid, functools.partial(self._load, fds, cid, loc))
                if frame is None:
                    out.append(frame_head(STATUS_STALE, 0, cid, 0, 0))
                    continue
                payload: bytes | memoryview = frame.payload
                status, codec, raw = STATUS_OK, frame.codec, frame.raw_len
                digests = bases.get(cid) if bases else None
                if digests:
                    body = delta.encode(decompress(codec, payload, raw, cid.hex()), digests, block)
                    if body is not None:
                        status, raw = STATUS_DELTA, len(body)  # plain length of what is sent
                        codec, payload = maybe_compress(body)
                out.append(frame_head(status, codec, cid, raw, len(payload)))
                out.append(payload)
        finally:
            for fd in fds.values():
                os.close(fd)
        return b"".join(out)

    def _load(self, fds: dict[str, int], cid: bytes, loc: tuple[str, int, int, int]) -> Frame | None:
        """Read one chunk from its file, verify it, encode it; None if it no longer verifies."""
        path, off, n, _ = loc
        try:
            fd = fds.get(path)
            if fd is None:
                # One file open at a time: a batch may name 4096 small files (more than a
                # common descriptor limit), and it names them file by file.
                for old in fds.values():
                    os.close(old)
                fds.clear()
                fd = fds[path] = open_beneath(self.root, path)  # no link below the root is followed
            data = os.pread(fd, n, off)
        except (OSError, ValueError):
            data = b""
        with self._count_lock:
            self.chunks_read += 1
            self.bytes_read += len(data)
        if len(data) != n or chunk_id(data) != cid:
            return None
        codec, payload = maybe_compress(data)
        return Frame(codec, n, bytes(payload))
