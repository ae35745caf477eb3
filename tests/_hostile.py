"""Shared by the hostile-input tests (issue 7): hypothesis settings, and a fake origin that
answers whatever a test tells it to.

Example counts are bounded so that CI stays fast; ``PATHAPI_SOAK=1`` selects the soak profile,
which runs every property twenty times longer.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterable

from hypothesis import HealthCheck, settings

SOAK_FACTOR = 20
settings.register_profile(
    "pathapi-hostile",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile("pathapi-hostile-soak", parent=settings.get_profile("pathapi-hostile"))
PROFILE = "pathapi-hostile-soak" if os.environ.get("PATHAPI_SOAK") == "1" else "pathapi-hostile"


def fuzz(examples: int) -> settings:
    """Settings for a property run ``examples`` times (``SOAK_FACTOR`` times more when soaking).

    Returned, not loaded: importing this module changes no other test's settings."""
    factor = SOAK_FACTOR if PROFILE.endswith("-soak") else 1
    return settings(settings.get_profile(PROFILE), max_examples=examples * factor)


Answer = Callable[[str, str, bytes], Iterable[bytes]]


class FakeOrigin:
    """A loopback HTTP/1.1 server thread that answers each request with what ``answer``
    (method, target, body) yields, raw bytes on the socket, then closes the connection."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(65536)
                if not piece:
                    return
                data += piece
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = next((int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length"), 0)
            while len(body) < length:
                piece = conn.recv(65536)
                if not piece:
                    return
                body += piece
            for piece in self.answer(method, target, body):
                conn.sendall(piece)
        except OSError:
            pass  # the client hung up: what it did about the answer is the test's business
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def http_answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return head.encode("latin-1") + b"\r\n" + body


def closed_by_server(s: socket.socket, within: float) -> bool:
    """Whether the server closes ``s`` within ``within`` seconds (whatever it sends first)."""
    s.settimeout(0.25)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if not s.recv(1 << 16):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False
