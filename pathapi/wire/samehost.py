"""The same-host fast path: when origin and consumer share a kernel, bulk bytes skip the socket.

An origin on Linux also listens on an abstract Unix socket and names it, with the kernel's
boot id, in every manifest answer (``X-Pathapi-Same-Host``). A consumer whose boot id is the
same, and that can reach the socket (abstract sockets are per network namespace: a work on
another host, or in another namespace, cannot), asks for descriptors of the manifest's files
and reads each chunk straight from them with ``pread``: no HTTP, no framing, no compression,
and the origin reads nothing. Each chunk is verified by its BLAKE3 id before it is handed
on, as from any source: a file that changed since its manifest was taken fails that check
and the get is retried with a fresh manifest, exactly as over HTTP (``StaleManifestError``).
If the link fails at any point the rest of the chunks come over HTTP.

Only files of a manifest the origin served can be opened, by their index in that manifest,
each with :func:`cas.fsutil.open_beneath` (no link below the work's root is followed) and
read-only; every request carries the app secret, and the peer must run as the origin's user
(``SO_PEERCRED``). The protocol, "pathapi-fd 1", is in docs/format.md ("Same-host fast
path"). ``PATHAPI_SAME_HOST=0`` turns it off on either side.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import secrets
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from cas import Manifest
from cas.chunking import iter_chunk_spans
from cas.fsutil import open_beneath
from cas.hashing import ChunkId, chunk_id
from cas.store.base import ChunkSource, Payload

from ..errors import StaleManifestError

log = logging.getLogger(__name__)

HEADER_SAME_HOST = "X-Pathapi-Same-Host"
FD_PROTOCOL = 1
#: Files opened per request: one answer's descriptors (the kernel takes at most 253).
MAX_FILES = 250
#: Request and answer bodies are small JSON; anything longer is refused.
MAX_MESSAGE = 1 << 20
#: Connections one origin serves at once (each a thread; a get holds one).
MAX_LINKS = 32
_LEN = struct.Struct("<I")
_UCRED = struct.Struct("3i")  # pid, uid, gid


class _LinkError(Exception):
    """The same-host link failed (refused, closed, malformed): the caller falls back to HTTP."""


def enabled() -> bool:
    """Whether this process takes part: Linux (abstract sockets, SCM_RIGHTS), not turned off."""
    return sys.platform.startswith("linux") and os.environ.get("PATHAPI_SAME_HOST", "1") != "0"


def boot_id() -> str:
    """This kernel's boot id: equal in two processes exactly when they share a kernel."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def file_paths(manifest: Manifest, base: str) -> list[str]:
    """The files of ``manifest`` as they lie under ``base``, in manifest order: the numbering
    both ends use (the consumer has the same manifest, so the same list)."""
    return [os.path.join(base, e.path) if e.path else base for e in manifest.files()]


# -- framing -----------------------------------------------------------------------------


def _send(sock: socket.socket, body: dict[str, object], fds: list[int] | None = None) -> None:
    raw = json.dumps(body).encode()
    data = _LEN.pack(len(raw)) + raw
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, got: bytes = b"") -> bytes:
    parts = [got]
    have = len(got)
    while have < n:
        more = sock.recv(n - have)
        if not more:
            raise _LinkError("the same-host link closed mid-message")
        parts.append(more)
        have += len(more)
    return b"".join(parts)


def _recv(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, object], list[int]]:
    """One message and the descriptors that came with it (the caller owns and closes them)."""
    fds: list[int] = []
    if max_fds:
        first, fds, flags, _ = socket.recv_fds(sock, 64 << 10, max_fds)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise _LinkError("descriptors were cut off in transit (descriptor limit reached?)")
    else:
        first = sock.recv(64 << 10)
    try:
        if not first:
            raise _LinkError("the same-host link closed")
        head = _recv_exact(sock, _LEN.size, first[: _LEN.size])
        (n,) = _LEN.unpack(head)
        if n > MAX_MESSAGE:
            raise _LinkError(f"a same-host message of {n} bytes is too long")
        raw = _recv_exact(sock, n, first[_LEN.size :])
        if len(raw) != n:
            raise _LinkError("the same-host link sent more than one message at once")
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise _LinkError("a same-host message is not a JSON object")
        return body, fds
    except (ValueError, OSError) as e:
        for fd in fds:
            os.close(fd)
        raise _LinkError(f"malformed same-host message: {e}") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


# -- the origin's end --------------------------------------------------------------------


@dataclass(frozen=True)
class ServedFiles:
    """What an origin may hand out for one manifest id: its files' paths, in manifest order."""

    root: str  # the work's root: nothing outside it is opened
    paths: list[str]


class FdServer:
    """Hands read-only descriptors of served files to consumers on this host.

    ``lookup(manifest id)`` says which files a manifest names (None for one not served, or
    no longer remembered). One thread accepts; one thread per link (at most MAX_LINKS)
    answers its requests in turn.
    """

    def __init__(self, secret: bytes, lookup: Callable[[bytes], ServedFiles | None], timeout: float = 30.0) -> None:
        self.secret = secret
        self.lookup = lookup
        self.timeout = timeout
        self.name = f"pathapi-{os.getpid()}-{secrets.token_hex(8)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind("\0" + self.name)
        self._sock.listen(64)
        self._links = threading.BoundedSemaphore(MAX_LINKS)
        self._closed = False
        #: Descriptors handed out (for tests and benchmarks).
        self.files_sent = 0
        #: The value of the ``X-Pathapi-Same-Host`` header (read once: the boot id is the kernel's).
        self.advertisement = f"{FD_PROTOCOL} {boot_id()} {self.name}"
        self._thread = threading.Thread(target=self._accept, name="pathapi-samehost", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            if not self._links.acquire(blocking=False):
                conn.close()  # too many at once: that consumer uses HTTP
                continue
            threading.Thread(target=self._serve, args=(conn,), name="pathapi-samehost-link", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(self.timeout)
                pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
                if uid != os.getuid():
                    _send(conn, {"v": FD_PROTOCOL, "error": "not the origin's user"})
                    return
                while not self._closed:
                    try:
                        req, _ = _recv(conn)
                    except _LinkError:
                        return  # the consumer is done (or gone)
                    if not self._answer(conn, req):
                        return
        except OSError as e:
            log.debug("same-host link ended: %s", e)
        finally:
            self._links.release()

    def _answer(self, conn: socket.socket, req: dict[str, object]) -> bool:
        """Answer one request; False to end the link (it broke a rule)."""
        secret = req.get("secret")
        if not isinstance(secret, str) or not hmac.compare_digest(secret.encode(), self.secret):
            _send(conn, {"v": FD_PROTOCOL, "error": "missing or wrong app secret"})
            return False
        manifest, files = req.get("manifest"), req.get("files")
        if req.get("v") != FD_PROTOCOL or not isinstance(manifest, str) or not isinstance(files, list) \
                or len(files) > MAX_FILES or not all(isinstance(i, int) for i in files):
            _send(conn, {"v": FD_PROTOCOL, "error": f"malformed request (protocol {FD_PROTOCOL})"})
            return False
        try:
            served = self.lookup(bytes.fromhex(manifest))
        except ValueError:
            served = None
        if served is None:
            _send(conn, {"v": FD_PROTOCOL, "error": "unknown manifest (expired or never served)"})
            return True
        opened: list[int] = []
        fds: list[int] = []
        try:
            for i in files:
                if not 0 <= i < len(served.paths):
                    continue
                try:
                    fds.append(open_beneath(served.root, served.paths[i]))
                except (OSError, ValueError):
                    continue  # gone or replaced by a link: the consumer fetches it over HTTP
                opened.append(i)
            self.files_sent += len(fds)  # before the answer: a consumer that has it may look
            _send(conn, {"v": FD_PROTOCOL, "open": opened}, fds)
        finally:
            for fd in fds:
                os.close(fd)
        return True


# -- the consumer's end ------------------------------------------------------------------


class FdLink:
    """A consumer's connection to one origin's FdServer."""

    def __init__(self, name: str, secret: str, timeout: float) -> None:
        self.secret = secret
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect("\0" + name)
        except OSError as e:
            self.sock.close()
            raise _LinkError(f"cannot reach the origin's same-host socket: {e}") from None

    def open(self, manifest_id: bytes, files: list[int]) -> dict[int, int]:
        """Descriptors of ``files`` (indices into the manifest's files) that the origin could
        open: index -> fd, owned by the caller."""
        try:
            _send(self.sock, {"v": FD_PROTOCOL, "secret": self.secret, "manifest": manifest_id.hex(), "files": files})
            body, fds = _recv(self.sock, max_fds=len(files))
        except OSError as e:
            raise _LinkError(f"the same-host link failed: {e}") from None
        opened = body.get("open")
        if not isinstance(opened, list) or len(opened) != len(fds):
            for fd in fds:
                os.close(fd)
            raise _LinkError(f"the origin refused the same-host request: {body.get('error', 'malformed answer')}")
        return dict(zip(opened, fds, strict=True))

    def close(self) -> None:
        self.sock.close()


def parse_advertisement(value: str | None) -> str | None:
    """The socket name an ``X-Pathapi-Same-Host`` header offers, if it is usable from here
    (same protocol, same kernel, fast path on); else None."""
    if not value or not enabled():
        return None
    parts = value.split(" ")
    if len(parts) != 3 or parts[0] != str(FD_PROTOCOL) or not parts[1] or parts[1] != boot_id():
        return None
    return parts[2]


class _Place:
    __slots__ = ("file", "offset", "length")

    def __init__(self, file: int, offset: int, length: int) -> None:
        self.file, self.offset, self.length = file, offset, length


class SameHostSource:
    """A :class:`cas.ChunkSource` over one manifest that reads chunks from the origin's own
    files through descriptors it passes over its same-host socket ``name``; what the link
    cannot give comes from ``fallback`` (the HTTP source of the same manifest). The link is
    opened by each ``get_many`` and closed when it ends. ``bytes_received`` counts chunk
    bytes moved either way; ``same_host_chunks`` those read through the link."""

    #: No block deltas: on one host a whole chunk costs a memory copy, not a network.
    accepts_bases = False

    def __init__(self, name: str, secret: str, timeout: float, manifest: Manifest, fallback: ChunkSource,
                 location: str) -> None:
        self.name = name
        self.secret = secret
        self.timeout = timeout
        self.manifest = manifest
        self.fallback = fallback
        self.location = f"{location} (same host)"
        self.same_host_chunks = 0
        self._own_bytes = 0
        self._places: dict[ChunkId, _Place] = {}
        for i, e in enumerate(manifest.files()):
            for cid, off, n in iter_chunk_spans(e.chunks):
                if cid not in self._places:
                    self._places[cid] = _Place(i, off, n)

    @property
    def bytes_received(self) -> int:
        return self._own_bytes + int(getattr(self.fallback, "bytes_received", 0))

    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        return {c for c in ids if c in self._places}

    def get_many(self, ids: Iterable[ChunkId]) -> Iterator[tuple[ChunkId, Payload]]:
        """Chunks for ``ids``, verified, in the order asked (the buffer is reused: copy what
        must outlive one step). StaleManifestError if a file no longer holds what the
        manifest says; chunks the link cannot give are fetched from the fallback."""
        ids = list(ids)
        try:
            link = FdLink(self.name, self.secret, self.timeout)
        except _LinkError as e:
            log.info("%s: using HTTP: %s", self.location, e)
            yield from self.fallback.get_many(ids)
            return
        left: list[ChunkId] = []
        windows = _Prefetch(link, self.manifest.id, self._windows(ids))
        try:
            biggest = max((self._places[c].length for c in ids if c in self._places), default=0)
            view = memoryview(bytearray(biggest))
            for window, fds, rest in windows:
                if fds is None:  # the link failed: the rest over HTTP
                    left += window + rest
                    break
                try:
                    for cid in window:
                        place = self._places.get(cid)
                        fd = fds.get(place.file) if place is not None else None
                        if place is None or fd is None:
                            left.append(cid)
                            continue
                        part = view[: place.length]
                        if os.preadv(fd, [part], place.offset) != place.length or chunk_id(part) != cid:
                            raise StaleManifestError(
                                f"a file changed at {self.location} after its manifest was taken", self.location)
                        self._own_bytes += place.length
                        self.same_host_chunks += 1
                        yield cid, part
                finally:
                    for fd in fds.values():
                        os.close(fd)
        finally:
            windows.close()
            link.close()
        if left:
            yield from self.fallback.get_many(left)

    def _windows(self, ids: list[ChunkId]) -> Iterator[tuple[list[ChunkId], list[int], list[ChunkId]]]:
        """(ids, their files, the ids after them) for consecutive windows of ``ids``."""
        i = 0
        while i < len(ids):
            window, files, i = self._window(ids, i)
            yield window, files, ids[i:]

    def _window(self, ids: list[ChunkId], start: int) -> tuple[list[ChunkId], list[int], int]:
        """The ids from ``start`` on whose files number at most MAX_FILES: (ids, their
        files in order, where the next window starts)."""
        files: dict[int, None] = {}
        end = start
        while end < len(ids):
            place = self._places.get(ids[end])
            if place is not None and place.file not in files:
                if len(files) == MAX_FILES:
                    break
                files[place.file] = None
            end += 1
        return ids[start:end], list(files), end


class _Prefetch:
    """The descriptors of each window's files, asked for on a thread of its own one window
    ahead of the reader: the origin opens the next files while this side reads the last.
    Yields (window, index -> fd, the ids after it); fds is None once the link failed (with
    the reason logged). :meth:`close` stops it and closes descriptors nobody took."""

    _END = object()

    def __init__(self, link: FdLink, manifest_id: bytes,
                 windows: Iterator[tuple[list[ChunkId], list[int], list[ChunkId]]]) -> None:
        self._link = link
        self._manifest = manifest_id
        self._windows = windows
        self._ready: queue.Queue[object] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pathapi-samehost-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for window, files, rest in self._windows:
                try:
                    fds: dict[int, int] | None = self._link.open(self._manifest, files) if files else {}
                except _LinkError as e:
                    log.info("same-host link of manifest %s: falling back to HTTP: %s", self._manifest.hex()[:16], e)
                    fds = None
                if not self._put((window, fds, rest)):
                    for fd in (fds or {}).values():
                        os.close(fd)
                    return
                if fds is None:
                    return
        finally:
            self._put(self._END)

    def __iter__(self) -> Iterator[tuple[list[ChunkId], dict[int, int] | None, list[ChunkId]]]:
        while True:
            item = self._ready.get()
            if item is self._END:
                return
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        while True:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                return
            if item is not self._END:
                for fd in (item[1] or {}).values():  # type: ignore[index]
                    os.close(fd)
