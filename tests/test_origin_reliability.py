"""Issue 11 ("Reliability"), the origin's part: idle connections that would shut consumers
out (item 10), a Path that is itself a symlink (item 11), and trees deeper than Python's
recursion limit (item 13).

Everything here is real: an :class:`OriginService` on 127.0.0.1 over a tmp root, spoken to
by the real client; idle attackers are a separate process holding raw sockets that never
send a byte; clients that hold slots with the secret are raw keep-alive sockets; links are
real symlinks; the deep tree is 1,100 real folders. The full-app test runs real work
processes (``Path.get``, ``exists_remote``).

Run: ``.venv/bin/python -m pytest -q tests/test_origin_reliability.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import pytest
from _hostile import closed_by_server

from cas import Manifest
from cas.workspace import Workspace
from pathapi import App, Flow, Path, Work
from pathapi.aio import io_loop
from pathapi.wire.client import OriginClient, OriginSource
from pathapi.errors import OriginError, OriginUnreachableError
from pathapi.wire.origin import OriginService
from pathapi.wire.protocol import HEADER_PROTOCOL

KiB = 1024
NAME = "root.source"
DEPTH = 1100  # deeper than Python's recursion limit (1000); 2.2 KiB of path, under PATH_MAX

pytestmark = pytest.mark.usefixtures("close_client_sessions")


# -- a served root ----------------------------------------------------------------------------
@dataclass
class Served:
    service: OriginService
    root: FsPath
    top: FsPath  # holds the root, an outside folder and the consumer's folders
    secret: str
    host: str
    port: int

    def client(self, timeout: float = 10.0) -> OriginClient:
        return OriginClient(NAME, self.service.url, self.secret, timeout)

    def fetch(self, rel: str, dest: FsPath, timeout: float = 10.0) -> Manifest:
        """A real consumer's get: the current manifest, then Workspace.sync from the origin."""
        client = self.client(timeout)
        m = client.manifest(rel)
        assert m is not None, f"{rel!r} does not exist at the origin"
        with Workspace(self.top / f"consumer-state-{secrets.token_hex(3)}") as ws:
            ws.sync(m, str(dest), remote=OriginSource(client, m), overwrite=True)
        return m

    def keep_alive_with_secret(self) -> socket.socket:
        """A raw connection that presented the secret (one answered request) and now idles,
        as a pooled consumer connection does: it holds a trusted slot."""
        s = socket.create_connection((self.host, self.port), timeout=10)
        s.sendall(f"GET /v1/exists?path=data.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.secret}\r\n"
                  f"{HEADER_PROTOCOL}: 1\r\n\r\n".encode())
        status, headers, body = read_answer(s)
        assert status == 200 and json.loads(body) == {"exists": True}, (status, body)
        return s


def read_answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length, read from ``s`` (which stays open)."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        piece = s.recv(4096)
        if not piece:
            raise ConnectionError(f"closed before a whole answer came: {raw!r}")
        raw += piece
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        piece = s.recv(4096)
        if not piece:
            break
        body += piece
    return int(lines[0].split()[1]), headers, body


@contextmanager
def serving(top: FsPath, **options: Any) -> Iterator[Served]:
    root = top / "root"
    root.mkdir(parents=True)
    (root / "data.bin").write_bytes(os.urandom(300 * KiB))
    workspace = Workspace(top / "origin-state")
    secret = secrets.token_urlsafe(32)
    service = OriginService(NAME, str(root), secret, workspace, **options)
    url = io_loop().run(service.start(), timeout=30)
    parsed = urllib.parse.urlsplit(url)
    try:
        yield Served(service, root, top, secret, parsed.hostname, parsed.port)  # type: ignore[arg-type]
    finally:
        io_loop().run(service.stop(), timeout=90)
        workspace.close()


@pytest.fixture
def serve(tmp_path: FsPath) -> Iterator[Callable[..., Served]]:
    """Start a service of its own, with the options a test sets."""
    with ExitStack() as stack:
        yield lambda **options: stack.enter_context(serving(tmp_path / f"s{secrets.token_hex(2)}", **options))


def remove_tree(top: FsPath) -> None:
    """Remove ``top`` and everything under it without recursion: shutil.rmtree (and so
    pytest's clean-up of old temporary folders) recurses once per level before Python 3.12
    and fails on a tree deeper than the recursion limit, in every later pytest session."""
    todo: list[tuple[str, bool]] = [(str(top), False)]
    while todo:
        path, emptied = todo.pop()
        if emptied:
            os.rmdir(path)
            continue
        todo.append((path, True))
        with os.scandir(path) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    todo.append((e.path, False))
                else:
                    os.unlink(e.path)


@pytest.fixture
def deep_tmp(tmp_path: FsPath) -> Iterator[FsPath]:
    """``tmp_path``, removed whole after the test (it holds a tree 1,100 levels deep). Ask
    for it before ``serve`` so that it is torn down after the service stops."""
    yield tmp_path
    for child in list(tmp_path.iterdir()):
        if child.is_dir() and not child.is_symlink():
            remove_tree(child)
        else:
            child.unlink()


def tree(root: FsPath) -> dict[str, object]:
    """rel path -> file bytes | "dir" | ("link", target), walked without recursion (os.walk
    recurses once per level before Python 3.12)."""
    out: dict[str, object] = {}
    todo = [(str(root), "")]
    while todo:
        folder, rel = todo.pop()
        with os.scandir(folder) as it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                if e.is_symlink():
                    out[r] = ("link", os.readlink(e.path))
                elif e.is_dir():
                    out[r] = "dir"
                    todo.append((e.path, r))
                else:
                    with open(e.path, "rb") as f:
                        out[r] = f.read()
    return out


# == item 10: idle connections must not shut out consumers ==================================
#: A process without the secret: opens N raw connections to the origin, never sends a byte,
#: and reports each one the origin closes ("closed <i> <first bytes it was sent, hex>").
_IDLER = r"""
import select, socket, sys, time
host, port, n, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
print("open", n, flush=True)
got = {i: b"" for i in range(n)}
live = set(range(n))
end = time.monotonic() + limit
while live and time.monotonic() < end:
    ready, _, _ = select.select([socks[i] for i in live], [], [], 0.25)
    for s in ready:
        i = socks.index(s)
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if data:
            got[i] += data
            continue
        live.discard(i)
        print("closed", i, got[i][:12].hex() or "-", flush=True)
print("still-open", len(live), flush=True)
"""


class Idler:
    """The idle-socket process, and what it reported."""

    def __init__(self, served: Served, count: int, limit: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _IDLER, served.host, str(served.port), str(count), str(limit)],
            stdout=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def wait_for(self, prefix: str, within: float) -> str:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            found = [line for line in self.lines if line.startswith(prefix)]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"the idle process never reported {prefix!r}: {self.lines}")

    def closed(self) -> list[tuple[int, bytes]]:
        out = []
        for line in self.lines:
            if line.startswith("closed "):
                _, i, first = line.split()
                out.append((int(i), b"" if first == "-" else bytes.fromhex(first)))
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def test_idle_sockets_without_the_secret_cannot_shut_out_a_consumer(serve: Callable[..., Served]) -> None:
    """Forty idle connections against a cap of sixteen, from another process that never
    sends a byte: the consumer still gets its manifest and every chunk; the idle
    connections never hold more than the unreserved share, and the origin closes every
    one of them by itself, well before its keep-alive timeout (set to five minutes here, so
    only the header timeout or a newer connection can be what closed them)."""
    s = serve(max_connections=16, header_timeout=2.0, idle_timeout=300.0)
    assert s.service.reserved_connections >= 1
    idler = Idler(s, count=40, limit=60)
    try:
        idler.wait_for("open", 30)
        time.sleep(0.3)  # let the loop accept what the kernel queued
        assert s.service.slots.pending <= 16 - s.service.reserved_connections
        client = s.client(timeout=10)
        m = client.manifest("data.bin")
        assert m is not None
        got = dict(OriginSource(client, m).get_many(sorted(m.chunk_ids())))
        assert set(got) == m.chunk_ids()
        assert client.exists("data.bin")
        idler.wait_for("still-open", 45)
        assert idler.lines[-1] == "still-open 0", "some idle connections were never closed by the origin"
        assert len(idler.closed()) == 40
        assert s.service.slots.expired >= 1, "no idle connection was cut by the header timeout"
        # Those closed to make room before any request came were told why (a 503).
        assert all(first == b"" or first.startswith(b"HTTP/1.1 503") for _, first in idler.closed())
        assert client.manifest("data.bin") == m  # and the consumer is still served
    finally:
        idler.close()


def test_a_request_without_the_secret_gets_no_kept_alive_connection(serve: Callable[..., Served]) -> None:
    s = serve(header_timeout=30.0, idle_timeout=300.0)
    with socket.create_connection((s.host, s.port), timeout=10) as conn:
        conn.sendall(f"GET /v1/exists?path=data.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
                     f"{HEADER_PROTOCOL}: 1\r\n\r\n".encode())
        status, _, _ = read_answer(conn)
        assert status == 401
        assert closed_by_server(conn, 10), "a connection refused the secret was kept open"


def test_a_persistent_503_is_retried_then_names_the_origin_and_the_reason(serve: Callable[..., Served]) -> None:
    """Every slot held by connections that presented the secret (raw keep-alive sockets):
    a new connection gets a 503 carrying a reason and Retry-After; the client retries within
    its timeout, then raises OriginUnreachableError naming the origin and that reason."""
    s = serve(max_connections=4, idle_timeout=300.0)
    held = [s.keep_alive_with_secret() for _ in range(4)]
    try:
        with socket.create_connection((s.host, s.port), timeout=10) as extra:
            status, headers, body = read_answer(extra)
        assert status == 503
        assert headers["retry-after"].isdigit()
        reason = json.loads(body)["error"]
        assert NAME in reason and "connections" in reason
        before = s.service.slots.refused
        client = s.client(timeout=2.5)
        with pytest.raises(OriginUnreachableError) as info:
            client.manifest("data.bin")
        message = str(info.value)
        assert NAME in message and s.service.url in message and "503" in message and reason in message, message
        assert info.value.work_name == NAME
        assert s.service.slots.refused - before >= 2, "the client did not retry the 503"
    finally:
        for h in held:
            h.close()


def test_a_consumer_turned_away_by_a_503_gets_in_once_a_slot_frees(serve: Callable[..., Served]) -> None:
    s = serve(max_connections=4, idle_timeout=300.0)
    held = [s.keep_alive_with_secret() for _ in range(4)]
    result: list[object] = []
    try:
        before = s.service.slots.refused
        worker = threading.Thread(target=lambda: result.append(_try(lambda: s.client(timeout=20).manifest("data.bin"))),
                                  daemon=True)
        worker.start()
        deadline = time.monotonic() + 15
        while s.service.slots.refused == before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.service.slots.refused > before, "the client was never refused: the test proves nothing"
        held.pop().close()  # one consumer is done: its slot frees
        worker.join(60)
        assert len(result) == 1 and isinstance(result[0], Manifest), result
    finally:
        for h in held:
            h.close()


def _try(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported by the test
        return e


# == item 11: a Path that is a symlink ========================================================
def _linked_site(root: FsPath) -> dict[str, object]:
    """outputs/real (a folder), links to it (relative, absolute, through a linked parent),
    and links that lead nowhere or out of the root. Returns the real folder's tree."""
    real = root / "outputs" / "real"
    (real / "sub").mkdir(parents=True)
    (real / "a.bin").write_bytes(os.urandom(200 * KiB))
    (real / "sub" / "b.txt").write_bytes(b"b" * 5000)
    (real / "sub" / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.symlink("../a.bin", real / "sub" / "a_link")  # a link inside the folder, kept as a link
    os.symlink("real", root / "outputs" / "link")
    os.symlink(str(real), root / "outputs" / "abs_link")
    os.symlink("outputs", root / "alias")  # alias/link: a link on the way and at the end
    os.symlink("nowhere", root / "outputs" / "dangling")
    os.symlink("loop", root / "outputs" / "loop")
    os.symlink("loop_b", root / "outputs" / "loop_a")
    os.symlink("loop_a", root / "outputs" / "loop_b")
    (root.parent / "outside").mkdir(exist_ok=True)
    os.symlink("../../outside", root / "outputs" / "escape")
    return tree(real)


@pytest.mark.parametrize("rel", ["outputs/link", "outputs/abs_link", "alias/link"])
def test_a_path_that_is_a_link_to_a_folder_is_fetched_as_that_folder(serve: Callable[..., Served], rel: str) -> None:
    s = serve()
    expected = _linked_site(s.root)
    client = s.client()
    assert client.exists(rel)
    dest = s.top / "consumer" / "got"
    s.fetch(rel, dest)
    assert tree(dest) == expected
    assert not os.path.islink(dest)
    # The link is retargeted to another folder: the next get follows it there.
    (s.root / "outputs" / "other").mkdir()
    (s.root / "outputs" / "other" / "c.txt").write_bytes(b"other")
    os.replace(_make_link(s.root / "outputs", "other"), s.root / "outputs" / "link")
    if rel != "outputs/abs_link":
        s.fetch(rel, dest)
        assert tree(dest) == {"c.txt": b"other"}


def _make_link(folder: FsPath, target: str) -> FsPath:
    tmp = folder / f".tmp-{secrets.token_hex(3)}"
    os.symlink(target, tmp)
    return tmp


@pytest.mark.parametrize("rel", ["outputs/dangling", "outputs/loop", "outputs/loop_a", "outputs/real/sub/b.txt/x"])
def test_a_link_that_leads_nowhere_does_not_exist_for_exists_nor_get(serve: Callable[..., Served], rel: str) -> None:
    """exists agrees with what get can fetch: a dangling link, a loop (of one or two links),
    a file where a folder must be on the way: no files, so exists is False and the
    manifest is "not found" (get raises FileNotFoundError)."""
    s = serve()
    _linked_site(s.root)
    client = s.client()
    assert client.exists(rel) is False
    assert client.manifest(rel) is None


def test_a_link_out_of_the_root_is_refused_by_exists_and_get_alike(serve: Callable[..., Served]) -> None:
    s = serve()
    _linked_site(s.root)
    (s.root.parent / "outside" / "secret.txt").write_bytes(b"never served")
    client = s.client()
    for call in (client.exists, client.manifest):
        with pytest.raises(OriginError) as info:
            call("outputs/escape")
        assert "403" in str(info.value) and "outside" in str(info.value)


# == item 13: a tree deeper than the recursion limit ========================================
def _deep_tree(top: FsPath, depth: int) -> dict[str, object]:
    """``depth`` nested folders named "d" with a file every 100 levels and one at the bottom;
    made one mkdir at a time (os.makedirs recurses once per level)."""
    folder = top
    folder.mkdir()
    rel = ""
    expected: dict[str, object] = {}
    for level in range(1, depth + 1):
        folder = folder / "d"
        rel = f"{rel}/d" if rel else "d"
        folder.mkdir()
        expected[rel] = "dir"
        if level % 100 == 0 or level == depth:
            (folder / f"f{level}.txt").write_bytes(f"level {level}".encode())
            expected[f"{rel}/f{level}.txt"] = f"level {level}".encode()
    return expected


def test_a_tree_deeper_than_the_recursion_limit_is_served_and_fetched(deep_tmp: FsPath, serve: Callable[..., Served]) -> None:
    s = serve()
    expected = _deep_tree(s.root / "deep", DEPTH)
    dest = s.top / "consumer" / "deep"
    m = s.fetch("deep", dest)
    assert len(m.entries) == len(expected)
    assert tree(dest) == expected
    # A change at the bottom travels too (an incremental get of the same deep tree).
    bottom = "/".join(["d"] * DEPTH)
    (s.root / "deep" / bottom / f"f{DEPTH}.txt").write_bytes(b"changed")
    expected[f"{bottom}/f{DEPTH}.txt"] = b"changed"
    s.fetch("deep", dest)
    assert tree(dest) == expected


# == the same through the public API, with real work processes ================================
class LinkSource(Work):
    def __init__(self) -> None:
        super().__init__()
        self.folder = "lit://outputs/link"
        self.dangling = "lit://outputs/dangling"
        self.loop = "lit://outputs/loop"
        self.deep = "lit://deep"
        self.expected: dict[str, Any] = {}

    def run(self) -> None:
        os.makedirs("outputs/real/sub", exist_ok=True)
        with open("outputs/real/a.txt", "w") as f:
            f.write("a")
        with open("outputs/real/sub/b.txt", "w") as f:
            f.write("b")
        os.symlink("real", "outputs/link")
        os.symlink("nowhere", "outputs/dangling")
        os.symlink("loop", "outputs/loop")
        self.expected = {"folder": _summary(tree(FsPath("outputs/real"))),
                         "deep": _fingerprint(_deep_tree(FsPath("deep"), DEPTH))}


def _summary(t: dict[str, object]) -> dict[str, str]:
    """A tree as JSON-able state: rel path -> "dir" | file text | "link:<target>"."""
    return {k: v if isinstance(v, str) else f"link:{v[1]}" if isinstance(v, tuple) else v.decode()  # type: ignore[union-attr]
            for k, v in t.items()}


def _fingerprint(t: dict[str, object]) -> list[object]:
    """A large tree as small state: [entry count, sha256 of its sorted summary]."""
    return [len(t), hashlib.sha256(json.dumps(sorted(_summary(t).items())).encode()).hexdigest()]


class LinkConsumer(Work):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, Any] = {}

    def run(self, folder: Path, dangling: Path, loop: Path, deep: Path) -> None:
        seen: dict[str, Any] = {"auto": _summary(tree(FsPath(folder))) if os.path.isdir(folder) else None}
        seen["exists_remote"] = {"folder": folder.exists_remote(), "dangling": dangling.exists_remote(),
                                 "loop": loop.exists_remote(), "deep": deep.exists_remote()}
        for label, p in (("dangling", dangling), ("loop", loop)):
            try:
                p.get()
            except FileNotFoundError:
                seen[f"get_{label}"] = "FileNotFoundError"
            else:
                seen[f"get_{label}"] = "no error"
        folder.get(overwrite=True)
        seen["get"] = _summary(tree(FsPath(folder)))
        seen["deep"] = _fingerprint(tree(FsPath(deep))) if os.path.isdir(deep) else None
        self.seen = seen


class LinkFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.source = LinkSource()
        self.consumer = LinkConsumer()

    def run(self) -> None:
        self.source.run()
        self.consumer.run(self.source.folder, self.source.dangling, self.source.loop, self.source.deep)


def test_a_linked_folder_and_a_deep_tree_through_the_public_api(deep_tmp: FsPath) -> None:
    flow = LinkFlow()
    App(flow, root=deep_tmp / "app").run()
    seen, expected = flow.consumer.seen, flow.source.expected
    assert seen["exists_remote"] == {"folder": True, "dangling": False, "loop": False, "deep": True}
    assert seen["auto"] == expected["folder"], "the automatic get before run did not fetch the linked folder"
    assert seen["get"] == expected["folder"]
    assert seen["get_dangling"] == seen["get_loop"] == "FileNotFoundError"
    assert seen["deep"] == expected["deep"]
