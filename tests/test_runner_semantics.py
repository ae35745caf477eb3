"""SPEC's semantics of works and Paths, run on every runner: one conformance suite.

Each flow below runs once per runner (``local``: work processes here; ``ray``: actors on the
session's Ray cluster, an S3 store) and the same assertions read its final state, as
``cas.testing`` runs one chunk store suite on every store. What it covers: the automatic
transfer at run start, ``get``/``exists_*``, parallel works, ``stop()``, ``WorkError`` with the
remote traceback, an error nobody waited for, and persistence with the fallback to the
artifacts once the origin has gone. On Ray the works also say which node they ran on: with
3 worker nodes, the producer and the receiver run on different nodes, so files crossed
between nodes.

Work classes live at module level: work processes and actors import them from here.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from pathlib import Path as FsPath

import pytest
from trees import listing

from pathapi import App, Flow, Path, Work, WorkError
from pathapi.runtime.runner import IN_WORK_ENV

RUNNERS = ["local", "ray"]


def where() -> dict[str, object]:
    """Which node and process this work runs in (node "local" outside Ray)."""
    node = "local"
    if os.environ.get(IN_WORK_ENV):
        import ray

        node = ray.get_runtime_context().get_node_id()
    return {"node": node, "pid": os.getpid()}


def transfer_fields(p: Path) -> dict[str, object] | None:
    t = p.last_transfer
    if t is None:
        return None
    return {k: getattr(t, k) for k in ("files", "bytes_total", "chunks_transferred", "bytes_transferred", "chunks_reused", "source")}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module", params=RUNNERS)
def runner(request: pytest.FixtureRequest) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    return str(request.param)


def run_app(flow: Flow, runner: str, tmp: FsPath, request: pytest.FixtureRequest) -> Flow:
    """Run ``flow`` on ``runner``: locally with the default store, on Ray with an S3 prefix of its own."""
    if runner == "ray":
        request.getfixturevalue("ray_cluster")
        app = App(flow, root=tmp / "app", store=f"s3://pathapi-test/semantics-{uuid.uuid4().hex}", cluster="ray")
    else:
        app = App(flow, root=tmp / "app")
    app.run()
    flow.origin_urls = {name: h.url for name, h in app.handles.items()}  # type: ignore[attr-defined]
    return flow


# ======================================================================================
# Automatic transfer, get, exists
# ======================================================================================
BIG = 2 << 20


class Producer(Work):
    def __init__(self) -> None:
        super().__init__()
        self.tree = "lit://out/tree"
        self.missing = "lit://out/missing"  # never created

    def run(self, change: bool = False) -> None:
        self.where = where()
        t = self.tree
        if not change:
            os.makedirs(t / "sub", exist_ok=True)
            (t / "sub" / "x.txt").write_text("origin x")
            (t / "big.bin").write_bytes(random.Random(1).randbytes(BIG))
            (t / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(t / "run.sh", 0o755)
            os.symlink("big.bin", t / "link")
        else:
            with open(t / "big.bin", "r+b") as f:
                f.seek(BIG // 2)
                f.write(b"\xff" * 1024)
        self.listing = listing(t)


class Receiver(Work):
    def __init__(self) -> None:
        super().__init__()
        self.log: dict[str, object] = {}

    def run(self, tree: Path, missing: Path, step: str = "first") -> None:
        self.where = where()
        if step == "first":
            self.auto = {"listing": listing(tree), "transfer": transfer_fields(tree), "consumer": tree.consumer_name,
                         "origin": tree.origin_name, "missing_transfer": transfer_fields(missing)}
            self.exists = {"local": tree.exists_local(), "remote": tree.exists_remote(),
                           "missing_remote": missing.exists_remote(), "missing_local": missing.exists_local()}
            for label, call in (("get_no_overwrite", tree.get), ("get_missing", lambda: missing.get(overwrite=True))):
                try:
                    call()
                except Exception as e:
                    self.log[label] = type(e).__name__
            tree.get(overwrite=True)
            self.unchanged = transfer_fields(tree)
            (tree / "local_only.txt").write_text("mine")
            tree.get(overwrite=True)
            self.after_overwrite = listing(tree)
        else:  # the automatic get at the start of this run fetched the origin's change
            self.changed = {"listing": listing(tree), "transfer": transfer_fields(tree)}


class TransferFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.producer = Producer()
        self.receiver = Receiver()
        self.in_flow: dict[str, str] = {}

    def run(self) -> None:
        self.producer.run()
        self.first_listing = self.producer.listing
        self.receiver.run(self.producer.tree, self.producer.missing)
        for label, call in (("get", lambda p: p.get()), ("exists_remote", lambda p: p.exists_remote())):
            try:
                call(self.producer.tree)
            except Exception as e:
                self.in_flow[label] = type(e).__name__
        self.producer.run(change=True)
        self.receiver.run(self.producer.tree, self.producer.missing, step="second")


@pytest.fixture(scope="module")
def transfer_app(runner: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> TransferFlow:
    flow = run_app(TransferFlow(), runner, tmp_path_factory.mktemp(f"transfer-{runner}"), request)
    assert isinstance(flow, TransferFlow)
    return flow


def test_paths_among_run_args_are_transferred_before_run_starts(transfer_app: TransferFlow) -> None:
    auto = transfer_app.receiver.auto
    assert auto["listing"] == transfer_app.first_listing
    t = auto["transfer"]
    assert t["source"] == "origin" and t["files"] == 3 and t["bytes_transferred"] > 0
    assert (auto["origin"], auto["consumer"]) == ("root.producer", "root.receiver")


def test_paths_missing_at_the_origin_pass_through_untouched(transfer_app: TransferFlow) -> None:
    assert transfer_app.receiver.auto["missing_transfer"] is None
    assert transfer_app.receiver.exists["missing_remote"] is False
    assert transfer_app.receiver.log["get_missing"] == "FileNotFoundError"


def test_exists_remote_asks_the_origin_and_exists_local_looks_here(transfer_app: TransferFlow) -> None:
    assert transfer_app.receiver.exists == {"local": True, "remote": True, "missing_remote": False, "missing_local": False}


def test_get_without_overwrite_refuses_and_with_overwrite_restores_the_origins_tree(transfer_app: TransferFlow) -> None:
    r = transfer_app.receiver
    assert r.log["get_no_overwrite"] == "FileExistsError"
    assert r.unchanged["bytes_transferred"] == 0 and r.unchanged["chunks_transferred"] == 0
    assert r.after_overwrite == transfer_app.first_listing
    assert r.after_overwrite["run.sh"][1] is True and r.after_overwrite["link"] == ("link", "big.bin")


def test_get_asks_for_the_current_files_and_moves_only_changed_chunks(transfer_app: TransferFlow) -> None:
    changed = transfer_app.receiver.changed
    assert changed["listing"] == transfer_app.producer.listing != transfer_app.first_listing
    t = changed["transfer"]
    assert 1 <= t["chunks_transferred"] <= 3 and t["chunks_reused"] >= 1
    assert 0 < t["bytes_transferred"] < BIG // 2


def test_get_and_exists_raise_runtime_error_in_a_flow(transfer_app: TransferFlow) -> None:
    assert transfer_app.in_flow == {"get": "RuntimeError", "exists_remote": "RuntimeError"}


def test_works_run_in_processes_of_their_own_and_on_ray_on_nodes_of_their_own(transfer_app: TransferFlow, runner: str) -> None:
    p, r = transfer_app.producer.where, transfer_app.receiver.where
    assert p["pid"] != r["pid"] and os.getpid() not in (p["pid"], r["pid"])
    if runner == "ray":
        assert p["node"] != r["node"], "the two works shared a node although the cluster has 3"


def test_origins_speak_tls_by_default_on_a_cluster_and_plain_http_locally(transfer_app: TransferFlow, runner: str) -> None:
    urls = transfer_app.origin_urls  # type: ignore[attr-defined]
    assert urls and all(url is not None for url in urls.values())
    scheme = "https://" if runner == "ray" else "http://"
    assert all(url.startswith(scheme) for url in urls.values()), urls


# ======================================================================================
# Errors, parallel works
# ======================================================================================
def raise_deep() -> None:
    raise ValueError("checkpoint 7 is corrupt")


class Failing(Work):
    def run(self, fail: bool = True) -> None:
        self.ran = True
        if fail:
            raise_deep()


class Sleeper(Work):
    def __init__(self, parallel: bool = False) -> None:
        super().__init__(parallel=parallel)
        self.finished = False

    def run(self, seconds: float, fail: bool = False) -> None:
        self.where = where()
        time.sleep(seconds)
        if fail:
            raise RuntimeError("failed in the background")
        self.finished = True


class ErrorsFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.failing = Failing()
        self.background = Sleeper(parallel=True)
        self.background_failing = Sleeper(parallel=True)
        self.errors: dict[str, WorkError] = {}

    def run(self) -> None:
        try:
            self.failing.run()
        except WorkError as e:
            self.errors["blocking"] = e
        self.failing.run(fail=False)
        self.background.run(1.0)
        self.running_after_start = self.background.is_running
        self.finished_before_wait = self.background.finished
        self.background.wait()
        self.running_after_wait = self.background.is_running
        self.background_failing.run(0.1, fail=True)
        try:
            self.background_failing.wait()
        except WorkError as e:
            self.errors["parallel"] = e


@pytest.fixture(scope="module")
def errors_app(runner: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> ErrorsFlow:
    flow = run_app(ErrorsFlow(), runner, tmp_path_factory.mktemp(f"errors-{runner}"), request)
    assert isinstance(flow, ErrorsFlow)
    return flow


def test_an_exception_in_a_work_reaches_the_flow_as_work_error_with_the_remote_traceback(errors_app: ErrorsFlow) -> None:
    e = errors_app.errors["blocking"]
    assert e.work_name == "root.failing"
    assert "checkpoint 7 is corrupt" in e.remote_traceback and "raise_deep" in e.remote_traceback
    assert errors_app.failing.ran is True  # and the work runs again after it


def test_a_parallel_run_returns_at_once_and_wait_sees_its_state(errors_app: ErrorsFlow) -> None:
    assert errors_app.running_after_start is True and errors_app.finished_before_wait is False
    assert errors_app.running_after_wait is False and errors_app.background.finished is True


def test_wait_re_raises_the_error_of_a_parallel_run(errors_app: ErrorsFlow) -> None:
    e = errors_app.errors["parallel"]
    assert e.work_name == "root.background_failing" and "failed in the background" in e.remote_traceback


class UnwaitedFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.background_failing = Sleeper(parallel=True)

    def run(self) -> None:
        self.background_failing.run(0.1, fail=True)
        deadline = time.monotonic() + 60
        while self.background_failing.is_running and time.monotonic() < deadline:
            time.sleep(0.05)  # it ends on its own; the flow never calls wait()


def test_an_error_nobody_waited_for_makes_app_run_raise(runner: str, tmp_path: FsPath, request: pytest.FixtureRequest) -> None:
    with pytest.raises(WorkError, match="root.background_failing") as info:
        run_app(UnwaitedFlow(), runner, tmp_path, request)
    assert "failed in the background" in info.value.remote_traceback


# ======================================================================================
# stop(), persistence, the fallback to the artifacts
# ======================================================================================
class Keeper(Work):
    def __init__(self, parallel: bool = False) -> None:
        super().__init__(parallel=parallel)
        self.ckpt = "lit://outputs/ckpt"
        self.log_dir = "outputs/logs"  # a plain string: not persisted

    def run(self, hold: float = 0.0) -> None:
        self.where = where()
        os.makedirs(self.ckpt, exist_ok=True)
        (self.ckpt / "model.bin").write_bytes(random.Random(5).randbytes(300_000))
        (self.ckpt / "note.txt").write_text("as left" if hold else "end of run")
        os.makedirs(self.log_dir, exist_ok=True)
        FsPath(self.log_dir, "train.log").write_text("log")
        self.listing = listing(self.ckpt)
        time.sleep(hold)


class LateReader(Work):
    def run(self, ckpt: Path) -> None:
        self.auto = {"listing": listing(ckpt) if os.path.lexists(ckpt) else None, "transfer": transfer_fields(ckpt)}
        self.exists_remote = ckpt.exists_remote()
        self.note = (ckpt / "note.txt").read_text() if os.path.lexists(ckpt / "note.txt") else None
        logs = Path("lit://outputs/logs", origin=ckpt.origin_name)
        self.logs_exists_remote = logs.exists_remote()


class PersistFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.keeper = Keeper()
        self.holder = Keeper(parallel=True)
        self.reader = LateReader()
        self.holder_reader = LateReader()
        self.errors: dict[str, str] = {}

    def run(self) -> None:
        self.keeper.run()
        self.keeper.stop()
        self.keeper.stop()  # idempotent
        try:
            self.keeper.run()
        except WorkError as e:
            self.errors["run_after_stop"] = str(e)
        self.reader.run(self.keeper.ckpt)
        # stop() of a running work: it ends, and its Paths are persisted as it left them
        self.holder.run(hold=120)
        deadline = time.monotonic() + 60
        while not self.holder.is_running and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # let it write its files
        self.holder.stop()
        self.holder_running_after_stop = self.holder.is_running
        self.holder_reader.run(self.holder.ckpt)


@pytest.fixture(scope="module")
def persist_app(runner: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> PersistFlow:
    flow = run_app(PersistFlow(), runner, tmp_path_factory.mktemp(f"persist-{runner}"), request)
    assert isinstance(flow, PersistFlow)
    return flow


def test_stop_ends_the_work(persist_app: PersistFlow) -> None:
    assert not pid_alive(int(persist_app.keeper.where["pid"]))  # every node runs on this machine here
    assert "stopped" in persist_app.errors["run_after_stop"]


def test_after_the_origin_stopped_paths_come_from_the_artifacts(persist_app: PersistFlow) -> None:
    r = persist_app.reader
    assert r.auto["listing"] == persist_app.keeper.listing
    assert r.auto["transfer"]["source"] == "artifacts"
    assert r.exists_remote is True
    assert r.logs_exists_remote is False  # plain strings are not persisted


def test_stop_of_a_running_work_ends_it_and_persists_its_paths_as_left(persist_app: PersistFlow) -> None:
    assert persist_app.holder_running_after_stop is False
    r = persist_app.holder_reader
    assert r.auto["transfer"]["source"] == "artifacts"
    assert r.note == "as left"
    assert set(r.auto["listing"]) == {"model.bin", "note.txt"}
