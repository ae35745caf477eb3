"""Test helpers for TLS between works: certificates made as a run makes them (or with a
window or host of the test's choosing), and a TCP relay on loopback that records every byte
both ways, to look at what really crosses the wire."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from collections.abc import Sequence

from pathapi.wire.tls import CertificateAuthority, OriginCredentials, TlsConfig, client_context


def origin_context(ca: CertificateAuthority, hosts: Sequence[str] = ("127.0.0.1",), *,
                   not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> ssl.SSLContext:
    """A server context for an origin at ``hosts``, its key made here and its certificate
    signed by ``ca`` (for the window given, else the CA's)."""
    creds = OriginCredentials("root.origin", list(hosts))
    return creds.server_context(ca.issue("root.origin", creds.csr_pem, not_before=not_before, not_after=not_after))


def new_ca(label: str = "test") -> tuple[CertificateAuthority, ssl.SSLContext]:
    """A CA and a client context that pins it."""
    ca = CertificateAuthority(label)
    return ca, client_context(ca.cert_pem)


def run_config() -> TlsConfig:
    return TlsConfig.new("test")


class Relay:
    """Forwards every connection made to ``url``'s port on 127.0.0.1 to ``target`` (host,
    port), recording what each side sent: ``sent`` (client to server) and ``received``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.sent = bytearray()
        self.received = bytearray()
        self.connections = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def url(self, scheme: str) -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def wire(self) -> bytes:
        """Everything that crossed, both ways."""
        with self._lock:
            return bytes(self.sent) + b"\0" + bytes(self.received)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self.connections += 1
                self._socks += [client, server]
            for src, dst, buf in ((client, server, self.sent), (server, client, self.received)):
                t = threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    buf += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv (close alone does not)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(5)


def plain_http_exchange(host: str, port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send ``request`` as plain bytes on a new connection and return everything that came
    back until the server closed it (or ``timeout`` passed)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        out = bytearray()
        try:
            while True:
                data = s.recv(1 << 16)
                if not data:
                    break
                out += data
        except (ConnectionResetError, TimeoutError, socket.timeout):
            pass
        return bytes(out)
