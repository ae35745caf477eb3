"""TLS between works (SPEC "Several machines"; docs/format.md, "Origin protocol", TLS).

Three layers, all on real sockets on 127.0.0.1: the certificate authority and what it signs;
an origin service in this process with certificates the test chooses (another CA, another
host, a past or future validity window); and app runs with real work processes, where a TCP
relay records every byte between a client and a work's origin, to show that the secret and
the files never cross in clear with TLS, and that they do without it (so the check can fail).
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import random
import ssl
import time
from collections.abc import Iterator
from pathlib import Path as FsPath
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tlskit import Relay, new_ca, origin_context, plain_http_exchange
from trees import listing

from cas.workspace import Workspace
from pathapi import App, Flow, Path, Work
from pathapi.aio import io_loop
from pathapi.errors import OriginTLSError, OriginUnreachableError, TlsError
from pathapi.runtime.runner import AppConfig
from pathapi.wire.client import OriginClient, OriginSource
from pathapi.wire.origin import OriginService
from pathapi.wire.protocol import HEADER_PROTOCOL, PROTOCOL_VERSION
from pathapi.wire.tls import VALIDITY, CertificateAuthority, OriginCredentials, TlsConfig, tls_enabled

pytestmark = pytest.mark.usefixtures("close_client_sessions")

SECRET = "s3cr3t-" + "x" * 40
MiB = 1 << 20


# ======================================================================================
# The rule, the CA and what it signs
# ======================================================================================
def test_tls_is_on_by_default_exactly_when_the_cluster_is_not_local() -> None:
    assert tls_enabled(None, cluster_is_local=True) is False
    assert tls_enabled(None, cluster_is_local=False) is True
    for local in (True, False):
        assert tls_enabled(True, cluster_is_local=local) is True
        assert tls_enabled(False, cluster_is_local=local) is False


def test_the_ca_key_never_leaves_the_flow_a_pickled_config_holds_only_the_certificate() -> None:
    cfg = TlsConfig.new("run")
    assert cfg._ca is not None
    key = cfg._ca._key
    secret_forms = [key.private_numbers().private_value.to_bytes(32, "big"),
                    key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())]
    config = AppConfig("/app", None, "secret", 10.0, tls=cfg)
    data = pickle.dumps(config)  # what a work's process (or a Ray actor) receives
    assert not any(form in data for form in secret_forms)
    back = pickle.loads(data)
    assert back.tls == cfg and back.tls.ca_pem == cfg.ca_pem
    assert cfg.can_issue and not back.tls.can_issue
    with pytest.raises(RuntimeError, match="only the flow"):
        back.tls.issue("root.w", OriginCredentials("root.w", ["127.0.0.1"]).csr_pem)
    with pytest.raises(TypeError):
        pickle.dumps(cfg._ca)
    with pytest.raises(TypeError):
        pickle.dumps(OriginCredentials("root.w", ["127.0.0.1"]))


def test_an_origin_certificate_is_for_its_host_serves_tls_servers_only_and_lasts_the_run() -> None:
    ca = CertificateAuthority("run")
    creds = OriginCredentials("root.a", ["127.0.0.1", "node-1.example"])
    cert = x509.load_pem_x509_certificate(ca.issue("root.a", creds.csr_pem))
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["node-1.example"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "root.a"
    now = dt.datetime.now(dt.timezone.utc)
    assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc <= now + VALIDITY
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert cert.public_key() == x509.load_pem_x509_csr(creds.csr_pem).public_key()


def _csr(key: Any, sans: list[x509.GeneralName] | None) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")]))
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_the_ca_refuses_requests_it_must_not_sign() -> None:
    import ipaddress

    ca = CertificateAuthority("run")
    p256 = ec.generate_private_key(ec.SECP256R1())
    refused = {
        "unspecified address": _csr(p256, [x509.IPAddress(ipaddress.ip_address("0.0.0.0"))]),
        "wildcard": _csr(p256, [x509.DNSName("*.example")]),
        "no host": _csr(p256, None),
        "another curve": _csr(ec.generate_private_key(ec.SECP384R1()), [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        "garbage": b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    }
    for what, csr in refused.items():
        with pytest.raises(TlsError):
            ca.issue("root.w", csr)
            pytest.fail(f"signed a request with {what}")
    with pytest.raises(TlsError):
        OriginCredentials("root.w", ["0.0.0.0"])
    with pytest.raises(TlsError, match="another key"):
        OriginCredentials("root.w", ["127.0.0.1"]).server_context(
            ca.issue("root.w", OriginCredentials("root.w", ["127.0.0.1"]).csr_pem))


# ======================================================================================
# An origin service on a real socket, with certificates of the test's choosing
# ======================================================================================
class Served:
    """An origin service in this process (its own event-loop thread) serving ``root``."""

    def __init__(self, tmp: FsPath, tls: ssl.SSLContext | None, **options: Any) -> None:
        self.root = tmp / "origin"
        self.root.mkdir(exist_ok=True)
        self.ws = Workspace(tmp / f"ostate-{random.randrange(1 << 30)}")
        self.service = OriginService("root.origin", str(self.root), SECRET, self.ws, tls=tls, **options)
        self.url = io_loop().run(self.service.start(), timeout=30)
        self.port = int(self.url.rsplit(":", 1)[1])

    def close(self) -> None:
        io_loop().run(self.service.stop(), timeout=30)
        self.ws.close()


@pytest.fixture
def tree(tmp_path: FsPath) -> FsPath:
    root = tmp_path / "origin" / "data"
    (root / "sub").mkdir(parents=True)
    (root / "big.bin").write_bytes(random.Random(1).randbytes(3 * MiB))
    (root / "sub" / "small.txt").write_text("small")
    return root


@pytest.fixture
def ca() -> tuple[CertificateAuthority, ssl.SSLContext]:
    return new_ca("this run")


@pytest.fixture
def tls_origin(tmp_path: FsPath, tree: FsPath, ca: tuple[CertificateAuthority, ssl.SSLContext]) -> Iterator[Served]:
    s = Served(tmp_path, origin_context(ca[0]))
    yield s
    s.close()


def _get(client: OriginClient, dest: FsPath, state: FsPath) -> Any:
    m = client.manifest("data")
    assert m is not None
    with Workspace(state) as ws:
        return ws.sync(m, dest, remote=OriginSource(client, m))


def test_a_tls_origin_serves_a_client_that_pins_its_ca_over_tls_1_3(tmp_path: FsPath, tree: FsPath, tls_origin: Served,
                                                                      ca: tuple[CertificateAuthority, ssl.SSLContext]) -> None:
    assert tls_origin.url.startswith("https://127.0.0.1:")
    client = OriginClient("root.origin", tls_origin.url, SECRET, 10, ca[1])
    assert client.exists("data") and not client.exists("nothing")
    _get(client, tmp_path / "consumer" / "data", tmp_path / "cstate")
    assert listing(tmp_path / "consumer" / "data") == listing(tree)
    import socket

    with socket.create_connection(("127.0.0.1", tls_origin.port)) as raw, \
            ca[1].wrap_socket(raw, server_hostname="127.0.0.1") as s:
        assert s.version() == "TLSv1.3"


def test_a_tls_origin_answers_plain_http_with_nothing_and_serves_nothing(tls_origin: Served,
                                                                       ca: tuple[CertificateAuthority, ssl.SSLContext]) -> None:
    request = (f"GET /v1/exists?path=data HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {SECRET}\r\n"
               f"{HEADER_PROTOCOL}: {PROTOCOL_VERSION}\r\n\r\n").encode()
    answer = plain_http_exchange("127.0.0.1", tls_origin.port, request)
    assert b"HTTP" not in answer and b"exists" not in answer
    assert answer == b"" or answer[0] == 0x15  # nothing, or a TLS alert record
    # aiohttp speaking plain HTTP to it (a client of an app run without TLS) gets nowhere
    with pytest.raises(OriginUnreachableError):
        OriginClient("root.origin", tls_origin.url.replace("https://", "http://"), SECRET, 5).exists("data")
    assert tls_origin.service.slots.trusted == 0  # no request was ever served


def test_connections_that_fail_the_handshake_leave_nothing_held(tmp_path: FsPath, ca: tuple[CertificateAuthority, ssl.SSLContext]) -> None:
    s = Served(tmp_path, origin_context(ca[0]), header_timeout=0.3)
    try:
        for _ in range(20):
            plain_http_exchange("127.0.0.1", s.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        deadline = time.monotonic() + 10
        while s.service.slots.known and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.service.slots.known == 0 and s.service.slots.pending == 0
        assert OriginClient("root.origin", s.url, SECRET, 10, ca[1]).exists("nothing") is False
    finally:
        s.close()


def test_a_tls_client_refuses_an_http_url_before_sending_anything(ca: tuple[CertificateAuthority, ssl.SSLContext]) -> None:
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    try:
        port = listener.getsockname()[1]
        with pytest.raises(OriginTLSError, match="not https"):
            OriginClient("root.origin", f"http://127.0.0.1:{port}", SECRET, 5, ca[1]).exists("data")
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody connected
    finally:
        listener.close()


def test_a_tls_client_refuses_a_plain_http_origin(tmp_path: FsPath, tree: FsPath, ca: tuple[CertificateAuthority, ssl.SSLContext]) -> None:
    s = Served(tmp_path, None)
    try:
        relay = Relay(("127.0.0.1", s.port))
        try:
            with pytest.raises(OriginTLSError):
                OriginClient("root.origin", relay.url("https"), SECRET, 5, ca[1]).exists("data")
            assert relay.connections == 1 and SECRET.encode() not in relay.wire
        finally:
            relay.close()
    finally:
        s.close()


def _window(kind: str) -> dict[str, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    if kind == "expired":
        return {"not_before": now - dt.timedelta(days=10), "not_after": now - dt.timedelta(days=1)}
    return {"not_before": now + dt.timedelta(days=1), "not_after": now + dt.timedelta(days=10)}


@pytest.mark.parametrize("case", ["another_ca", "another_host", "expired", "not_yet_valid"])
def test_a_client_refuses_an_origin_whose_certificate_does_not_verify(tmp_path: FsPath, tree: FsPath, case: str,
                                                                      ca: tuple[CertificateAuthority, ssl.SSLContext]) -> None:
    """The origin is real and serves the secret holder's files; only its certificate is wrong.
    The client stops at the handshake: no request (so no secret) reaches the origin."""
    if case == "another_ca":
        server = origin_context(new_ca("another run")[0])
    elif case == "another_host":
        server = origin_context(ca[0], ["127.0.0.2"])
    else:
        server = origin_context(ca[0], **_window(case))
    s = Served(tmp_path, server)
    try:
        with pytest.raises(OriginTLSError) as got:
            OriginClient("root.origin", s.url, SECRET, 5, ca[1]).exists("data")
        why = {"another_ca": "unable to get local issuer", "another_host": "mismatch", "expired": "expired",
               "not_yet_valid": "not yet valid"}[case]
        assert why in str(got.value) and "root.origin" in str(got.value)
        assert s.service.slots.trusted == 0
        # and a get fails the same way, without falling back to anything
        with pytest.raises(OriginTLSError):
            _get(OriginClient("root.origin", s.url, SECRET, 5, ca[1]), tmp_path / "c" / "data", tmp_path / "cstate")
        assert not (tmp_path / "c").exists()
    finally:
        s.close()


# ======================================================================================
# App runs with real work processes
# ======================================================================================
def tree_model(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {"model.bin": rng.randbytes(4 * MiB), "config.json": b'{"lr": 0.1}'}
    files.update({f"shards/s{i:02d}.bin": rng.randbytes(rng.randrange(1, 200_000)) for i in range(12)})
    return files


class Origin(Work):
    """Owns ``lit://ckpt``: a checkpoint folder with an executable and a link."""

    def __init__(self) -> None:
        super().__init__()
        self.ckpt = "lit://ckpt"
        self.listing: dict[str, Any] = {}

    def run(self, action: str = "write") -> None:
        if action == "write":
            for rel, data in tree_model(3).items():
                os.makedirs(os.path.dirname(os.path.join(self.ckpt, rel)) or ".", exist_ok=True)
                FsPath(self.ckpt, rel).write_bytes(data)
            run_sh = FsPath(self.ckpt, "run.sh")
            run_sh.write_text("#!/bin/sh\necho hi\n")
            run_sh.chmod(0o755)
            os.symlink("model.bin", os.path.join(self.ckpt, "latest"))
        else:  # edit 64 KiB in the middle of the model: a changed chunk, sent as a block delta
            with open(os.path.join(self.ckpt, "model.bin"), "r+b") as f:
                f.seek(2 * MiB)
                f.write(random.Random(9).randbytes(64 << 10))
        self.listing = listing(self.ckpt)


def _record(p: Path) -> dict[str, Any]:
    t = p.last_transfer
    assert t is not None
    return {k: getattr(t, k) for k in ("files", "bytes_total", "chunks_transferred", "bytes_transferred", "chunks_reused", "source")}


class Consumer(Work):
    def __init__(self) -> None:
        super().__init__()
        self.log: dict[str, Any] = {}

    def run(self, ckpt: Path, step: str) -> None:
        # ``ckpt`` was fetched before run started (the automatic get)
        self.log[step] = {"listing": listing(ckpt), "transfer": _record(ckpt)}
        if step == "first":
            self.log["exists_remote"] = [ckpt.exists_remote(), (ckpt / "nothing").exists_remote()]
            ckpt.get(overwrite=True)
            self.log["unchanged"] = _record(ckpt)
            model = ckpt / "model.bin"  # a derived path, alone
            model.get(overwrite=True)
            self.log["derived"] = _record(model)


class TlsFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.origin = Origin()
        self.consumer = Consumer()
        self.seen: dict[str, Any] = {}

    def run(self) -> None:
        app = self._app  # set by the test: the flow looks at its works' origins from outside
        self.origin.run("write")
        self.seen["first_listing"] = self.origin.listing
        self.consumer.run(self.origin.ckpt, "first")
        url = app.handle(self.origin).url
        self.seen["url"] = url
        host, port = url.split("://")[1].rsplit(":", 1)
        request = (f"GET /v1/manifest?path=ckpt HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {app.secret}\r\n"
                   f"{HEADER_PROTOCOL}: {PROTOCOL_VERSION}\r\nConnection: close\r\n\r\n").encode()
        self.seen["plain_answer"] = plain_http_exchange(host, int(port), request)
        # Through a relay that records every byte: the manifest, then all the chunks, as a consumer asks.
        relay = Relay((host, int(port)))
        try:
            scheme = url.split("://")[0]
            client = OriginClient(self.origin.name, relay.url(scheme), app.secret, 30, app.client_ssl_context())
            m = client.manifest("ckpt")
            assert m is not None
            got = dict(OriginSource(client, m).get_many(sorted(m.chunk_ids())))
            self.seen["relayed_chunks"] = (len(got), len(m.chunk_ids()))
            self.seen["wire"] = relay.wire
        finally:
            relay.close()
        self.origin.run("edit")
        self.seen["edited_listing"] = self.origin.listing
        self.consumer.run(self.origin.ckpt, "after_edit")


def run_tls_flow(root: FsPath, tls: bool | None) -> tuple[TlsFlow, App]:
    flow = TlsFlow()
    app = App(flow, root=root, tls=tls)
    object.__setattr__(flow, "_app", app)
    app.run()
    return flow, app


@pytest.fixture(scope="module")
def tls_app(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsFlow, App]:
    # Every transfer of this run crosses TLS (on one host the same-host fast path would
    # carry the chunks past it: wire/samehost.py).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATHAPI_SAME_HOST", "0")
        return run_tls_flow(tmp_path_factory.mktemp("tls") / "app", tls=True)


@pytest.fixture(scope="module")
def default_app(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsFlow, App]:
    return run_tls_flow(tmp_path_factory.mktemp("default") / "app", tls=None)


def test_an_app_run_with_tls_moves_a_tree_between_two_works_exactly(tls_app: tuple[TlsFlow, App]) -> None:
    flow, _ = tls_app
    first = flow.consumer.log["first"]
    assert first["listing"] == flow.seen["first_listing"]
    assert first["listing"]["run.sh"][1] is True and first["listing"]["latest"] == ("link", "model.bin")
    t = first["transfer"]
    assert t["source"] == "origin" and t["chunks_reused"] == 0 and t["files"] == len(tree_model(3)) + 1
    assert flow.consumer.log["exists_remote"] == [True, False]
    assert flow.consumer.log["unchanged"]["bytes_transferred"] == 0
    assert flow.consumer.log["derived"]["files"] == 1 and flow.consumer.log["derived"]["bytes_transferred"] == 0


def test_with_tls_a_changed_file_moves_as_a_block_delta(tls_app: tuple[TlsFlow, App]) -> None:
    flow, _ = tls_app
    after = flow.consumer.log["after_edit"]
    assert after["listing"] == flow.seen["edited_listing"] != flow.seen["first_listing"]
    t = after["transfer"]
    assert t["source"] == "origin" and 1 <= t["chunks_transferred"] <= 3
    assert 0 < t["bytes_transferred"] < 200 << 10  # the edited blocks, not whole chunks


def test_with_tls_the_registry_hands_out_https_urls(tls_app: tuple[TlsFlow, App]) -> None:
    flow, app = tls_app
    assert flow.seen["url"].startswith("https://127.0.0.1:")
    assert all(h.url is not None and h.url.startswith("https://") for h in app.handles.values())


def test_with_tls_a_works_origin_refuses_plain_http(tls_app: tuple[TlsFlow, App]) -> None:
    answer = tls_app[0].seen["plain_answer"]
    assert b"HTTP" not in answer and (answer == b"" or answer[0] == 0x15)


def test_with_tls_neither_the_secret_nor_the_files_cross_the_wire_in_clear(tls_app: tuple[TlsFlow, App]) -> None:
    flow, app = tls_app
    wire = flow.seen["wire"]
    got, total = flow.seen["relayed_chunks"]
    assert got == total > 10  # the relay carried the whole tree
    assert len(wire) > 4 * MiB
    assert app.secret.encode() not in wire
    assert b"Bearer" not in wire and b"HTTP/1.1" not in wire
    model = tree_model(3)["model.bin"]
    assert not any(model[i : i + 64] in wire for i in range(0, len(model), len(model) // 16))


def test_without_tls_the_same_capture_shows_the_secret_so_the_check_can_fail(default_app: tuple[TlsFlow, App]) -> None:
    """``tls=None`` with local processes: plain HTTP on loopback (the default), and the
    relay then sees the secret and the bytes of the files."""
    flow, app = default_app
    assert flow.seen["url"].startswith("http://127.0.0.1:")
    assert app.client_ssl_context() is None
    wire = flow.seen["wire"]
    assert app.secret.encode() in wire
    assert tree_model(3)["model.bin"][:64] in wire
    assert flow.seen["plain_answer"].startswith(b"HTTP/1.1 200")
    assert flow.consumer.log["first"]["listing"] == flow.seen["first_listing"]


class Idle(Work):
    def run(self) -> None:
        pass


class OneWork(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.only = Idle()

    def run(self) -> None:
        self.only.run()


def test_with_tls_a_work_whose_origin_cannot_be_certified_fails_to_start_naming_it(tmp_path: FsPath) -> None:
    """0.0.0.0 is where a socket binds, never what a client connects to: no certificate can
    name it, so the work's start fails at once with the reason (instead of serving https
    that no consumer could verify)."""
    from pathapi import WorkError

    with pytest.raises(WorkError) as got:
        App(OneWork(), root=tmp_path / "app", host="0.0.0.0", tls=True, start_timeout=60).run()
    assert got.value.work_name == "root.only"
    assert "unspecified address" in str(got.value)


# -- what hostile or many clients can hold, with TLS ---------------------------------------
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_with_tls_idle_connections_that_never_handshake_hold_no_more_than_the_slots(
        tmp_path: FsPath, tree: FsPath, ca: tuple[CertificateAuthority, ssl.SSLContext]) -> None:
    """A flood of TCP connections that never start TLS: each new one evicts the oldest
    pending one, whose descriptor is freed at once (not when its handshake would time out),
    so the origin holds about ``max_connections`` sockets, and a consumer still gets in."""
    import socket

    s = Served(tmp_path, origin_context(ca[0]), max_connections=16, header_timeout=30)
    idle: list[socket.socket] = []
    try:
        before = _open_fds()
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", s.port)))
        time.sleep(0.5)
        server_side = _open_fds() - before - len(idle)
        assert server_side <= 16 + 8, server_side
        assert OriginClient("root.origin", s.url, SECRET, 10, ca[1]).exists("data") is True
    finally:
        for c in idle:
            c.close()
        s.close()


def test_a_tls_origin_whose_slots_are_all_trusted_answers_busy_over_tls(
        tmp_path: FsPath, tree: FsPath, ca: tuple[CertificateAuthority, ssl.SSLContext]) -> None:
    """The 503 of a full origin goes inside TLS: the client sees "busy" (and retries), not a
    TLS failure."""
    import socket

    s = Served(tmp_path, origin_context(ca[0]), max_connections=2, reserved_connections=1)
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(2):  # two connections that presented the secret and stay open
            c = ca[1].wrap_socket(socket.create_connection(("127.0.0.1", s.port)), server_hostname="127.0.0.1")
            c.sendall(f"GET /v1/exists?path=data HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\r\n"
                      f"{HEADER_PROTOCOL}: {PROTOCOL_VERSION}\r\n\r\n".encode())
            assert c.recv(100).startswith(b"HTTP/1.1 200")
            held.append(c)
        with pytest.raises(OriginUnreachableError, match="busy"):
            OriginClient("root.origin", s.url, SECRET, 1.5, ca[1]).exists("data")
        assert s.service.slots.refused >= 1
    finally:
        for c in held:
            c.close()
        s.close()
