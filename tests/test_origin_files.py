"""What a consumer gets when the origin's files misbehave, or the origin itself is slow or
silent: a clear error (type, the work, the path), nothing served from outside the origin's
root, the consumer's files unchanged, and never a hang.

Real processes: each case starts an origin service process (``_origin_child.py``) on a
fresh folder and runs ``Path.get`` in a consumer process (``_get_child.py``) that holds an
older copy of the folder. The faults are real:

- *unreadable file*: mode 000. Tests run as root here (and in CI), where permission bits do
  not bind: the origin process then drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH with
  capset(2) at start (it stays root otherwise), so the kernel refuses its reads as it would
  refuse any service account's. The test checks the refusal really came from the kernel
  ("Permission denied" in the error), so it cannot pass vacuously;
- *deleted*, *made unreadable*, *replaced by a symlink out of the root* (a file, or a folder
  on the way to it) between the origin's snapshot and its serving of the chunks: done by the
  origin process itself just before its first chunk read, so the window is hit every time.
  The outside copies hold the *same* bytes as the files they replace, so only the origin's
  refusal to follow links, not a hash mismatch, keeps them from being served;
- *slow*: every chunk batch (and the manifest) answered after a delay, below or above the
  consumer's timeout; *silent*: the origin SIGSTOPped in the middle of a transfer;
  *trickling*: a TCP relay in front of the origin passes its answers on one byte at a time,
  so that no single read ever waits as long as the timeout.

Run: ``/work/venv/bin/python -m pytest tests/test_origin_files.py -q`` (``-s`` prints the
fault summary).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _faultkit import (
    CONSUMER,
    SOURCE,
    GetResult,
    MiB,
    OriginProc,
    Pool,
    Tally,
    consumer_job,
    run_get,
    state_leftovers,
)
from trees import File, Model, listing, write_tree

TALLY = Tally("test_origin_files")


@pytest.fixture(autouse=True, scope="module")
def over_the_network() -> Iterator[None]:
    """The faults are injected where the HTTP origin reads chunks and answers: keep every
    transfer on the socket. The same-host path's own faults (a link swapped in, a file
    changed after its manifest, a wrong peer) are in test_samehost.py."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATHAPI_SAME_HOST", "0")
        yield
OUTSIDE_SECRET = b"OUTSIDE-THE-ROOT-" * 4096


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    TALLY.report()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    p = Pool(tmp_path_factory.mktemp("children"), size=1)
    yield p
    p.close()


def _files(seed: int) -> Model:
    import random

    rng = random.Random(seed)
    return {
        "ckpt/a.bin": File(rng.randbytes(3 * MiB)),
        "ckpt/sub/b.bin": File(rng.randbytes(MiB)),
        "ckpt/sub/c.txt": File(b"c" * (seed + 10)),
        "ckpt/run.sh": File(b"#!/bin/sh\n", executable=True),
    }


@dataclass
class Site:
    base: Path
    root: Path  # the origin work's folder
    outside: Path  # a folder next to it, holding copies of its files and a secret
    consumer: Path  # the consumer's base folder (works/<name>, state/<name>)
    pool: Pool
    origins: list[OriginProc]

    @property
    def dest(self) -> Path:
        return self.consumer / "works" / CONSUMER / "ckpt"

    @property
    def state(self) -> Path:
        return self.consumer / "state" / CONSUMER

    def origin(self, **options: Any) -> OriginProc:
        o = OriginProc(self.base / f"origin{len(self.origins)}", self.root, **options)
        self.origins.append(o)
        return o

    def get(self, origin: OriginProc, rel: str = "ckpt", timeout: float = 10.0) -> GetResult:
        r = run_get(self.pool, consumer_job(self.consumer, origin.url, origin.secret, rel, timeout=timeout),
                    timeout=timeout * 4 + 60)
        assert r.code == 0 and len(r.records) + len(r.errors) == 1, r.stderr[-3000:]
        return r


@pytest.fixture
def site(tmp_path: Path, pool: Pool) -> Iterator[Site]:
    root = tmp_path / "origin" / "works" / SOURCE
    write_tree(root, _files(2))
    outside = tmp_path / "outside"
    write_tree(outside, _files(2))  # identical copies: a hash check alone would accept them
    (outside / "secret.bin").write_bytes(OUTSIDE_SECRET)
    consumer = tmp_path / "consumer"
    write_tree(consumer / "works" / CONSUMER, _files(1))  # the consumer holds an older copy
    s = Site(tmp_path, root, outside, consumer, pool, [])
    try:
        yield s
    finally:
        for o in s.origins:
            o.close()




def assert_unchanged(site: Site, before: dict[str, Any] | None) -> None:
    assert listing(site.dest) == before, "the consumer's files changed although the get failed"
    assert not (site.state / "txn").exists()


def assert_nothing_from_outside(site: Site) -> None:
    for dirpath, _, filenames in os.walk(site.consumer):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert OUTSIDE_SECRET[:64] not in f.read(), f"outside bytes reached {dirpath}/{name}"


def the_error(r: GetResult) -> dict[str, Any]:
    assert r.errors, f"the get succeeded: {r.records}"
    return r.errors[0]


# -- unreadable files ----------------------------------------------------------------------
def _unreadable_origin(site: Site, **options: Any) -> OriginProc:
    o = site.origin(drop_dac=True, **options)
    o.url  # noqa: B018 - started
    assert o.dac_dropped or os.geteuid() != 0, "could not make permission bits bind the origin process"
    return o


@pytest.mark.parametrize("rel", ["ckpt", "ckpt/sub/b.bin"])
def test_an_unreadable_file_fails_the_get_naming_it_and_changes_nothing(site: Site, rel: str) -> None:
    os.chmod(site.root / "ckpt" / "sub" / "b.bin", 0)
    origin = _unreadable_origin(site)
    before = listing(site.dest)

    def check() -> None:
        err = the_error(site.get(origin, rel))
        assert "OSError" in err["mro"] and err["work_name"] == SOURCE, err
        message = err["message"]
        assert repr(SOURCE) in message and "sub/b.bin" in message and "Permission denied" in message, message
        assert_unchanged(site, before)

    TALLY.check("unreadable origin file", check)


def test_a_file_made_unreadable_after_the_snapshot_fails_the_get_and_changes_nothing(site: Site) -> None:
    origin = _unreadable_origin(site, on_first_read={"action": "chmod_000", "path": "ckpt/a.bin"})
    before = listing(site.dest)

    def check() -> None:
        err = the_error(site.get(origin))
        assert err["work_name"] == SOURCE and "a.bin" in err["message"] and "Permission denied" in err["message"], err
        assert_unchanged(site, before)

    TALLY.check("unreadable origin file", check)


# -- deleted between snapshot and serve ---------------------------------------------------
def test_a_file_deleted_after_the_snapshot_gives_the_folder_as_it_now_is(site: Site) -> None:
    origin = site.origin(on_first_read={"action": "delete", "path": "ckpt/a.bin"})

    def check() -> None:
        r = site.get(origin)
        assert r.records, r.errors
        now = listing(site.dest)
        assert now == listing(site.root / "ckpt") and "a.bin" not in now  # a state it really had
        assert state_leftovers(site.state) == []

    TALLY.check("origin file deleted between snapshot and serve", check)


def test_a_file_path_deleted_after_the_snapshot_raises_file_not_found(site: Site) -> None:
    origin = site.origin(on_first_read={"action": "delete", "path": "ckpt/a.bin"})
    before = listing(site.dest)

    def check() -> None:
        err = the_error(site.get(origin, "ckpt/a.bin"))
        assert err["type"] == "FileNotFoundError" or "FileNotFoundError" in err["mro"], err
        assert err["errno"] == errno.ENOENT and "'ckpt/a.bin'" in err["message"] and SOURCE in err["message"], err
        assert_unchanged(site, before)

    TALLY.check("origin file deleted between snapshot and serve", check)


# -- symlinks out of the root ---------------------------------------------------------------
def _refused(site: Site, r: GetResult, before: dict[str, Any] | None) -> None:
    err = the_error(r)
    assert "OSError" in err["mro"] and err["work_name"] == SOURCE, err
    assert "403" in err["message"] and ("outside" in err["message"] or "leaves" in err["message"]), err["message"]
    assert_unchanged(site, before)
    assert_nothing_from_outside(site)


def test_a_file_replaced_by_a_link_out_of_the_root_is_refused(site: Site) -> None:
    target = site.root / "ckpt" / "a.bin"
    target.unlink()
    target.symlink_to(site.outside / "secret.bin")
    origin = site.origin()
    before = listing(site.dest)
    TALLY.check("origin path is a symlink out of its root", lambda: _refused(site, site.get(origin), before))


def test_the_path_itself_replaced_by_a_link_out_of_the_root_is_refused(site: Site) -> None:
    (site.root / "ckpt").rename(site.root / "ckpt.old")
    (site.root / "ckpt").symlink_to(site.outside / "ckpt")
    origin = site.origin()
    before = listing(site.dest)
    TALLY.check("origin path is a symlink out of its root", lambda: _refused(site, site.get(origin), before))


@pytest.mark.parametrize("what", ["file", "folder on the way"])
def test_a_link_out_of_the_root_swapped_in_after_the_snapshot_is_never_followed(site: Site, what: str) -> None:
    """The outside copy holds the very bytes the manifest names: were the origin to follow
    the link, every chunk would verify and the get would succeed with bytes read from
    outside the root. It must refuse instead."""
    if what == "file":
        change = {"action": "link_outside", "path": "ckpt/sub/b.bin", "target": str(site.outside / "ckpt/sub/b.bin")}
    else:
        change = {"action": "swap_dir_outside", "path": "ckpt/sub", "target": str(site.outside / "ckpt/sub")}
    origin = site.origin(on_first_read=change)
    before = listing(site.dest)
    TALLY.check("origin path replaced by a symlink out of its root between snapshot and serve",
            lambda: _refused(site, site.get(origin), before))


# -- slow, silent and trickling origins ------------------------------------------------------
def test_an_origin_slower_than_the_timeout_in_total_but_not_per_answer_still_serves(site: Site) -> None:
    """Every answer comes 0.6 s late with a 1.5 s timeout: slow is not dead."""
    origin = site.origin(delay=0.6, manifest_delay=0.6)

    def check() -> None:
        r = site.get(origin, timeout=1.5)
        assert r.records, r.errors
        assert listing(site.dest) == listing(site.root / "ckpt")

    TALLY.check("slow origin (delay below the timeout)", check)


@pytest.mark.parametrize("where", ["manifest", "chunks"])
def test_an_origin_slower_than_the_timeout_fails_the_get_within_it(site: Site, where: str) -> None:
    timeout = 1.0
    origin = site.origin(**({"manifest_delay": 60} if where == "manifest" else {"delay": 60}))
    before = listing(site.dest)

    def check() -> None:
        err = the_error(site.get(origin, timeout=timeout))
        assert err["type"] == "OriginUnreachableError" and "ConnectionError" in err["mro"], err
        assert err["work_name"] == SOURCE and f"did not answer within {timeout:g} s" in err["message"], err
        assert f"The files at {site.dest} are unchanged" in err["message"], err
        assert err["seconds"] < timeout * 3 + 3, f"gave up only after {err['seconds']:.1f} s"
        assert_unchanged(site, before)

    TALLY.check("slow origin (delay above the timeout)", check)


def test_an_origin_that_stops_answering_mid_transfer_fails_the_get_within_the_timeout(site: Site) -> None:
    timeout = 1.5
    write_tree(site.root, {"ckpt/big.bin": File(os.urandom(24 * MiB))})  # several chunk batches
    origin = site.origin(delay=0.3)
    before = listing(site.dest)
    child = site.pool.take()
    try:
        child.go(consumer_job(site.consumer, origin.url, origin.secret, "ckpt", timeout=timeout))
        assert child.wait_for(lambda line: line.startswith("chunk "), 60), "no chunk arrived"
        origin.signal(signal.SIGSTOP)  # the kernel still holds its sockets open; nothing answers
        r = child.finish(timeout * 4 + 60)
    finally:
        child.close()
        origin.signal(signal.SIGCONT)

    def check() -> None:
        err = the_error(r)
        assert err["type"] == "OriginUnreachableError" and err["work_name"] == SOURCE, err
        assert err["message"].startswith(f"lost origin work {SOURCE!r}") and f"within {timeout:g} s" in err["message"], err
        assert err["seconds"] < timeout * 3 + 5, f"gave up only after {err['seconds']:.1f} s"
        assert_unchanged(site, before)

    TALLY.check("origin stops answering mid-transfer (SIGSTOP)", check)


class Trickle:
    """A TCP relay to ``upstream`` that passes the first ``free`` bytes of each connection's
    answers at once and then one byte every ``gap`` seconds: every read gets a byte well
    within any timeout, yet an 8 MiB answer would take weeks. Stops by itself after
    ``lifetime`` seconds or when closed."""

    def __init__(self, upstream: str, free: int = 64 * 1024, gap: float = 0.2, lifetime: float = 120.0) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.free, self.gap = free, gap
        self.deadline = time.monotonic() + lifetime
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = threading.Event()
        self.dripped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _alive(self) -> bool:
        return not self.closed.is_set() and time.monotonic() < self.deadline

    def _accept(self) -> None:
        while self._alive():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(conn, up, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, conn, self.free), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, free: int | None) -> None:
        src.settimeout(0.2)
        try:
            while self._alive():
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                if free is None or free >= len(data):
                    free = None if free is None else free - len(data)
                    dst.sendall(data)
                    continue
                dst.sendall(data[:free])
                for i in range(free, len(data)):
                    if not self._alive():
                        return
                    time.sleep(self.gap)
                    dst.sendall(data[i : i + 1])
                    self.dripped += 1
                free = 0
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


def test_an_origin_that_trickles_its_answer_fails_the_get_within_the_timeout(site: Site) -> None:
    timeout = 1.0
    origin = site.origin()
    relay = Trickle(origin.url)
    before = listing(site.dest)
    try:
        r = run_get(site.pool, consumer_job(site.consumer, relay.url, origin.secret, "ckpt", timeout=timeout),
                    timeout=300)
    finally:
        relay.close()

    def check() -> None:
        assert relay.dripped >= 3, "the relay never trickled: the case did not happen"
        err = the_error(r)
        assert err["type"] == "OriginUnreachableError" and err["work_name"] == SOURCE, err
        assert f"{timeout:g} s" in err["message"], err
        assert err["seconds"] < timeout * 3 + 5, f"gave up only after {err['seconds']:.1f} s"
        assert_unchanged(site, before)

    TALLY.check("origin trickles its answer", check)
