"""The consumer side of the origin protocol: ask for manifests, fetch chunks.

Connection problems and timeouts become :class:`OriginUnreachableError` within the
configured timeout (never a hang), and so does an origin that stays busy (503: no
connection slot free) for that long, after retries with backoff; a refused secret is
:class:`AuthenticationError`. With TLS (a client given the app run's pinned context, see
:mod:`.tls`) every request goes over TLS to an ``https://`` URL: an ``http://`` URL is refused
before anything is sent (the secret never goes out in clear), and an origin whose
certificate does not verify is :class:`OriginTLSError`, raised before any request is sent.
Every chunk is decoded and verified against its id here, before anyone writes it.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

import aiohttp

from cas import Manifest, delta
from cas.compress import decompress
from cas.errors import ChunkNotFoundError
from cas.hashing import ChunkId, chunk_id, verify
from cas.store.base import ChunkSource

from ..aio import io_loop
from ..errors import AuthenticationError, OriginError, OriginTLSError, OriginUnreachableError, StaleManifestError
from ..version import Version
from . import samehost
from .codec import (
    encode_chunk_request,
    encode_delta_request,
    frame_bound,
    iter_frames,
    json_field,
    manifest_version,
    request_headers,
    retry_after,
)
from .protocol import (
    BATCH_BYTES,
    HEADER_MANIFEST_ID,
    HEADER_VERSION,
    MAX_BATCH_IDS,
    MAX_DELTA_IDS,
    ROUTE_CHUNKS,
    ROUTE_DELTAS,
    ROUTE_EXISTS,
    ROUTE_MANIFEST,
    STATUS_DELTA,
    STATUS_OK,
    STATUS_STALE,
)

#: Chunk requests in flight at once per transfer.
IN_FLIGHT = 4
#: What a small answer (exists, an error) may hold at most.
_SMALL_ANSWER = 64 << 10
#: Bytes of an answer that must arrive within each ``timeout`` seconds (or the answer end).
PROGRESS_BYTES = 64 << 10
#: A 503 (the origin has no connection slot free) is retried for up to the client's
#: ``timeout``, waiting what its ``Retry-After`` says (or BUSY_FIRST_WAIT, doubling up to
#: BUSY_MAX_WAIT, without one), each wait jittered by +-25 % so that consumers turned away
#: together do not all come back together.
BUSY_FIRST_WAIT = 0.1
BUSY_MAX_WAIT = 2.0

_sessions: dict[int, aiohttp.ClientSession] = {}  # one per event loop, used only on that loop


async def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    s = _sessions.get(id(loop))
    if s is None or s.closed:
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), auto_decompress=False)
        _sessions[id(loop)] = s
    return s


async def close_sessions() -> None:
    """Close this loop's HTTP session (at process shutdown)."""
    s = _sessions.pop(id(asyncio.get_running_loop()), None)
    if s is not None:
        await s.close()


class OriginClient:
    """Talks to the origin service of work ``name`` at ``url``.

    ``tls`` is the app run's client context (:meth:`.tls.TlsConfig.client_context`) when
    the run speaks TLS: then ``url`` must be ``https://`` (else :class:`OriginTLSError`,
    here, before any connection), and without it ``url`` must be ``http://``.
    """

    def __init__(self, name: str, url: str, secret: str, timeout: float, tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.secret = secret
        self.tls = tls
        scheme = self.url.split("://", 1)[0].lower()
        if tls is not None and scheme != "https":
            raise OriginTLSError(
                f"origin {name!r} at {self.url}: this app run speaks TLS, and this URL is not https://; "
                "nothing was sent (the app secret never goes out in clear)", name)
        if tls is None and scheme == "https":
            raise OriginTLSError(f"origin {name!r} at {self.url} speaks TLS, and this work has no CA to verify it with", name)
        self._headers = request_headers(secret)
        #: the origin's same-host socket, when its last manifest answer offered one usable here
        self.same_host: str | None = None

    def _t(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_connect=self.timeout, sock_read=self.timeout)

    async def _request(self, method: str, path: str, limit: int | None = None, **kw: object) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers); a body longer than ``limit`` bytes is an OriginError,
        raised before more than that is held. An origin with no connection slot free (503)
        is asked again with backoff for up to ``timeout`` seconds; then
        :class:`OriginUnreachableError` names the origin and the reason it gave."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.timeout
        wait = BUSY_FIRST_WAIT
        while True:
            status, body, headers = await self._request_once(method, path, limit, **kw)
            if status != 503:
                return status, body, headers
            left = give_up - loop.time()
            if left <= 0:
                raise OriginUnreachableError(
                    f"origin {self.name!r} at {self.url} is busy: it kept refusing {path} for {self.timeout:g} s "
                    f"(HTTP 503: {_reason(body)}). It serves again once other clients' connections close; "
                    "retry later", self.name)
            hint = retry_after(headers, BUSY_MAX_WAIT)
            pause = hint if hint is not None else wait
            wait = min(2 * wait, BUSY_MAX_WAIT)
            await asyncio.sleep(min(left, pause * random.uniform(0.75, 1.25)))

    async def _request_once(self, method: str, path: str, limit: int | None, **kw: object) -> tuple[int, bytes, dict[str, str]]:
        """One request: (status, body, headers), or the connection's failure as a pathapi error."""
        s = await _session()
        try:
            # Connecting and the first answer each have ``timeout``: the status line and
            # headers must be in by then (an origin trickling them is not waited on forever).
            async with asyncio.timeout(2 * self.timeout) as head_deadline:
                async with s.request(method, self.url + path, headers=self._headers, timeout=self._t(),
                                     ssl=self.tls if self.tls is not None else True, **kw) as r:  # type: ignore[arg-type]
                    head_deadline.reschedule(None)
                    body = await self._read_body(r, path, limit)
                    return r.status, body, dict(r.headers)
        except (OriginError, OriginUnreachableError):
            raise
        except aiohttp.ClientSSLError as e:  # the handshake failed: nothing was sent
            raise OriginTLSError(
                f"origin {self.name!r} at {self.url} failed TLS verification (its certificate must chain to this "
                f"app run's CA, name {_host(self.url)} and be within its validity window; or it does not speak TLS): "
                f"{type(e).__name__}: {_ssl_reason(e)}", self.name) from None
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as e:
            what = (f"did not answer within {self.timeout:g} s" if isinstance(e, asyncio.TimeoutError)
                    else "could not be reached or dropped the connection")
            raise OriginUnreachableError(
                f"origin {self.name!r} at {self.url} {what}: {type(e).__name__}: {e}", self.name
            ) from None
        except aiohttp.ClientError as e:  # e.g. ClientPayloadError: the origin died mid-answer
            raise OriginUnreachableError(
                f"origin {self.name!r} at {self.url} broke off its answer: {type(e).__name__}: {e}",
                self.name,
            ) from None

    async def _read_body(self, r: aiohttp.ClientResponse, path: str, limit: int | None) -> bytes:
        """The answer's body; more than ``limit`` bytes (if given) is an OriginError, raised
        before more than that is held. An origin that trickles its answer is given up on as
        a silent one is: every ``timeout`` seconds must bring ``PROGRESS_BYTES`` or the end
        (a read timeout alone would wait forever on one byte per second)."""
        loop = asyncio.get_running_loop()
        pieces: list[bytes] = []
        n = window = 0
        window_end = loop.time() + self.timeout
        while True:
            deadline = asyncio.timeout_at(window_end)
            try:
                async with deadline:
                    piece = await r.content.readany()
            except TimeoutError:
                if not deadline.expired():
                    raise  # the socket's own read timeout
                raise OriginUnreachableError(
                    f"origin {self.name!r} at {self.url} did not send its answer to {path} within {self.timeout:g} s: "
                    f"{window} bytes came in that time, at least {PROGRESS_BYTES} were due (stalled or trickling)",
                    self.name,
                ) from None
            if not piece:
                return b"".join(pieces)
            n += len(piece)
            if limit is not None and n > limit:
                raise OriginError(
                    f"origin {self.name!r} at {self.url} answered {path} with more than the {limit} bytes asked for",
                    self.name,
                )
            pieces.append(piece)
            window += len(piece)
            if window >= PROGRESS_BYTES:
                window, window_end = 0, loop.time() + self.timeout

    def _call(self, method: str, path: str, **kw: Any) -> tuple[int, bytes, dict[str, str]]:
        # The request itself is bounded by its own timeouts; the extra margin only guards
        # against a wedged loop.
        return io_loop().run(self._request(method, path, **kw), timeout=self.timeout * 4 + 30)

    def _check(self, status: int, body: bytes, what: str) -> None:
        if status == 401:
            raise AuthenticationError(f"origin {self.name!r} refused the app secret ({what})", self.name)
        if status >= 400:
            raise OriginError(
                f"origin {self.name!r} could not serve {what}: HTTP {status}: {body[:300].decode(errors='replace')}", self.name)

    def manifest(self, rel: str) -> Manifest | None:
        """The current manifest of ``rel`` at the origin, or None if it does not exist there."""
        return self.current(rel)[0]

    def current(self, rel: str) -> tuple[Manifest | None, Version | None]:
        """The current manifest of ``rel`` at the origin (None if it does not exist there),
        and the version of the origin's run that produced it (None if it said none)."""
        status, body, headers = self._call("GET", ROUTE_MANIFEST, params={"path": rel})
        if status == 404:
            return None, None
        if status == 409:
            raise StaleManifestError(f"origin {self.name!r}: {rel!r} is changing: {body[:300].decode(errors='replace')}", self.name)
        self._check(status, body, repr(rel))
        m = Manifest.decode(body)
        if headers.get(HEADER_MANIFEST_ID) != m.id.hex():
            raise OriginError(f"origin {self.name!r} sent a manifest whose id does not match its header", self.name)
        try:
            version = manifest_version(headers)
        except ValueError as e:
            raise OriginError(f"origin {self.name!r} sent a malformed {HEADER_VERSION} header: {e}", self.name) from None
        self.same_host = samehost.parse_advertisement(headers.get(samehost.HEADER_SAME_HOST))
        return m, version

    def source(self, manifest: Manifest) -> ChunkSource:
        """Where the chunks of ``manifest`` (just answered by :meth:`current`) come from: the
        origin's own files when it runs on this host and offered them, else HTTP."""
        http = OriginSource(self, manifest)
        if self.same_host is None:
            return http
        return samehost.SameHostSource(self.same_host, self.secret, self.timeout, manifest, http, http.location)

    def exists(self, rel: str) -> bool:
        status, body, _ = self._call("GET", ROUTE_EXISTS, params={"path": rel}, limit=_SMALL_ANSWER)
        self._check(status, body, repr(rel))
        answer = json_field(body, "exists")
        if not isinstance(answer, bool):
            raise OriginError(
                f"origin {self.name!r} answered exists({rel!r}) with {body[:100]!r}, not {{\"exists\": true|false}}", self.name)
        return answer

    async def fetch_deltas(self, manifest_id: bytes, block: int, wants: list[tuple[ChunkId, bytes]],
                           limit: int | None = None) -> bytes:
        """The raw answer (chunk frames) to a delta request: for each (chunk id, block digests
        of the base held at its place), the chunk as a delta against those blocks or whole.
        At most ``limit`` bytes are accepted; an expired manifest is StaleManifestError."""
        body = encode_delta_request(manifest_id, block, wants)
        status, answer, _ = await self._request("POST", ROUTE_DELTAS, limit=limit, data=body)
        if status == 410:
            raise StaleManifestError(f"origin {self.name!r} no longer serves that manifest", self.name)
        self._check(status, answer, "chunk deltas")
        return answer

    async def fetch_chunks(self, manifest_id: bytes, ids: list[ChunkId], limit: int | None = None) -> bytes:
        """The raw answer (chunk frames) for ``ids`` of the manifest ``manifest_id`` served
        before. At most ``limit`` bytes are accepted; an expired manifest is StaleManifestError."""
        data = encode_chunk_request(manifest_id, ids)
        status, body, _ = await self._request("POST", ROUTE_CHUNKS, limit=limit, data=data)
        if status == 410:
            raise StaleManifestError(f"origin {self.name!r} no longer serves that manifest", self.name)
        self._check(status, body, f"{len(ids)} chunks")
        return body


def _host(url: str) -> str:
    """The host part of ``url`` (for messages)."""
    rest = url.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0] if rest.count(":") >= 1 else rest


def _ssl_reason(e: aiohttp.ClientSSLError) -> str:
    """What OpenSSL said (e.g. "certificate has expired"), not aiohttp's wrapping of it."""
    inner = getattr(e, "certificate_error", None) or getattr(e, "os_error", None) or e
    return str(getattr(inner, "verify_message", None) or inner)


def _reason(body: bytes) -> str:
    """The ``error`` an origin's JSON answer gives (else the start of the body as text)."""
    why = json_field(body, "error")
    text = why if isinstance(why, str) else body[:300].decode(errors="replace")
    return text[:300] or "no reason given"


def _read_base(where: tuple[str, int], n: int) -> bytes:
    """Up to ``n`` bytes at (file, offset): the receiver's bytes a delta is built against
    (fewer, or none, if the file is shorter or gone: the delta then just carries more)."""
    path, off = where
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, n, off)
    except OSError:
        return b""
    finally:
        os.close(fd)


class OriginSource:
    """A :class:`cas.ChunkSource` over one manifest served by an origin.

    Fetches in batches of about BATCH_BYTES, IN_FLIGHT requests at once; decodes and verifies
    every chunk. ``bytes_received`` counts payload bytes that crossed the socket.
    """

    def __init__(self, client: OriginClient, manifest: Manifest) -> None:
        self.client = client
        self.manifest = manifest
        self.location = f"origin {client.name!r} ({client.url})"
        self._sizes = manifest.chunk_sizes()
        self.bytes_received = 0
        self.chunks_received = 0

    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        return {c for c in ids if c in self._sizes}

    #: ``get_many`` takes ``bases``: where this side holds the bytes that stood at a chunk's
    #: place before (a file and an offset), so that changed chunks come as block deltas.
    accepts_bases = True

    def _batches(self, ids: list[ChunkId], limit: int) -> Iterator[list[ChunkId]]:
        batch: list[ChunkId] = []
        size = 0
        for cid in ids:
            if cid not in self._sizes:
                raise ChunkNotFoundError(f"chunk {cid.hex()} is not in the manifest served by {self.location}", cid.hex())
            batch.append(cid)
            size += self._sizes[cid]
            if size >= BATCH_BYTES or len(batch) >= limit:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def get_many(
        self, ids: Iterable[ChunkId], bases: Mapping[ChunkId, tuple[str, int]] | None = None
    ) -> Iterator[tuple[ChunkId, bytes | memoryview]]:
        """Chunks for ``ids``, verified. Those with an entry in ``bases`` are asked for as
        block deltas against the bytes at that (file, offset); a delta that does not rebuild
        the chunk (the base changed meanwhile) is fetched whole at the end."""
        ids = list(ids)
        bases = bases or {}
        whole = [c for c in ids if c not in bases]
        with_base = [c for c in ids if c in bases]
        jobs: list[tuple[list[ChunkId], bool]] = [(b, False) for b in self._batches(whole, MAX_BATCH_IDS)]
        jobs += [(b, True) for b in self._batches(with_base, MAX_DELTA_IDS)]
        retry: list[ChunkId] = []
        yield from self._run(jobs, bases, retry)
        if retry:
            yield from self._run([(b, False) for b in self._batches(retry, MAX_BATCH_IDS)], bases, [])

    def _run(
        self, jobs: list[tuple[list[ChunkId], bool]], bases: Mapping[ChunkId, tuple[str, int]], retry: list[ChunkId]
    ) -> Iterator[tuple[ChunkId, bytes | memoryview]]:
        loop = io_loop()
        pending: deque[tuple[list[ChunkId], Future[bytes]]] = deque()
        try:
            for batch, as_delta in jobs:
                # An answer can hold no more than its frames (a payload is at most the plain
                # length, a delta's at most what _decode accepts): more is refused unread.
                if as_delta:
                    limit = sum(frame_bound(2 * self._sizes[c] + 64) for c in batch) + _SMALL_ANSWER
                    fut = loop.submit(self.client.fetch_deltas(self.manifest.id, delta.BLOCK_SIZE,
                                                               self._delta_wants(batch, bases), limit))
                else:
                    limit = sum(frame_bound(self._sizes[c]) for c in batch) + _SMALL_ANSWER
                    fut = loop.submit(self.client.fetch_chunks(self.manifest.id, batch, limit))
                pending.append((batch, fut))
                if len(pending) < IN_FLIGHT:
                    continue
                yield from self._decode(*self._next(pending), bases, retry)
            while pending:
                yield from self._decode(*self._next(pending), bases, retry)
        finally:
            for _, f in pending:
                f.cancel()

    def _delta_wants(self, batch: list[ChunkId], bases: Mapping[ChunkId, tuple[str, int]]) -> list[tuple[ChunkId, bytes]]:
        """(chunk id, block digests of the bytes now at its base) for each of ``batch``."""
        return [(cid, delta.block_digests(_read_base(bases[cid], self._sizes[cid]))) for cid in batch]

    def _next(self, pending: deque[tuple[list[ChunkId], Future[bytes]]]) -> tuple[list[ChunkId], bytes]:
        batch, fut = pending.popleft()
        return batch, fut.result(timeout=self.client.timeout * 4 + 30)

    def _decode(
        self, batch: list[ChunkId], body: bytes, bases: Mapping[ChunkId, tuple[str, int]], retry: list[ChunkId]
    ) -> Iterator[tuple[ChunkId, bytes | memoryview]]:
        want = set(batch)
        frames = iter_frames(body)
        while True:
            try:
                f = next(frames, None)
            except ValueError:
                raise OriginError(f"{self.location} sent a truncated chunk frame", self.client.name) from None
            if f is None:
                break
            status, codec, cid, raw, stored = f.status, f.codec, f.cid, f.raw, f.stored
            if cid not in want:
                raise OriginError(f"{self.location} sent chunk {cid.hex()}, which was not asked for", self.client.name)
            if status == STATUS_STALE:
                raise StaleManifestError(f"a file changed at {self.location} after its manifest was taken", self.client.name)
            if status not in (STATUS_OK, STATUS_DELTA) or (status == STATUS_DELTA and cid not in bases):
                raise OriginError(f"{self.location} does not know chunk {cid.hex()}", self.client.name)
            if not f.complete or (status == STATUS_OK and raw != self._sizes[cid]) or raw > 2 * self._sizes[cid] + 64:
                raise OriginError(f"{self.location} sent a malformed frame for chunk {cid.hex()}", self.client.name)
            data = decompress(codec, f.payload, raw, cid.hex())
            want.discard(cid)
            if status == STATUS_DELTA:
                try:
                    data = delta.apply(data, _read_base(bases[cid], self._sizes[cid]), self._sizes[cid])
                except ValueError:
                    data = b""
                if chunk_id(data) != cid:  # the base changed since its digests were taken
                    self.bytes_received += stored
                    retry.append(cid)
                    continue
            else:
                verify(cid, data, self.location)
            self.bytes_received += stored
            self.chunks_received += 1
            yield cid, data
        if want:
            raise OriginError(f"{self.location} left {len(want)} requested chunk(s) out of its answer", self.client.name)
