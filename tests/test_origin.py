"""The origin service and its client (SPEC: "Stores and transport", "What bad input and faults
get"; docs/format.md: "Origin protocol").

A real :class:`OriginService` runs in this process on 127.0.0.1 over a tmp root and is
spoken to over real HTTP: raw requests (``http.client``, raw sockets) for what the protocol
must refuse, and the :class:`OriginClient`/:class:`OriginSource` pair for how those answers
become pathapi's exceptions. Misbehaving servers (a closed port, one that accepts and never
answers, one that dies mid-answer) are tiny raw-socket threads.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cas import Manifest, delta
from cas.chunking import iter_chunk_spans
from cas.compress import decompress
from cas.errors import ChunkNotFoundError
from cas.hashing import ID_SIZE, chunk_id
from cas.workspace import Workspace
from pathapi.aio import io_loop
from pathapi.wire.client import OriginClient, OriginSource
from pathapi.errors import (
    AuthenticationError,
    OriginError,
    OriginUnreachableError,
    PathapiError,
    StaleManifestError,
)
from pathapi.paths import PathOutsideRootError, resolve_under
from pathapi.wire.origin import OriginService
from pathapi.wire.protocol import (
    DELTA_HEAD, DELTA_ITEM, FRAME, HEADER_MANIFEST_ID, HEADER_PROTOCOL, MAX_BATCH_IDS, MAX_DELTA_IDS,
    STATUS_DELTA, STATUS_OK, STATUS_STALE, STATUS_UNKNOWN,
)

KiB = 1024
MiB = 1024 * KiB
NAME = "root.source"
OUTSIDE_SECRET = b"TOP-SECRET-OUTSIDE-THE-ROOT"

pytestmark = pytest.mark.usefixtures("close_client_sessions")


# -- fixtures ---------------------------------------------------------------------------
@dataclass
class Origin:
    service: OriginService
    root: Path  # the served work root
    outside: Path  # a folder next to the root, with a file that must never be served
    secret: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return self.service.url

    def client(self, secret: str | None = None, timeout: float = 10.0) -> OriginClient:
        return OriginClient(NAME, self.url, self.secret if secret is None else secret, timeout)

    def request(
        self, method: str, path: str, *, query: str | dict[str, str] | None = None, body: bytes | None = None,
        secret: str | None = None, auth: bool = True, protocol: str | None = "1",
    ) -> tuple[int, bytes, dict[str, str]]:
        """One raw HTTP request; ``query`` as a dict is url-encoded, as a str sent verbatim."""
        headers: dict[str, str] = {}
        if auth:
            headers["Authorization"] = f"Bearer {self.secret if secret is None else secret}"
        if protocol is not None:
            headers[HEADER_PROTOCOL] = protocol
        if isinstance(query, dict):
            query = urllib.parse.urlencode(query)
        target = f"{path}?{query}" if query else path
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, target, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.read(), dict(r.getheaders())
        finally:
            conn.close()

    def manifest(self, rel: str) -> tuple[Manifest, bytes]:
        status, body, headers = self.request("GET", "/v1/manifest", query={"path": rel})
        assert status == 200, body
        m = Manifest.decode(body)
        assert headers[HEADER_MANIFEST_ID] == m.id.hex()
        return m, m.id

    def chunks(self, manifest_id: bytes, ids: list[bytes]) -> list[tuple[int, int, bytes, int, bytes]]:
        status, body, _ = self.request("POST", "/v1/chunks", body=manifest_id + b"".join(ids))
        assert status == 200, body
        return parse_frames(body)


def parse_frames(body: bytes) -> list[tuple[int, int, bytes, int, bytes]]:
    """(status, codec, id, raw length, payload) of each frame of a /v1/chunks answer."""
    out = []
    pos = 0
    while pos < len(body):
        status, codec, cid, raw, stored = FRAME.unpack_from(body, pos)
        pos += FRAME.size
        out.append((status, codec, cid, raw, body[pos : pos + stored]))
        pos += stored
    assert pos == len(body), "frames overrun the body"
    return out


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    root = tmp_path / "works" / NAME
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(OUTSIDE_SECRET * 100)
    workspace = Workspace(tmp_path / "state" / NAME)
    secret = secrets.token_urlsafe(32)
    service = OriginService(NAME, str(root), secret, workspace)
    url = io_loop().run(service.start(), timeout=30)
    parsed = urllib.parse.urlsplit(url)
    assert parsed.hostname == "127.0.0.1", "the origin must bind to loopback by default"
    try:
        yield Origin(service, root, outside, secret, parsed.hostname, parsed.port)  # type: ignore[arg-type]
    finally:
        io_loop().run(service.stop(), timeout=30)
        workspace.close()


# -- authentication and protocol version -------------------------------------------------
ENDPOINTS = [
    ("GET", "/v1/manifest", {"path": "data.bin"}, None),
    ("GET", "/v1/exists", {"path": "data.bin"}, None),
    ("POST", "/v1/chunks", None, bytes(2 * ID_SIZE)),
    ("POST", "/v1/deltas", None, bytes(ID_SIZE) + DELTA_HEAD.pack(8192, 0)),
]


@pytest.mark.parametrize("method,path,query,body", ENDPOINTS)
@pytest.mark.parametrize("secret_kind", ["missing", "empty", "wrong", "other_app_run", "prefix", "extended", "not_bearer"])
def test_request_without_the_app_secret_is_refused_401(
    origin: Origin, method: str, path: str, query: dict[str, str] | None, body: bytes | None, secret_kind: str
) -> None:
    write(origin.root / "data.bin", b"payload " * 1000)
    kwargs: dict[str, Any] = {}
    if secret_kind == "missing":
        kwargs["auth"] = False
    else:
        kwargs["secret"] = {
            "empty": "",
            "wrong": "x" * len(origin.secret),
            "other_app_run": secrets.token_urlsafe(32),  # what another App.run() would hold
            "prefix": origin.secret[:-1],
            "extended": origin.secret + "A",
            "not_bearer": origin.secret,
        }[secret_kind]
    if secret_kind == "not_bearer":
        headers = {"Authorization": f"Basic {origin.secret}", HEADER_PROTOCOL: "1"}
        conn = http.client.HTTPConnection(origin.host, origin.port, timeout=10)
        target = f"{path}?{urllib.parse.urlencode(query)}" if query else path
        conn.request(method, target, body=body, headers=headers)
        r = conn.getresponse()
        status, answer = r.status, r.read()
        conn.close()
    else:
        status, answer, _ = origin.request(method, path, query=query, body=body, **kwargs)
    assert status == 401
    assert b"payload" not in answer
    assert origin.service.chunks_read == 0


def test_unauthenticated_traversal_is_refused_before_the_path_is_looked_at(origin: Origin) -> None:
    status, answer, _ = origin.request("GET", "/v1/manifest", query={"path": "../outside/secret.txt"}, auth=False)
    assert status == 401
    assert OUTSIDE_SECRET not in answer


@pytest.mark.parametrize("protocol", [None, "", "0", "2", "1.0", "11"])
def test_request_without_protocol_version_1_is_refused_400(origin: Origin, protocol: str | None) -> None:
    write(origin.root / "data.bin", b"x" * 100)
    for method, path, query, body in ENDPOINTS:
        status, answer, _ = origin.request(method, path, query=query, body=body, protocol=protocol)
        assert status == 400, (method, path, answer)
        assert b"protocol" in answer


def test_unknown_endpoint_with_the_secret_is_404_and_without_it_401(origin: Origin) -> None:
    assert origin.request("GET", "/v1/nothing")[0] == 404
    assert origin.request("GET", "/v1/nothing", auth=False)[0] == 401


def test_client_with_a_wrong_secret_raises_authentication_error(origin: Origin) -> None:
    write(origin.root / "data.bin", b"x" * 100)
    client = origin.client(secret=secrets.token_urlsafe(32))
    for call in (lambda: client.manifest("data.bin"), lambda: client.exists("data.bin")):
        with pytest.raises(AuthenticationError) as info:
            call()
        err = info.value
        assert isinstance(err, PermissionError) and isinstance(err, OriginError) and isinstance(err, PathapiError)
        assert err.work_name == NAME
        assert NAME in str(err) and "secret" in str(err)
    # and a chunk fetch, with a manifest the right client got
    m = origin.client().manifest("data.bin")
    assert m is not None
    with pytest.raises(AuthenticationError):
        list(OriginSource(client, m).get_many(sorted(m.chunk_ids())))


# -- paths: only what is inside the root is served -----------------------------------------
@pytest.fixture
def traversal_setup(origin: Origin) -> Origin:
    """A root with ordinary files, and links that point out of it."""
    write(origin.root / "a" / "inside.txt", b"inside")
    write(origin.root / "data.bin", b"d" * 1000)
    os.symlink(origin.outside, origin.root / "out_dir")  # absolute link to the outside folder
    os.symlink("../outside/secret.txt", origin.root / "out_file")  # relative link leaving the root
    os.symlink(origin.outside / "secret.txt", origin.root / "a" / "deep_out")
    return origin


def unsafe_paths(o: Origin) -> list[str]:
    return [
        "..",
        "../",
        "../x",
        "../outside/secret.txt",
        "a/../../outside/secret.txt",
        "a/../..",
        "./../outside",
        "a/./../../outside/secret.txt",
        "/",
        "/etc/passwd",
        str(o.outside / "secret.txt"),  # absolute path of a real file outside
        str(o.root / "data.bin"),  # absolute, even if it is inside
        "a\x00b",
        "data.bin\x00",
        "\x00",
        "out_dir",  # symlink inside the root pointing outside
        "out_dir/secret.txt",
        "out_file",
        "a/deep_out",
        "..\\outside\\secret.txt",  # backslashes are not separators here, and are refused
        "a\\..\\..\\outside",
        "data.bin\\",
    ]


@pytest.mark.parametrize("endpoint", ["/v1/manifest", "/v1/exists"])
def test_paths_outside_the_root_are_refused_403(traversal_setup: Origin, endpoint: str) -> None:
    o = traversal_setup
    for rel in unsafe_paths(o):
        status, answer, headers = o.request("GET", endpoint, query={"path": rel})
        assert status == 403, (rel, status, answer)
        assert OUTSIDE_SECRET not in answer
        assert HEADER_MANIFEST_ID not in headers
    assert o.service.chunks_read == 0


@pytest.mark.parametrize("raw_query", [
    "path=%2e%2e%2foutside%2fsecret.txt",  # percent-encoded ../
    "path=..%2Foutside%2Fsecret.txt",
    "path=a%2F..%2F..%2Foutside",
    "path=%2Fetc%2Fpasswd",
    "path=a%00b",
    "path=..%5Coutside",
    "path=data.bin&path=../outside/secret.txt",  # a second value must not sneak past the check
    "path=../outside/secret.txt&path=data.bin",
])
def test_encoded_traversal_is_refused(traversal_setup: Origin, raw_query: str) -> None:
    status, answer, _ = traversal_setup.request("GET", "/v1/manifest", query=raw_query)
    if status == 200:  # only possible for a query whose *used* value is the safe one
        m = Manifest.decode(answer)
        assert m.total_size == 1000 and OUTSIDE_SECRET not in answer
    else:
        assert status == 403, (raw_query, answer)
        assert OUTSIDE_SECRET not in answer


def test_empty_or_missing_path_is_refused(origin: Origin) -> None:
    assert origin.request("GET", "/v1/manifest")[0] == 403
    assert origin.request("GET", "/v1/manifest", query={"path": ""})[0] == 403


def test_a_folder_holding_a_link_that_leaves_it_is_refused_403(traversal_setup: Origin) -> None:
    o = traversal_setup
    for rel in ("a", "."):  # "a" holds a/deep_out; the root holds out_dir and out_file
        status, answer, _ = o.request("GET", "/v1/manifest", query={"path": rel})
        assert status == 403, (rel, answer)
        assert OUTSIDE_SECRET not in answer
    with pytest.raises(OriginError) as info:
        o.client().manifest("a")
    assert "403" in str(info.value) and NAME in str(info.value)


def test_client_refuses_unsafe_paths_with_origin_error(traversal_setup: Origin) -> None:
    client = traversal_setup.client()
    for rel in unsafe_paths(traversal_setup):
        with pytest.raises(OriginError) as info:
            client.manifest(rel)
        assert not isinstance(info.value, (AuthenticationError, StaleManifestError))
        assert "403" in str(info.value)


def test_resolve_under_accepts_inside_and_refuses_outside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    os.symlink("a", root / "to_a")
    os.symlink(tmp_path, root / "up")
    assert resolve_under(str(root), "a/x") == str(root / "a" / "x")
    assert resolve_under(str(root), "./a//x/") == str(root / "a" / "x")
    assert resolve_under(str(root), "to_a/x") == str(root / "to_a" / "x")
    assert resolve_under(str(root), "not/yet/there") == str(root / "not" / "yet" / "there")
    for rel in ("", "..", "a/../..", "/a", "a\x00", "a\\b", "up", "up/other"):
        with pytest.raises(PathOutsideRootError):
            resolve_under(str(root), rel)
    # a root that is itself reached through a symlink still accepts its own paths
    os.symlink(root, tmp_path / "alias")
    assert resolve_under(str(tmp_path / "alias"), "a") == str(root / "a")


def test_symlinks_that_stay_inside_the_root_are_served(origin: Origin) -> None:
    data = write(origin.root / "ckpt" / "step_5.ckpt", os.urandom(300 * KiB))
    os.symlink("ckpt/step_5.ckpt", origin.root / "latest.ckpt")
    os.symlink("ckpt", origin.root / "ckpt_dir")
    client = origin.client()
    for rel in ("latest.ckpt", "ckpt_dir/step_5.ckpt", "ckpt/step_5.ckpt"):
        m = client.manifest(rel)
        assert m is not None and m.total_size == len(data)
        got = dict(OriginSource(client, m).get_many(sorted(m.chunk_ids())))
        (entry,) = m.files()
        assert b"".join(bytes(got[cid]) for cid, _, _ in iter_chunk_spans(entry.chunks)) == data, rel


def test_equal_trees_at_two_paths_are_each_served_from_their_own_place(origin: Origin) -> None:
    """Manifests name content: ``latest.ckpt`` and ``step_5.ckpt`` holding the same bytes have
    one manifest id. Removing or changing one must not break fetching the other."""
    data = os.urandom(300 * KiB)
    for name in ("step_5.ckpt", "latest.ckpt", "d1/w.bin", "d2/w.bin"):
        write(origin.root / name, data)
    client = origin.client()
    m_first = client.manifest("step_5.ckpt")
    m_second = client.manifest("latest.ckpt")
    assert m_first is not None and m_second is not None and m_first.id == m_second.id
    (origin.root / "latest.ckpt").unlink()  # the path served last goes away
    m = client.manifest("step_5.ckpt")
    assert m is not None and len(dict(OriginSource(client, m).get_many(sorted(m.chunk_ids())))) == len(m.chunk_ids())
    # folders too, and a change rather than a removal
    md1, md2 = client.manifest("d1"), client.manifest("d2")
    assert md1 is not None and md2 is not None and md1.id == md2.id
    with open(origin.root / "d2" / "w.bin", "r+b") as f:
        f.write(b"changed")
    m = client.manifest("d1")
    assert m is not None and len(dict(OriginSource(client, m).get_many(sorted(m.chunk_ids())))) == len(m.chunk_ids())


def test_a_link_retargeted_to_an_equal_file_is_served_from_its_new_target(origin: Origin) -> None:
    data = os.urandom(200 * KiB)
    write(origin.root / "ckpt" / "v1", data)
    write(origin.root / "ckpt" / "v2", data)
    os.symlink("ckpt/v1", origin.root / "latest")
    client = origin.client()
    m1 = client.manifest("latest")
    os.remove(origin.root / "latest")
    os.symlink("ckpt/v2", origin.root / "latest")
    os.remove(origin.root / "ckpt" / "v1")
    m2 = client.manifest("latest")
    assert m1 is not None and m2 is not None and m1.id == m2.id
    got = dict(OriginSource(client, m2).get_many(sorted(m2.chunk_ids())))
    assert set(got) == m2.chunk_ids()


# -- manifests and existence ------------------------------------------------------------
def test_manifest_and_exists_of_files_folders_and_missing_paths(origin: Origin) -> None:
    write(origin.root / "dir" / "f1", os.urandom(10 * KiB))
    write(origin.root / "dir" / "sub" / "f2", b"")
    write(origin.root / "file", b"hello")
    client = origin.client()
    m = client.manifest("dir")
    assert m is not None and sorted(e.path for e in m.entries) == ["f1", "sub", "sub/f2"]
    assert client.manifest("file").total_size == 5  # type: ignore[union-attr]
    assert client.manifest("missing") is None
    assert client.manifest("dir/missing/deeper") is None
    assert client.manifest("file/below_a_file") is None  # not a 500: it does not exist
    assert client.exists("dir") and client.exists("dir/sub/f2") and client.exists("file")
    assert not client.exists("missing") and not client.exists("file/below_a_file")
    status, answer, _ = origin.request("GET", "/v1/manifest", query={"path": "missing"})
    assert status == 404 and NAME.encode() in answer


def test_manifest_is_always_the_current_one(origin: Origin) -> None:
    client = origin.client()
    f = origin.root / "data.bin"
    seen = set()
    for i in range(4):
        write(f, os.urandom(50 * KiB + i))
        m = client.manifest("data.bin")
        assert m is not None and m.total_size == 50 * KiB + i
        seen.add(m.id)
    assert len(seen) == 4


# -- chunk requests --------------------------------------------------------------------
@pytest.fixture
def served(origin: Origin) -> tuple[Origin, Manifest, bytes]:
    data = write(origin.root / "data.bin", os.urandom(3 * MiB))  # DEFAULT_PARAMS: several chunks
    m, mid = origin.manifest("data.bin")
    assert len(m.chunk_ids()) >= 3
    return origin, m, data


@pytest.mark.parametrize("length", [0, 1, ID_SIZE - 1, ID_SIZE + 1, 2 * ID_SIZE - 1, 3 * ID_SIZE + 7])
def test_chunk_request_with_a_malformed_body_is_400(served: tuple[Origin, Manifest, bytes], length: int) -> None:
    o, m, _ = served
    body = (m.id + b"".join(sorted(m.chunk_ids())) * 4)[:length]
    status, answer, _ = o.request("POST", "/v1/chunks", body=body)
    assert status == 400, answer
    assert o.service.chunks_read == 0


def test_chunk_request_with_only_a_manifest_id_answers_no_frames(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, _ = served
    assert o.chunks(m.id, []) == []


def test_chunk_request_with_too_many_ids_is_413(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, _ = served
    ids = sorted(m.chunk_ids())
    too_many = (ids * (MAX_BATCH_IDS // len(ids) + 2))[: MAX_BATCH_IDS + 1]
    status, answer, _ = o.request("POST", "/v1/chunks", body=m.id + b"".join(too_many))
    assert status == 413, answer
    assert o.service.chunks_read == 0
    # a body far beyond any legal request is refused too, without being served
    status, _, _ = o.request("POST", "/v1/chunks", body=m.id + os.urandom(ID_SIZE * 40_000))
    assert status == 413
    # exactly the limit is fine (unknown ids answer "unknown", cheaply)
    frames = o.chunks(m.id, [os.urandom(ID_SIZE) for _ in range(MAX_BATCH_IDS)])
    assert len(frames) == MAX_BATCH_IDS and {f[0] for f in frames} == {STATUS_UNKNOWN}


def test_chunk_request_for_an_unknown_manifest_is_410(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, _ = served
    for mid in (os.urandom(ID_SIZE), bytes(ID_SIZE), chunk_id(b"not a manifest")):
        status, answer, _ = o.request("POST", "/v1/chunks", body=mid + b"".join(sorted(m.chunk_ids())))
        assert status == 410, answer
    assert o.service.chunks_read == 0


def test_chunks_answer_ok_frames_that_verify_and_unknown_for_foreign_ids(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, data = served
    ids = sorted(m.chunk_ids())
    foreign = [chunk_id(b"elsewhere"), chunk_id(data)]  # the id of the whole file is no chunk of it
    ask = [foreign[0], ids[0], *ids[1:], foreign[1], ids[0]]  # duplicates are answered again
    frames = o.chunks(m.id, ask)
    assert [f[2] for f in frames] == ask
    sizes = m.chunk_sizes()
    for status, codec, cid, raw, payload in frames:
        if cid in foreign:
            assert (status, raw, payload) == (STATUS_UNKNOWN, 0, b"")
        else:
            assert status == STATUS_OK and raw == sizes[cid]
            assert chunk_id(decompress(codec, payload, raw, cid.hex())) == cid


def test_a_file_changed_after_its_manifest_was_served_answers_stale(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, data = served
    ids = sorted(m.chunk_ids())
    # same size, new bytes, rewritten in place
    with open(o.root / "data.bin", "r+b") as f:
        f.write(os.urandom(len(data)))
    frames = o.chunks(m.id, ids)
    assert [f[0] for f in frames] == [STATUS_STALE] * len(ids)
    assert all(f[4] == b"" for f in frames)


@pytest.mark.parametrize("change", ["truncate", "delete", "replace_by_link", "replace_by_dir", "partial"])
def test_every_kind_of_change_after_the_manifest_is_stale_never_torn(served: tuple[Origin, Manifest, bytes], change: str) -> None:
    o, m, data = served
    f = o.root / "data.bin"
    if change == "truncate":
        os.truncate(f, len(data) // 2)
    elif change == "delete":
        f.unlink()
    elif change == "replace_by_link":
        f.unlink()
        os.symlink(o.outside / "secret.txt", f)
    elif change == "replace_by_dir":
        f.unlink()
        f.mkdir()
    elif change == "partial":  # only the first chunk's bytes change: the others are still good
        with open(f, "r+b") as fh:
            fh.write(bytes(b ^ 0xFF for b in data[:100]))
    frames = o.chunks(m.id, sorted(m.chunk_ids()))
    spans = {cid: (off, n) for cid, off, n in iter_chunk_spans(next(m.files()).chunks)}
    if change == "partial":  # every chunk but the first still holds its bytes
        still_good = {cid for cid, (off, _) in spans.items() if off > 0}
    elif change == "truncate":  # chunks wholly in the kept half still hold theirs
        still_good = {cid for cid, (off, n) in spans.items() if off + n <= len(data) // 2}
    else:
        still_good = set()
    assert len(still_good) < len(spans)
    for status, codec, cid, raw, payload in frames:
        if cid in still_good:
            assert status == STATUS_OK and chunk_id(decompress(codec, payload, raw)) == cid
        else:
            assert (status, payload) == (STATUS_STALE, b""), change
        assert OUTSIDE_SECRET not in payload
    client = o.client()
    with pytest.raises(StaleManifestError) as info:
        list(OriginSource(client, m).get_many(sorted(m.chunk_ids())))
    assert info.value.work_name == NAME and NAME in str(info.value)


def test_origin_source_delivers_every_chunk_verified(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, data = served
    src = OriginSource(o.client(), m)
    got = dict(src.get_many(sorted(m.chunk_ids())))
    assert set(got) == m.chunk_ids()

    (entry,) = m.files()
    assert b"".join(bytes(got[cid]) for cid, _, _ in iter_chunk_spans(entry.chunks)) == data
    assert src.chunks_received == len(m.chunk_ids())
    assert 0 < src.bytes_received <= len(data)


def test_origin_source_turns_status_frames_into_exceptions(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, _ = served
    client = o.client()
    # an id that is not in the manifest is refused before anything is sent
    with pytest.raises(ChunkNotFoundError):
        list(OriginSource(client, m).get_many([chunk_id(b"nope")]))
    # an id the origin does not know (the consumer believes it is in the manifest)
    src = OriginSource(client, m)
    foreign = chunk_id(b"foreign chunk")
    src._sizes[foreign] = 13
    with pytest.raises(OriginError) as info:
        list(src.get_many([foreign]))
    assert not isinstance(info.value, StaleManifestError)
    assert "does not know" in str(info.value) and NAME in str(info.value)


def test_origin_source_for_a_manifest_the_origin_never_served_raises_stale(origin: Origin, tmp_path: Path) -> None:
    """410 (expired or never served) means: ask for a new manifest."""
    other = tmp_path / "elsewhere" / "data.bin"
    write(other, os.urandom(200 * KiB))
    with Workspace(tmp_path / "other_state") as ws:
        m = ws.snapshot(other)
    with pytest.raises(StaleManifestError) as info:
        list(OriginSource(origin.client(), m).get_many(sorted(m.chunk_ids())))
    assert NAME in str(info.value)


def test_old_manifests_expire_and_answer_410(origin: Origin) -> None:
    f = origin.root / "data.bin"
    write(f, os.urandom(10 * KiB))
    first, _ = origin.manifest("data.bin")
    for i in range(40):  # more distinct manifests than the origin keeps
        write(f, os.urandom(10 * KiB))
        origin.manifest("data.bin")
    status, _, _ = origin.request("POST", "/v1/chunks", body=first.id + b"".join(first.chunk_ids()))
    assert status == 410


# -- unreachable, silent and dying origins ------------------------------------------------
def _bounded(call: Callable[[], Any], limit: float) -> tuple[BaseException | None, float]:
    """Run ``call`` in a thread; fail the test (not hang) if it takes longer than ``limit``."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    t0 = time.monotonic()
    fut = pool.submit(call)
    try:
        fut.result(timeout=limit)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"the client did not give up within {limit} s")
    except BaseException as e:  # noqa: BLE001 - returned to the test to check
        return e, time.monotonic() - t0
    finally:
        pool.shutdown(wait=False)
    return None, time.monotonic() - t0


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class RawServer:
    """A loopback TCP server thread that misbehaves as told: ``mode`` is one of

    - ``silent``: accept, read the request, never answer;
    - ``no_accept``: listen but never accept (the kernel still completes the handshake);
    - ``headers_then_stall``: send the status line and headers, then nothing;
    - ``truncated``: answer a 200 with a Content-Length it does not honour, then close;
    - ``garbage``: answer bytes that are not HTTP, then close.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        if mode != "no_accept":
            self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.held.append(conn)
            conn.settimeout(5)
            try:
                conn.recv(65536)
                if self.mode == "headers_then_stall":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nX-Manifest-Id: 00\r\n\r\n")
                elif self.mode == "truncated":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"\x00" * 500)
                    conn.close()
                elif self.mode == "garbage":
                    conn.sendall(b"\x16\x03\x01 this is not http at all\r\n\r\n")
                    conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(5)
        for c in self.held:
            c.close()
        self.sock.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[[str], RawServer]]:
    servers: list[RawServer] = []

    def make(mode: str) -> RawServer:
        servers.append(RawServer(mode))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _some_manifest(tmp_path: Path) -> Manifest:
    write(tmp_path / "m" / "data.bin", os.urandom(300 * KiB))
    with Workspace(tmp_path / "m_state") as ws:
        return ws.snapshot(tmp_path / "m" / "data.bin")


def test_closed_port_raises_origin_unreachable_at_once(tmp_path: Path) -> None:
    client = OriginClient(NAME, f"http://127.0.0.1:{_closed_port()}", "s", timeout=5.0)
    m = _some_manifest(tmp_path)
    for call in (lambda: client.manifest("x"), lambda: client.exists("x"),
                 lambda: list(OriginSource(client, m).get_many(sorted(m.chunk_ids())))):
        err, took = _bounded(call, 10)
        assert isinstance(err, OriginUnreachableError) and isinstance(err, ConnectionError), err
        assert err.work_name == NAME and NAME in str(err) and client.url in str(err)
        assert took < 3


@pytest.mark.parametrize("mode", ["silent", "no_accept", "headers_then_stall"])
def test_an_origin_that_never_answers_gives_up_within_the_timeout(
    raw_server: Callable[[str], RawServer], tmp_path: Path, mode: str
) -> None:
    server = raw_server(mode)
    timeout = 0.75
    client = OriginClient(NAME, server.url, "s", timeout=timeout)
    m = _some_manifest(tmp_path)
    for call in (lambda: client.manifest("x"), lambda: client.exists("x"),
                 lambda: list(OriginSource(client, m).get_many(sorted(m.chunk_ids())))):
        err, took = _bounded(call, timeout * 4 + 10)
        assert isinstance(err, OriginUnreachableError), repr(err)
        assert NAME in str(err) and f"{timeout:g} s" in str(err)
        assert timeout * 0.8 <= took < timeout * 2 + 1.5, f"gave up after {took:.2f} s with timeout {timeout} s"


@pytest.mark.parametrize("mode", ["truncated", "garbage"])
def test_an_origin_that_breaks_off_its_answer_raises_a_pathapi_error(
    raw_server: Callable[[str], RawServer], tmp_path: Path, mode: str
) -> None:
    """The lower layer's errors (aiohttp's) never reach the caller untranslated."""
    server = raw_server(mode)
    client = OriginClient(NAME, server.url, "s", timeout=5)
    m = _some_manifest(tmp_path)
    for call in (lambda: client.manifest("x"), lambda: list(OriginSource(client, m).get_many(sorted(m.chunk_ids())))):
        err, took = _bounded(call, 30)
        assert isinstance(err, (OriginUnreachableError, OriginError)), repr(err)
        assert NAME in str(err)
        assert took < 5


def test_the_service_keeps_serving_while_slow_clients_hold_connections(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, data = served
    held: list[socket.socket] = []
    try:
        for i in range(20):
            s = socket.create_connection((o.host, o.port), timeout=5)
            held.append(s)
            if i % 4 == 0:  # connected, says nothing
                continue
            if i % 4 == 1:  # half a request line
                s.sendall(b"GET /v1/manifest?path=data.bin HTTP/1.1\r\nHost: x\r\n")
            elif i % 4 == 2:  # a chunk request whose body never finishes
                body = m.id + b"".join(sorted(m.chunk_ids()))
                s.sendall(
                    b"POST /v1/chunks HTTP/1.1\r\nHost: x\r\n"
                    + f"Authorization: Bearer {o.secret}\r\n{HEADER_PROTOCOL}: 1\r\n".encode()
                    + f"Content-Length: {len(body) + 1000}\r\n\r\n".encode()
                    + body[:40]
                )
            else:  # a full chunk request whose answer is never read
                body = m.id + b"".join(sorted(m.chunk_ids()))
                s.sendall(
                    b"POST /v1/chunks HTTP/1.1\r\nHost: x\r\n"
                    + f"Authorization: Bearer {o.secret}\r\n{HEADER_PROTOCOL}: 1\r\n".encode()
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
        time.sleep(0.2)

        def others() -> None:
            client = o.client(timeout=5)
            for _ in range(3):
                m2 = client.manifest("data.bin")
                assert m2 == m
                got = dict(OriginSource(client, m2).get_many(sorted(m2.chunk_ids())))
                assert set(got) == m.chunk_ids()
                assert client.exists("data.bin")

        err, took = _bounded(others, 30)
        assert err is None, repr(err)
        assert took < 10
        # raw clients too
        status, _, _ = o.request("GET", "/v1/exists", query={"path": "data.bin"})
        assert status == 200
    finally:
        for s in held:
            s.close()


def test_concurrent_clients_each_get_complete_verified_answers(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, _ = served

    def one(_: int) -> int:
        client = o.client()
        m2 = client.manifest("data.bin")
        assert m2 is not None
        return len(dict(OriginSource(client, m2).get_many(sorted(m2.chunk_ids()))))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(one, range(16), timeout=60))
    assert counts == [len(m.chunk_ids())] * 16


# -- block deltas (/v1/deltas) -------------------------------------------------------------
def _delta_body(manifest_id: bytes, wants: list[tuple[bytes, bytes]], block: int = delta.BLOCK_SIZE) -> bytes:
    out = [manifest_id, DELTA_HEAD.pack(block, len(wants))]
    for cid, digests in wants:
        out += [DELTA_ITEM.pack(cid, len(digests) // delta.DIGEST_SIZE), digests]
    return b"".join(out)


def test_delta_request_answers_only_the_blocks_that_differ_from_the_base(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, data = served
    cid, off, n = next(iter_chunk_spans(m.entries[0].chunks))
    old = bytearray(data[off : off + n])
    old[100:200] = b"x" * 100  # the receiver's bytes at that place differ in one block
    status, body, _ = o.request("POST", "/v1/deltas", body=_delta_body(m.id, [(cid, delta.block_digests(bytes(old)))]))
    assert status == 200, body
    ((st, codec, got, raw, payload),) = parse_frames(body)
    assert (st, got) == (STATUS_DELTA, cid)
    plain = decompress(codec, payload, raw)
    assert len(plain) < n // 4  # one block, not the chunk
    assert delta.apply(plain, bytes(old), n) == data[off : off + n]


def test_delta_request_with_an_unrelated_base_answers_the_whole_chunk(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, data = served
    cid, off, n = next(iter_chunk_spans(m.entries[0].chunks))
    status, body, _ = o.request("POST", "/v1/deltas", body=_delta_body(m.id, [(cid, delta.block_digests(os.urandom(n)))]))
    assert status == 200
    ((st, _, got, raw, _),) = parse_frames(body)
    assert (st, got, raw) == (STATUS_OK, cid, n)


@pytest.mark.parametrize("bad", ["truncated", "odd_block", "tiny_block", "count_overruns", "trailing", "digests_overrun"])
def test_malformed_delta_request_is_400(served: tuple[Origin, Manifest, bytes], bad: str) -> None:
    o, m, _ = served
    cid = next(iter(m.chunk_ids()))
    good = _delta_body(m.id, [(cid, bytes(32))])
    body = {
        "truncated": good[: ID_SIZE + 3],
        "odd_block": _delta_body(m.id, [(cid, bytes(32))], block=12345),
        "tiny_block": _delta_body(m.id, [(cid, bytes(32))], block=512),
        "count_overruns": m.id + DELTA_HEAD.pack(8192, 5) + DELTA_ITEM.pack(cid, 0),
        "trailing": good + b"x",
        "digests_overrun": m.id + DELTA_HEAD.pack(8192, 1) + DELTA_ITEM.pack(cid, 1000) + bytes(16),
    }[bad]
    status, answer, _ = o.request("POST", "/v1/deltas", body=body)
    assert status == 400, answer
    assert o.service.chunks_read == 0


def test_delta_request_for_too_many_chunks_is_refused(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, _ = served
    cid = next(iter(m.chunk_ids()))
    status, _, _ = o.request("POST", "/v1/deltas", body=_delta_body(m.id, [(cid, b"")] * (MAX_DELTA_IDS + 1)))
    assert status in (400, 413)
    assert o.service.chunks_read == 0


def test_delta_request_for_an_unknown_manifest_is_410(served: tuple[Origin, Manifest, bytes]) -> None:
    o, m, _ = served
    status, _, _ = o.request("POST", "/v1/deltas", body=_delta_body(bytes(32), [(next(iter(m.chunk_ids())), b"")]))
    assert status == 410
