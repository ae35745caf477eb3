"""SPEC "What bad input and faults get", for transfers between real work processes.

Each test runs a real App (spawned work processes, real origin services, the default local
artifact store under the app root) and injects one fault from the flow or from inside the
origin's own process:

- the origin work is SIGKILLed while a consumer's get of a large file is in flight;
- the origin has stopped (persisted) or died, and the get is served from the artifacts;
- the origin is unreachable (SIGSTOPped: it accepts connections but never answers, or
  SIGKILLed: the port is closed) and never persisted the path;
- a chunk in the artifact store's pack files has a flipped byte;
- the file is rewritten at the origin between its manifest and its chunks.

Faults inside the origin are injected by wrapping ``OriginService._read_frames`` (the
function that reads chunks from the served files) in the origin's process: a delay makes
"mid-transfer" a wide, reliable window; a rewrite makes "changed after the manifest" happen
exactly when the chunks are read. The flow records what happened; tests assert afterwards.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path as FsPath
from typing import Any

import blake3
import pytest
from trees import Listing, listing, sha

from cas.store.local import INDEX, RECORD, LocalChunkStore
from pathapi import App, Flow, Path, Work, WorkError
from pathapi.artifacts import ArtifactStore

MiB = 1 << 20
SOURCE = "root.source"


@pytest.fixture(autouse=True, scope="module")
def over_the_network() -> Iterator[None]:
    """These faults are injected into the HTTP origin (see above): keep every transfer on the
    socket. The same-host path has its own faults in test_samehost.py."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATHAPI_SAME_HOST", "0")
        yield
CONSUMER = "root.consumer"


# -- helpers (also used inside the work processes) -------------------------------------
def version_bytes(version: int, size: int) -> bytes:
    return random.Random(version).randbytes(size)


def one_file(digest: str) -> Listing:
    """The listing of a root that is one (non-executable) file with that digest."""
    return {"": ("file", False, digest)}


def _wrap_read_frames(hook: Any) -> None:
    """In an origin's process: run ``hook(service, served)`` before every chunk read batch."""
    from pathapi.wire.origin import OriginService

    original = getattr(OriginService._read_frames, "_original", OriginService._read_frames)

    def wrapped(self: Any, served: Any, ids: list[bytes], *rest: Any) -> bytes:
        hook(self, served)
        return original(self, served, ids, *rest)

    wrapped._original = original  # type: ignore[attr-defined]
    OriginService._read_frames = wrapped  # type: ignore[method-assign]


def slow_origin(delay: float) -> None:
    _wrap_read_frames(lambda service, served: time.sleep(delay))


def write_version(path: str, version: int, size: int, how: str) -> None:
    data = version_bytes(version, size)
    if how == "in_place" and os.path.exists(path):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
    else:  # write aside, rename over
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


#: How many manifests ``get`` asked for (one per attempt) since a consumer's last report;
#: counted in work processes only, the automatic get before ``run`` included.
LOCATE_CALLS = [0]


def _count_locates() -> None:
    import multiprocessing

    import pathapi.transfer as transfer

    if not multiprocessing.current_process().name.startswith("pathapi-work:"):
        return
    original = transfer._locate

    def counting(*a: Any) -> Any:
        LOCATE_CALLS[0] += 1
        return original(*a)

    transfer._locate = counting


_count_locates()


# -- works ----------------------------------------------------------------------------
class Source(Work):
    """Owns ``lit://data.bin`` (and ``lit://tree``)."""

    def __init__(self, parallel: bool = False) -> None:
        super().__init__(parallel=parallel)
        self.data = "lit://data.bin"
        self.tree = "lit://tree"
        self.pid = 0
        self.digest = ""

    def run(self, action: str, **kw: Any) -> None:
        self.pid = os.getpid()
        if action == "write":
            write_version(os.fspath(self.data), kw["version"], kw["size"], kw.get("how", "replace"))
            self.digest = sha(self.data)
        elif action == "tree":
            rng = random.Random(kw["seed"])
            shutil.rmtree(self.tree, ignore_errors=True)
            for i in range(kw["files"]):
                p = os.path.join(os.fspath(self.tree), f"d{i % 3}", f"f{i}.bin")
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "wb") as f:
                    f.write(rng.randbytes(rng.randrange(1, 600_000)))
                if i % 4 == 0:
                    os.chmod(p, 0o755)
            os.makedirs(os.path.join(os.fspath(self.tree), "empty"), exist_ok=True)
            os.symlink("d0/f0.bin", os.path.join(os.fspath(self.tree), "link"))
        elif action == "unshared":  # a file no Path in the state names: never persisted
            write_version("unshared.bin", kw["version"], kw["size"], "replace")
        if kw.get("delay"):
            slow_origin(kw["delay"])
        if kw.get("rewrite_on_read"):
            self._rewrite_on_read(kw["rewrite_on_read"], kw["size"])

    def _rewrite_on_read(self, versions: list[int], size: int) -> None:
        """The first chunk read of each new manifest first rewrites data.bin to the next of
        ``versions`` (alternately in place and by rename), until they are used up."""
        pending = list(versions)
        seen: set[bytes] = set()
        lock = threading.Lock()
        path = os.path.abspath(os.fspath(self.data))

        def hook(service: Any, served: Any) -> None:
            with lock:
                if served.manifest.id in seen or not pending:
                    return
                seen.add(served.manifest.id)
                v = pending.pop(0)
                write_version(path, v, size, "in_place" if v % 2 else "replace")

        _wrap_read_frames(hook)


class Consumer(Work):
    """Receives a Path in ``run`` (so it is fetched before ``run`` starts) and reports."""

    def __init__(self, parallel: bool = False) -> None:
        super().__init__(parallel=parallel)
        self.record: dict[str, Any] | None = None
        self.tree: dict[str, Any] = {}
        self.outcomes: list[Any] = []
        self.attempts: list[int] = []
        self.target: Path | None = None  # set by the flow, for probes that must not auto-fetch

    def run(self, p: Path | None = None, action: str = "auto", **kw: Any) -> None:
        if p is None:
            p = self.target
            assert p is not None
        if action == "auto":
            pass  # the automatic get before run() did the work
        elif action == "get":
            p.get(overwrite=True)
        elif action == "probe":  # report outcomes instead of failing
            for what in kw["what"]:
                t0 = time.monotonic()
                try:
                    if what == "exists_remote":
                        result: Any = p.exists_remote()
                    else:
                        p.get(overwrite=True)
                        result = "ok"
                except Exception as e:  # noqa: BLE001 - reported to the test
                    result = f"{type(e).__name__}: {e}"
                self.outcomes.append([what, result, time.monotonic() - t0])
        self.attempts.append(LOCATE_CALLS[0])
        LOCATE_CALLS[0] = 0
        lt = p.last_transfer
        self.record = None if lt is None else {k: getattr(lt, k) for k in lt.__dataclass_fields__}
        self.tree = listing(p) if os.path.lexists(p) else {}


class App2(Flow):
    """A flow of one source and one consumer; ``steps`` is the test's script."""

    def __init__(self, steps: Any, source_parallel: bool = False, consumer_parallel: bool = False) -> None:
        super().__init__()
        self.source = Source(parallel=source_parallel)
        self.consumer = Consumer(parallel=consumer_parallel)
        self.steps = steps
        self.log: dict[str, Any] = {}

    def run(self) -> None:
        self.steps(self)


def run_app(tmp_path: FsPath, steps: Any, *, timeout: float = 30.0, **flow_kw: Any) -> tuple[App2, FsPath]:
    root = tmp_path / "app"
    flow = App2(steps, **flow_kw)
    App(flow, root=root, timeout=timeout).run()
    return flow, root


def consumer_leftovers(root: FsPath) -> list[str]:
    """Staging or journal files the consumer's workspace still holds (none after any get)."""
    txn = root / "state" / CONSUMER / "txn"
    return sorted(str(p.relative_to(txn)) for p in txn.rglob("*")) + ([] if not txn.exists() else ["txn"])


def persisted(app_root: FsPath, rel: str) -> bool:
    """Whether the source's ``rel`` has a manifest in the app's artifact store (a look below
    the API: the flow cannot otherwise know when a background persist landed)."""
    store = ArtifactStore.open(None, app_root)
    try:
        return store.manifest(SOURCE, rel) is not None
    finally:
        store.close()


def wait_for(cond: Any, limit: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# -- the origin dies mid-transfer --------------------------------------------------------
@pytest.mark.parametrize("speed, tls", [("slowed", False), ("full_speed", False), ("slowed", True)],
                         ids=["slowed", "full_speed", "slowed-tls"])
def test_origin_killed_mid_transfer_leaves_the_consumer_files_as_before(tmp_path: FsPath, speed: str, tls: bool) -> None:
    """``slowed``: each chunk batch waits 0.4 s at the origin, so the kill surely lands while
    chunks are in flight. ``full_speed``: a 96 MiB file at full speed, killed 50 ms into
    it; the get then usually fails mid-body, and may have finished (then it is complete).
    ``slowed-tls``: the same over TLS (a TLS stream cut off is an unreachable origin too)."""
    slowed = speed == "slowed"
    size = 64 * MiB if slowed else 96 * MiB

    def steps(flow: App2) -> None:
        src, con = flow.source, flow.consumer
        src.run("write", version=1, size=size)
        con.run(src.data)
        con.wait()
        flow.log["v1"] = src.digest
        flow.log["before"] = dict(con.tree)
        # The fallback below needs v1 persisted; on a loaded machine the background persist
        # (nice 10) may still be running when the origin is killed.
        wait_for(lambda: persisted(flow.log["root"], "data.bin"), 120, "the origin to persist v1")
        src.run("write", version=2, size=size, delay=0.4 if slowed else 0.0)
        flow.log["v2"] = src.digest
        stage = flow.log["root"] / "state" / CONSUMER / "txn" / "stage"
        con.run(src.data)  # parallel: returns at once; the get runs before the work's run()
        wait_for(stage.exists, 60, "the consumer to start staging")
        time.sleep(0.5 if slowed else 0.05)
        if slowed:
            assert con.is_running, "the transfer finished before the kill: nothing was tested"
        os.kill(src.pid, signal.SIGKILL)
        t0 = time.monotonic()
        try:
            con.wait()
            flow.log["error"] = None
        except WorkError as e:
            flow.log["error"] = e
        flow.log["failed_after"] = time.monotonic() - t0
        flow.log["leftovers"] = consumer_leftovers(flow.log["root"])
        flow.log["after_kill"] = listing(flow.log["root"] / "works" / CONSUMER / "data.bin")
        flow.log["listing"] = sorted(os.listdir(flow.log["root"] / "works" / CONSUMER))
        # The origin died after persisting (at least v1): get now falls back to the artifacts.
        con.run(src.data)
        con.wait()
        flow.log["fallback_record"] = con.record
        flow.log["fallback_tree"] = dict(con.tree)

    root = tmp_path / "app"
    flow = App2(steps, consumer_parallel=True)
    flow.log["root"] = root
    App(flow, root=root, timeout=10, tls=tls).run()
    log = flow.log
    v1, v2 = log["v1"], log["v2"]
    assert v1 != v2
    assert log["before"] == one_file(v1)
    err = log["error"]
    if err is None:  # the transfer finished before the kill landed: then it is complete
        assert not slowed, "the get succeeded although its origin was killed mid-transfer"
        assert log["after_kill"] == one_file(v2)
    else:
        assert isinstance(err, WorkError) and err.work_name == CONSUMER
        message = str(err).split("---")[0]
        assert "OriginUnreachableError" in message and repr(SOURCE) in message, message
        assert log["failed_after"] < 15
        # nothing lost or half-written: the previous file, byte for byte
        assert log["after_kill"] == one_file(v1)
    assert log["listing"] == ["data.bin"]
    assert log["leftovers"] == []
    # served from the artifact store: some version the origin really persisted, whole
    assert log["fallback_record"]["source"] == "artifacts"
    assert log["fallback_tree"] in (one_file(v1), one_file(v2))
    assert consumer_leftovers(root) == []


# -- the origin has stopped: the artifacts serve ----------------------------------------------
def test_get_after_the_origin_stopped_is_served_from_the_persisted_artifacts(tmp_path: FsPath) -> None:
    def steps(flow: App2) -> None:
        src, con = flow.source, flow.consumer
        src.run("tree", seed=7, files=9)
        src.run("write", version=3, size=3 * MiB)
        src.stop()  # waits for persisting
        con.run(src.tree)
        flow.log["tree"] = (con.record, dict(con.tree))
        con.run(src.data, action="probe", what=["exists_remote", "get"])
        flow.log["data"] = (con.record, dict(con.tree), list(con.outcomes))
        con.target = Path("lit://never_shared.bin", origin=SOURCE)
        con.run(action="probe", what=["exists_remote", "get"])
        flow.log["missing"] = list(con.outcomes[-2:])

    flow, root = run_app(tmp_path, steps)
    record, tree = flow.log["tree"]
    assert record["source"] == "artifacts"
    assert tree == listing(root / "works" / SOURCE / "tree")
    assert record["files"] == 9 and record["chunks_transferred"] > 0
    record, tree, outcomes = flow.log["data"]
    assert record["source"] == "artifacts" and record["bytes_total"] == 3 * MiB
    assert tree == one_file(sha(root / "works" / SOURCE / "data.bin"))
    assert [o[:2] for o in outcomes] == [["exists_remote", True], ["get", "ok"]]
    (what1, exists, _), (what2, got, _) = flow.log["missing"]
    assert exists is False
    assert got.startswith("FileNotFoundError") and "never_shared.bin" in got and SOURCE in got


# -- an unreachable origin that never persisted --------------------------------------------
def test_unreachable_origin_without_artifacts_raises_origin_unreachable_within_the_timeout(tmp_path: FsPath) -> None:
    timeout = 1.5

    def steps(flow: App2) -> None:
        src, con = flow.source, flow.consumer
        src.run("unshared", version=4, size=MiB)
        p = Path("lit://unshared.bin", origin=SOURCE)
        os.kill(src.pid, signal.SIGSTOP)  # accepts connections (the kernel does), never answers
        try:
            t0 = time.monotonic()
            try:
                con.run(p)
                flow.log["stopped_error"] = None
            except WorkError as e:
                flow.log["stopped_error"] = e
            flow.log["stopped_took"] = time.monotonic() - t0
            con.target = p
            con.run(action="probe", what=["exists_remote", "get"])
            flow.log["stopped_probe"] = list(con.outcomes)
        finally:
            os.kill(src.pid, signal.SIGKILL)  # now the port is closed
        time.sleep(0.2)
        con.run(action="probe", what=["exists_remote", "get"])
        flow.log["killed_probe"] = list(con.outcomes[-2:])

    flow, root = run_app(tmp_path, steps, timeout=timeout)
    err = flow.log["stopped_error"]
    assert isinstance(err, WorkError), "the get did not fail"
    message = str(err).split("---")[0]
    assert err.work_name == CONSUMER
    assert "OriginUnreachableError" in message and repr(SOURCE) in message, message
    assert "OriginUnreachableError" in err.remote_traceback
    assert timeout * 0.8 < flow.log["stopped_took"] < timeout * 2 + 3, flow.log["stopped_took"]
    for what, result, took in flow.log["stopped_probe"]:
        assert result.startswith("OriginUnreachableError") and SOURCE in result, (what, result)
        assert took < timeout * 2 + 1
    # A dead origin serves nothing; nothing was persisted: the path does not exist anywhere
    # (or, if the death is not noticed yet, the origin cannot be reached). Either way, at once.
    (_, exists, took1), (_, got, took2) = flow.log["killed_probe"]
    assert exists is False or str(exists).startswith("OriginUnreachableError"), exists
    assert got.startswith(("FileNotFoundError", "OriginUnreachableError")) and SOURCE in got, got
    assert took1 + took2 < timeout
    assert not (root / "works" / CONSUMER / "unshared.bin").exists()
    assert consumer_leftovers(root) == []


# -- a corrupt chunk in the artifact store -------------------------------------------------
def flip_a_chunk(app_root: FsPath, work: str, rel: str, avoid: set[bytes]) -> str:
    """Flip one payload byte of a chunk of ``work``'s persisted ``rel`` (one not in ``avoid``);
    its hex id."""
    artifacts = ArtifactStore.open(None, app_root)
    try:
        m = artifacts.manifest(work, rel)
        assert m is not None, f"{work}/{rel} was not persisted"
        cid = sorted(m.chunk_ids() - avoid)[0]
        store = artifacts.chunks
        assert isinstance(store, LocalChunkStore)
        with store._env.begin(db=store._db) as txn:
            loc = txn.get(cid)
        pack_id, offset, stored, _raw, _codec = INDEX.unpack(loc)
        pack = store._pack_path(pack_id)
        assert pack.parent == app_root / "artifacts" / "chunks" / "packs"
    finally:
        artifacts.close()
    at = offset + RECORD.size + stored // 2
    with open(pack, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))
    return cid.hex()


def test_corrupt_chunk_in_the_artifact_store_fails_the_get_and_leaves_the_tree(tmp_path: FsPath) -> None:
    size = 6 * MiB

    def steps(flow: App2) -> None:
        src, con = flow.source, flow.consumer
        src.run("write", version=5, size=size)
        con.run(src.data)  # from the origin
        flow.log["v1"] = src.digest
        flow.log["before"] = dict(con.tree)
        src.run("write", version=6, size=size)
        flow.log["v2"] = src.digest
        src.stop()  # persisted; from now on the artifacts serve
        flow.log["bad"] = flip_a_chunk(flow.log["root"], SOURCE, "data.bin", avoid=set())
        try:
            con.run(src.data)
            flow.log["error"] = None
        except WorkError as e:
            flow.log["error"] = e
        flow.log["after"] = listing(flow.log["root"] / "works" / CONSUMER / "data.bin")
        flow.log["leftovers"] = consumer_leftovers(flow.log["root"])

    root = tmp_path / "app"
    flow = App2(steps)
    flow.log["root"] = root
    App(flow, root=root).run()
    log = flow.log
    assert log["before"] == one_file(log["v1"])
    err = log["error"]
    assert isinstance(err, WorkError), "a corrupt chunk was accepted"
    message = str(err).split("---")[0]
    assert "ChunkCorruptError" in message and log["bad"] in message and "failed verification" in message, message
    assert "packs" in message  # says where the bad bytes are
    assert log["after"] == one_file(log["v1"])
    assert log["leftovers"] == []


# -- the file changes at the origin during a get --------------------------------------------
def test_file_rewritten_during_a_get_restarts_the_transfer_and_ends_in_a_real_state(tmp_path: FsPath) -> None:
    size = 12 * MiB

    def steps(flow: App2) -> None:
        src, con = flow.source, flow.consumer
        src.run("write", version=10, size=size)
        # The next two manifests each see their file rewritten at their first chunk read.
        src.run("noop", size=size, rewrite_on_read=[11, 12])
        con.run(src.data, action="auto")
        flow.log["first"] = (list(con.attempts), dict(con.tree), con.record)
        # Now every manifest is outdated by the time its chunks are read: give up, clearly.
        src.run("write", version=13, size=size, rewrite_on_read=list(range(14, 14 + 8)))
        try:
            con.run(src.data, action="auto")
            flow.log["error"] = None
        except WorkError as e:
            flow.log["error"] = e
        flow.log["after_error"] = listing(flow.log["root"] / "works" / CONSUMER / "data.bin")
        flow.log["leftovers"] = consumer_leftovers(flow.log["root"])

    root = tmp_path / "app"
    flow = App2(steps)
    flow.log["root"] = root
    App(flow, root=root).run()
    log = flow.log
    attempts, tree, record = log["first"]
    v12 = blake3.blake3(version_bytes(12, size)).hexdigest()
    assert attempts == [3], "two rewrites after the manifest must restart the transfer twice"
    assert tree == one_file(v12), "the result is not the file's real (last) state"
    assert record["source"] == "origin" and record["bytes_total"] == size
    err = log["error"]
    assert isinstance(err, WorkError)
    message = str(err).split("---")[0]
    assert "StaleManifestError" in message and "kept changing" in message and repr(SOURCE) in message, message
    assert log["after_error"] == one_file(v12)
    assert log["leftovers"] == []


class Rewriter(Work):
    """Writes a new version every ``gap`` seconds, as a trainer writes checkpoints: aside,
    then renamed into place (the writer contract under which readers see only whole files)."""

    def __init__(self) -> None:
        super().__init__(parallel=True)
        self.data = "lit://data.bin"

    def run(self, size: int, versions: list[int], gap: float) -> None:
        for v in versions:
            write_version(os.fspath(self.data), v, size, "replace")
            time.sleep(gap)


class Poller(Work):
    """Gets the writer's file again and again (the deploy side), recording what it got."""

    def __init__(self) -> None:
        super().__init__()
        self.target: Path | None = None
        self.results: list[str] = []

    def run(self, seconds: float) -> None:
        p = self.target
        assert p is not None
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            try:
                p.get(overwrite=True)
                self.results.append(sha(p))
            except Exception as e:  # noqa: BLE001 - giving up is allowed, a torn file is not
                self.results.append(f"{type(e).__name__}")
                if os.path.exists(p):
                    self.results.append(sha(p))


class Concurrent(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.writer = Rewriter()
        self.reader = Poller()

    def run(self) -> None:
        self.writer.run(size=4 * MiB, versions=[20], gap=0.0)
        self.writer.wait()
        self.reader.target = self.writer.data
        self.writer.run(size=4 * MiB, versions=list(range(21, 33)), gap=0.15)
        self.reader.run(seconds=2.0)
        self.writer.wait()


def test_gets_racing_a_writer_only_ever_see_whole_versions(tmp_path: FsPath) -> None:
    flow = Concurrent()
    App(flow, root=tmp_path / "app").run()
    real = {blake3.blake3(version_bytes(v, 4 * MiB)).hexdigest() for v in range(20, 33)}
    results = flow.reader.results
    digests = [r for r in results if len(r) == 64]
    assert len(digests) >= 3 and len(set(digests)) >= 2, results
    assert set(digests) <= real, "a get produced a file that was never a state of the origin's file"
    assert set(r for r in results if len(r) != 64) <= {"StaleManifestError"}, results
