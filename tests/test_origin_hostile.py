"""The origin service under attack (issue 7, "Hostile input"): what a hostile client on the
network can send, and what the service does about it.

A real :class:`OriginService` on 127.0.0.1 is attacked with raw sockets (nothing a client
library would tidy up): wrong or binary secrets, another app run's secret, traversal in every
spelling of the path parameter and the request target, oversized and compressed bodies,
answer amplification, and slow-loris clients that trickle headers, never finish a body or
never read their answer. The properties: every such request is refused (401/400/403/404/408/
413/503, never 500 and never a byte from outside the root), the attack is bounded in time
(the server cuts those connections) and in memory, and a well-behaved client is served
while it runs.

``PATHAPI_SOAK=1`` runs the generated properties twenty times longer (tests/_hostile.py).
"""

from __future__ import annotations

import gzip
import hmac
import os
import secrets
import socket
import threading
import time
import tracemalloc
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _hostile import closed_by_server, fuzz
from hypothesis import given
from hypothesis import strategies as st

from cas import Manifest, delta
from cas.chunking import iter_chunk_spans
from cas.hashing import ID_SIZE
from cas.workspace import Workspace
from pathapi import App, Flow, Work
from pathapi.aio import io_loop
from pathapi.wire.client import OriginClient, OriginSource
from pathapi.errors import AuthenticationError, OriginError, PathapiError
from pathapi.wire.origin import OriginService
from pathapi.wire.protocol import (
    DELTA_HEAD,
    DELTA_ITEM,
    FRAME,
    HEADER_PROTOCOL,
    MAX_ANSWER_BYTES,
    STATUS_DELTA,
    STATUS_OK,
    STATUS_STALE,
    STATUS_UNKNOWN,
)

KiB = 1024
MiB = 1024 * KiB
NAME = "root.source"
OUTSIDE_NAME = "only_outside_target.txt"
OUTSIDE_BYTES = os.urandom(64) * 2000  # 128 KiB no file inside the root holds

pytestmark = pytest.mark.usefixtures("close_client_sessions")


# -- a served root with an outside next to it --------------------------------------------------
@dataclass
class Rig:
    service: OriginService
    root: Path
    outside: Path
    secret: str
    host: str
    port: int

    def client(self, secret: str | None = None, timeout: float = 10.0) -> OriginClient:
        return OriginClient(NAME, self.service.url, self.secret if secret is None else secret, timeout)

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        s = socket.socket()
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(10)
        s.connect((self.host, self.port))
        return s

    def raw(self, data: bytes, timeout: float = 10) -> bytes:
        """Send ``data`` on a new connection, return everything answered until the server
        closes it (no half-close: aiohttp drops a connection whose client sent EOF)."""
        with self.connect() as s:
            s.settimeout(timeout)
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before all was sent: read the answer
            return read_until_closed(s)

    def head(self, method: str, target: str, *, body: bytes = b"", auth: bytes | None = None,
             extra: bytes = b"") -> bytes:
        auth = f"Bearer {self.secret}".encode() if auth is None else auth
        return (
            f"{method} {target} HTTP/1.1\r\nHost: x\r\n".encode() + b"Authorization: " + auth + b"\r\n"
            + f"{HEADER_PROTOCOL}: 1\r\nContent-Length: {len(body)}\r\nConnection: close\r\n".encode() + extra + b"\r\n"
        )

    def request(self, method: str, target: str, body: bytes = b"", **kw: Any) -> tuple[int, bytes]:
        return parse_answer(self.raw(self.head(method, target, body=body, **kw) + body))

    def manifest(self, rel: str) -> Manifest:
        m = self.client().manifest(rel)
        assert m is not None
        return m

    def still_serves(self) -> None:
        """A well-behaved client gets a manifest and all its chunks, verified."""
        client = self.client(timeout=10)
        m = client.manifest("data.bin")
        assert m is not None
        got = dict(OriginSource(client, m).get_many(sorted(m.chunk_ids())))
        assert set(got) == m.chunk_ids()
        assert client.exists("a/inside.txt")


def read_until_closed(s: socket.socket, limit: int = 64 * MiB) -> bytes:
    out = bytearray()
    try:
        while len(out) < limit:
            piece = s.recv(1 << 16)
            if not piece:
                break
            out += piece
    except (ConnectionResetError, TimeoutError):
        pass
    return bytes(out)


def parse_answer(raw: bytes) -> tuple[int, bytes]:
    """(status, body) of a raw HTTP/1.x answer (0 if there was none)."""
    if not raw.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")):
        return 0, raw
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head[9:12]), body


@contextmanager
def serving(top: Path, **limits: Any) -> Iterator[Rig]:
    root = top / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "inside.txt").write_bytes(b"inside")
    (root / "data.bin").write_bytes(os.urandom(600 * KiB))
    (root / "big").mkdir()
    (root / "big" / "w.bin").write_bytes(os.urandom(3 * MiB))
    outside = top / "outside"
    outside.mkdir()
    (outside / OUTSIDE_NAME).write_bytes(OUTSIDE_BYTES)
    os.symlink("../outside", root / "escape")  # a link inside the root that leaves it
    workspace = Workspace(top / "state")
    secret = secrets.token_urlsafe(32)
    service = OriginService(NAME, str(root), secret, workspace, **limits)
    url = io_loop().run(service.start(), timeout=30)
    parsed = urllib.parse.urlsplit(url)
    try:
        yield Rig(service, root, outside, secret, parsed.hostname, parsed.port)  # type: ignore[arg-type]
    finally:
        io_loop().run(service.stop(), timeout=90)
        workspace.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One service for the fuzzing properties (each example is a few requests)."""
    with serving(tmp_path_factory.mktemp("origin")) as r:
        yield r


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    """Start a service of its own, with the limits a test sets."""
    with ExitStack() as stack:
        yield lambda **limits: stack.enter_context(serving(tmp_path / f"s{secrets.token_hex(2)}", **limits))


@pytest.fixture(scope="module")
def outside_ids(tmp_path_factory: pytest.TempPathFactory) -> set[bytes]:
    """Ids of the outside file's chunks (default parameters), from a snapshot of a copy."""
    top = tmp_path_factory.mktemp("probe")
    (top / "copy.bin").write_bytes(OUTSIDE_BYTES)
    with Workspace(top / "state") as ws:
        return ws.snapshot(top / "copy.bin").chunk_ids()


# == the secret ===================================================================================
def test_the_secret_is_compared_with_hmac_compare_digest(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time: every request's token goes through hmac.compare_digest, whatever its
    length or how early it differs."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    tokens = [rig.secret, "", "x", rig.secret[:-1], rig.secret + "x", "y" * len(rig.secret)]
    for token in tokens:
        status, _ = rig.request("GET", "/v1/exists?path=data.bin", auth=f"Bearer {token}".encode())
        assert status == (200 if token == rig.secret else 401)
    assert [a for a, _ in calls] == [t.encode() for t in tokens]
    assert all(b == rig.secret.encode() for _, b in calls)


@fuzz(100)
@given(value=st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
       scheme=st.sampled_from([b"Bearer ", b"bearer ", b"Basic ", b"", b"Bearer  ", b"Bearer\t"]))
def test_any_authorization_header_bytes_are_refused_401_never_500(rig: Rig, value: bytes, scheme: bytes) -> None:
    status, body = rig.request("GET", "/v1/exists?path=data.bin", auth=scheme + value)
    assert status in (400, 401), (status, body[:200])


def test_a_secret_with_non_ascii_bytes_is_refused_and_the_service_goes_on(rig: Rig) -> None:
    for auth in (b"Bearer \xff\xfe", b"Bearer " + "é".encode() * 20, b"Bearer " + rig.secret.encode() + b"\x80"):
        status, _ = rig.request("GET", "/v1/exists?path=data.bin", auth=auth)
        assert status == 401
    rig.still_serves()


class Holder(Work):
    def run(self) -> None:
        os.makedirs("data", exist_ok=True)
        with open("data/f.bin", "wb") as f:
            f.write(b"held" * 1000)


class Prober(Work):
    """Asks the holder's origin with this run's secret and with ``old_secret``."""

    def run(self, old_secret: str | None) -> None:
        from pathapi.runtime.context import current

        ctx = current()
        assert ctx is not None
        self.secret = ctx.secret
        url = ctx.registry["root.holder"]
        self.results = {}
        for label, secret in (("this_run", ctx.secret), ("previous_run", old_secret)):
            if secret is None:
                continue
            try:
                m = OriginClient("root.holder", url, secret, 10).manifest("data/f.bin")
                self.results[label] = "served" if m is not None else "missing"
            except AuthenticationError:
                self.results[label] = "refused"


class ReplayFlow(Flow):
    def __init__(self, old_secret: str | None) -> None:
        super().__init__()
        self.old_secret = old_secret
        self.holder = Holder()
        self.prober = Prober()

    def run(self) -> None:
        self.holder.run()
        self.prober.run(self.old_secret)


@pytest.mark.slow
def test_the_secret_of_another_app_run_is_refused(tmp_path: Path) -> None:
    """Real app runs, real work processes: a secret that served in one run is worthless in
    the next (same app folder, same works, same ports reused or not)."""
    first = ReplayFlow(None)
    App(first, root=tmp_path / "app").run()
    assert first.prober.results == {"this_run": "served"}
    second = ReplayFlow(first.prober.secret)
    App(second, root=tmp_path / "app").run()
    assert second.prober.secret != first.prober.secret
    assert second.prober.results == {"this_run": "served", "previous_run": "refused"}


# == paths: traversal in every spelling ==============================================================
SEGMENTS = st.sampled_from([
    "..", ".", "", "outside", OUTSIDE_NAME, "a", "inside.txt", "escape", "root",
    "%2e%2e", "%2E%2E", "%2e", ".%2e", "%252e%252e", "%25252e%25252e", "%c0%ae%c0%ae", "%e0%80%ae",
    "%u002e%u002e", "%ef%bc%8e%ef%bc%8e", "..%00", "%00", "a%00", "~", "..;", "..%3b", "*", "%ff",
])
SEPARATORS = st.sampled_from(["/", "%2f", "%2F", "%252f", "\\", "%5c", "%5C", "//", "/./", "%c0%af", "%ef%bc%8f", ";/"])
PREFIXES = st.sampled_from(["", "", "/", "%2f", "//", "C:", "C:%5c", "file:", "\\\\", "%5c%5c"])


@st.composite
def traversal_queries(draw: st.DrawFn) -> tuple[str, bool]:
    """(raw query string, whether it aims at the outside file by name)."""
    segs = draw(st.lists(SEGMENTS, min_size=1, max_size=6))
    if draw(st.booleans()):
        segs = [*segs, "outside", OUTSIDE_NAME]
    parts = [segs[0]]
    for seg in segs[1:]:
        parts += [draw(SEPARATORS), seg]
    value = draw(PREFIXES) + "".join(parts)
    extra = draw(st.sampled_from(["", "", "&path=a", "&path=..%2foutside", "&PATH=..", "&path"]))
    return f"path={value}{extra}", segs[-1] == OUTSIDE_NAME


@fuzz(150)
@given(q=traversal_queries())
def test_no_spelling_of_a_path_reaches_outside_the_root(rig: Rig, outside_ids: set[bytes], q: tuple[str, bool]) -> None:
    query, aims_outside = q
    status, body = rig.request("GET", f"/v1/manifest?{query}")
    assert status in (200, 400, 403, 404), (query, status, body[:300])
    assert OUTSIDE_BYTES[:64] not in body
    if status == 200:
        m = Manifest.decode(body)
        assert not (m.chunk_ids() & outside_ids), f"{query} described a file outside the root"
        assert not aims_outside, f"{query} answered a manifest for a name only the outside holds"
    status, body = rig.request("GET", f"/v1/exists?{query}")
    assert status in (200, 400, 403), (query, status, body[:300])
    if status == 200 and aims_outside:
        assert body == b'{"exists": false}', f"{query} reveals a file outside the root"


@pytest.mark.parametrize("target", [
    "/v1/manifest/../manifest?path=../outside/" + OUTSIDE_NAME,
    "/v1/../v1/manifest?path=..%2foutside%2f" + OUTSIDE_NAME,
    "//v1/manifest?path=../outside/" + OUTSIDE_NAME,
    "/v1/%2e%2e/v1/manifest?path=../outside",
    "/v1/manifest;path=../outside?path=a",
    "/v1/manifest?path=a#/../../outside",
    "http://127.0.0.1/v1/manifest?path=../outside/" + OUTSIDE_NAME,
    "/v1/manifest?path=escape/" + OUTSIDE_NAME,
    "/v1/manifest?path=escape%2f" + OUTSIDE_NAME,
    "/v1/manifest?path=escape",
    "/v1/manifest?path=.",
    "/v1/exists?path=escape/" + OUTSIDE_NAME,
    "*",
    "/v1/manifest?path=" + "a/" * 3000,  # a path no file can have: 404, not a 500
    "/v1/manifest?path=" + "x" * 300,
])
def test_request_targets_that_play_with_the_route_never_serve_the_outside(rig: Rig, outside_ids: set[bytes], target: str) -> None:
    status, body = rig.request("GET", target)
    assert status in (200, 400, 403, 404, 405, 414), (target, status, body[:300])
    assert OUTSIDE_BYTES[:64] not in body
    if status == 200 and target.startswith("/v1/manifest"):
        assert not Manifest.decode(body).chunk_ids() & outside_ids


def test_a_long_valid_path_is_served_and_an_absurd_request_line_is_refused(fresh: Callable[..., Rig]) -> None:
    """A path of up to 4096 bytes is valid; percent-encoded it is 12 KiB of request line,
    which the server accepts. A 100 KiB line is refused 4xx, not a 500."""
    r = fresh()
    name = "é" * 127  # 254 bytes
    deep = "/".join([name] * 14)  # 3569 bytes, 10.7 KiB percent-encoded
    (r.root / deep).parent.mkdir(parents=True)
    (r.root / deep).write_bytes(b"deep")
    m = r.client().manifest(deep)
    assert m is not None and m.total_size == 4
    status, _ = r.request("GET", "/v1/exists?path=" + "a" * 100 * KiB)
    assert 400 <= status < 500
    r.still_serves()


# == bodies and batches ===================================================================================
def test_a_body_over_the_limit_is_413(rig: Rig) -> None:
    m = rig.manifest("data.bin")
    body = m.id + os.urandom(ID_SIZE) * (40 * KiB)  # 1.25 MiB
    status, _ = rig.request("POST", "/v1/chunks", body)
    assert status == 413


def test_a_compressed_body_bomb_is_never_inflated(rig: Rig) -> None:
    """Request bodies are never compressed in this protocol: the server does not inflate
    them (not even the body of a request it refused, while draining it)."""
    m = rig.manifest("data.bin")
    bomb = gzip.compress(m.id + bytes(64 * MiB), compresslevel=1)  # ~270 KiB that inflates to 64 MiB
    assert len(bomb) < 1 * MiB
    answers: list[tuple[int, bytes]] = []
    tracemalloc.start()
    try:
        answers.append(rig.request("POST", "/v1/chunks", bomb, extra=b"Content-Encoding: gzip\r\n"))
        answers.append(rig.request("POST", "/v1/chunks", bomb, auth=b"Bearer nope", extra=b"Content-Encoding: gzip\r\n"))
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # Taken as the bytes sent: not a whole number of ids (400) or an unknown manifest (410);
    # a 413 would mean the server inflated it past the body limit.
    assert answers[0][0] in (400, 410) and answers[1][0] == 401
    assert peak < 16 * MiB, f"the server held {peak / MiB:.0f} MiB for a 1 MiB body limit"


def test_an_endless_chunked_body_is_cut_at_the_limit(rig: Rig) -> None:
    with rig.connect() as s:
        head = rig.head("POST", "/v1/chunks").replace(b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n")
        s.sendall(head)
        piece = b"%x\r\n" % (64 * KiB) + bytes(64 * KiB) + b"\r\n"
        try:
            for _ in range(64):  # 4 MiB offered, 1 MiB allowed
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(30)
        status, _ = parse_answer(s.recv(4096))
    assert status == 413


def test_an_answer_larger_than_any_client_batch_is_refused_before_reading(rig: Rig) -> None:
    """4096 copies of the largest chunk id would make a multi-GiB answer from a 128 KiB
    request: refused whole, nothing read from disk."""
    m = rig.manifest("big/w.bin")
    spans = sorted(iter_chunk_spans(m.entries[0].chunks), key=lambda s: -s[2])
    biggest, _, n = spans[0]
    copies = MAX_ANSWER_BYTES // n + 1
    before = rig.service.chunks_read
    status, body = rig.request("POST", "/v1/chunks", m.id + biggest * copies)
    assert status == 413, body[:200]
    assert rig.service.chunks_read == before
    status, body = rig.request("POST", "/v1/chunks", m.id + biggest * 2)
    assert status == 200


def _delta_body(manifest_id: bytes, wants: list[tuple[bytes, bytes]], block: int = delta.BLOCK_SIZE) -> bytes:
    out = [manifest_id, DELTA_HEAD.pack(block, len(wants))]
    for cid, digests in wants:
        out += [DELTA_ITEM.pack(cid, len(digests) // delta.DIGEST_SIZE), digests]
    return b"".join(out)


@fuzz(100)
@given(data=st.data())
def test_any_delta_request_is_answered_with_verified_frames_or_refused(rig: Rig, data: st.DataObject) -> None:
    m = rig.manifest("data.bin")
    spans = list(iter_chunk_spans(m.entries[0].chunks))
    cid, off, n = spans[0]
    old = bytearray((rig.root / "data.bin").read_bytes()[off : off + n])
    old[10] ^= 1
    valid = _delta_body(m.id, [(cid, delta.block_digests(bytes(old)))])
    body = data.draw(st.one_of(
        st.binary(max_size=200),
        st.builds(lambda b, k, c: m.id + DELTA_HEAD.pack(b, k) + c, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=100)),
        st.builds(lambda edits: _damage(valid, edits), st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), max_size=3)),
    ))
    status, answer = rig.request("POST", "/v1/deltas", body)
    assert status in (200, 400, 410, 413), (status, answer[:200])
    if status == 200:
        pos = 0
        while pos < len(answer):
            status_, _, _, _, stored = FRAME.unpack_from(answer, pos)
            pos += FRAME.size + stored
            assert status_ in (STATUS_OK, STATUS_DELTA, STATUS_STALE, STATUS_UNKNOWN)
        assert pos == len(answer)


def _damage(valid: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(valid)
    for pos, value in edits:
        b[pos] = value
    return bytes(b)


# == slow clients =================================================================================
def _drip(socks: list[socket.socket], data: bytes, every: float, stop: threading.Event, cut: dict[int, float]) -> None:
    """Send ``data`` one byte at a time to each socket, round robin; record when the server cut one."""
    t0 = time.monotonic()
    for i in range(len(data)):
        for k, s in enumerate(socks):
            if k in cut:
                continue
            try:
                s.sendall(data[i : i + 1])
            except OSError:
                cut[k] = time.monotonic() - t0
        if stop.wait(every) or len(cut) == len(socks):
            return


@pytest.mark.slow
def test_slow_loris_clients_are_cut_off_and_others_are_served_meanwhile(fresh: Callable[..., Rig]) -> None:
    r = fresh(idle_timeout=2.0, io_timeout=2.0)
    m = r.manifest("big/w.bin")
    head = r.head("GET", "/v1/manifest?path=data.bin")
    dripping = [r.connect() for _ in range(40)]  # headers, one byte every 50 ms: never complete in time
    stalled = [r.connect() for _ in range(8)]  # a body that never comes
    for s in stalled:
        s.sendall(r.head("POST", "/v1/chunks").replace(b"Content-Length: 0", f"Content-Length: {1 * MiB}".encode()) + m.id)
    deaf = [r.connect(rcvbuf=4 * KiB) for _ in range(4)]  # a 3 MiB answer, never read
    big_request = m.id + b"".join(sorted(m.chunk_ids()))
    for s in deaf:
        s.sendall(r.head("POST", "/v1/chunks", body=big_request) + big_request)
    stop, cut = threading.Event(), {}
    dripper = threading.Thread(target=_drip, args=(dripping, head, 0.05, stop, cut), daemon=True)
    dripper.start()
    try:
        # Served while the attack runs, several times over.
        done = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                for _ in range(3):
                    r.still_serves()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
            done.set()

        threading.Thread(target=serve, daemon=True).start()
        assert done.wait(60), "a well-behaved client was not served while slow clients held connections"
        assert not errors, repr(errors[0])
        # And the attack is bounded: the server cuts every slow connection by itself.
        dripper.join(60)
        assert len(cut) == len(dripping), f"{len(dripping) - len(cut)} header-trickling connections were never cut"
        for s in stalled:
            assert closed_by_server(s, 30), "a connection whose body never came was never cut"
        for s in deaf:
            assert closed_by_server(s, 30), "a client that never reads its answer was never cut"
        r.still_serves()
    finally:
        stop.set()
        for s in dripping + stalled + deaf:
            s.close()


def test_a_body_that_never_comes_is_answered_408(fresh: Callable[..., Rig]) -> None:
    r = fresh(io_timeout=1.0)
    with r.connect() as s:
        s.sendall(r.head("POST", "/v1/deltas").replace(b"Content-Length: 0", b"Content-Length: 5000") + b"x" * 100)
        s.settimeout(30)
        status, _ = parse_answer(s.recv(4096))
    assert status == 408
    r.still_serves()


def test_connections_beyond_the_cap_take_the_slot_of_an_idle_one_and_idle_ones_expire(fresh: Callable[..., Rig]) -> None:
    """Idle connections fill every slot: a new one is not refused (the oldest idle one is
    closed, with a 503 saying why, to make room), and nobody closes the rest: the server
    does, after the header timeout. The 503 of slots all held by clients with the secret is
    in tests/test_origin_reliability.py."""
    r = fresh(max_connections=8, header_timeout=1.5, idle_timeout=300.0)
    idle = [r.connect() for _ in range(8)]
    try:
        time.sleep(0.2)
        r.still_serves()
        idle[0].settimeout(10)
        status, body = parse_answer(read_until_closed(idle[0]))
        assert status == 503 and b"slot" in body, body
        assert all(closed_by_server(s, 30) for s in idle)
        assert r.service.slots.expired >= 1
        r.still_serves()
    finally:
        for s in idle:
            s.close()


def test_errors_from_the_lower_layers_stay_pathapi_errors(rig: Rig) -> None:
    """What a consumer sees of all this is pathapi's own exceptions."""
    for secret in ("", "nope", rig.secret + "x"):
        with pytest.raises(AuthenticationError):
            rig.client(secret=secret).exists("data.bin")
    with pytest.raises(OriginError) as info:
        rig.client().manifest("../outside/" + OUTSIDE_NAME)
    assert isinstance(info.value, PathapiError) and "403" in str(info.value)
