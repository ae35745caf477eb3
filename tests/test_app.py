"""SPEC "Public API", through the public API, with real work processes.

Every behaviour the section states has a test named after it. Starting an app costs about a
second (spawned processes), so one app run usually feeds several tests: each ``*_app``
fixture runs one flow once per module and the tests read its final state. Works record
what they observed in their own state (public attributes flow back to the flow), and the
tests assert on that, so a failure names the behaviour, not a traceback in a child.

Work classes live at module level: work processes are spawned and import them from here.
The one look below the API (waiting for a background persist to finish) is marked.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
import time
import types
from pathlib import Path as FsPath

import blake3
import pytest
from trees import listing

from pathapi import App, Flow, LightningApp, LightningFlow, LightningWork, Path, Work, WorkError

TEST_PID = os.getpid()


# -- helpers (also used inside work processes) ------------------------------------------
def versioned(version: int, size: int) -> bytes:
    """Checkpoint bytes that verify themselves: a 32-byte hash of the rest, then the rest
    (the version number and bytes that differ per version)."""
    body = version.to_bytes(4, "little") + random.Random(version).randbytes(size - 36)
    return hashlib.blake2b(body, digest_size=32).digest() + body


def version_of(data: bytes) -> int:
    """The version a checkpoint file holds; ValueError if it is not one whole version."""
    if len(data) < 36 or hashlib.blake2b(data[32:], digest_size=32).digest() != data[:32]:
        raise ValueError(f"torn or partial checkpoint ({len(data)} bytes)")
    return int.from_bytes(data[32:36], "little")


def write_atomically(path: str, data: bytes, tmp_dir: str = "tmp") -> None:
    """Write ``data`` to a file outside the shared folder, then rename it into place."""
    os.makedirs(tmp_dir, exist_ok=True)
    tmp = os.path.join(tmp_dir, os.path.basename(path))
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def transfer_fields(p: Path) -> dict[str, object] | None:
    t = p.last_transfer
    if t is None:
        return None
    return {k: getattr(t, k) for k in ("files", "bytes_total", "chunks_transferred", "bytes_transferred", "chunks_reused", "seconds")}


def run_app(flow: Flow, root: FsPath, **kw: object) -> Flow:
    App(flow, root=root, **kw).run()
    return flow


# ======================================================================================
# Processes, names, roots, state
# ======================================================================================
class Source(Work):
    def __init__(self) -> None:
        super().__init__()
        self.checkpoint_dir = "lit://outputs/checkpoints"  # a lit:// string set in __init__
        self.runs = 0
        self.seen_from_flow: list[object] = []

    def run(self) -> None:
        self.runs += 1
        self.pid = os.getpid()
        self.cwd = os.getcwd()
        self.my_name = self.name
        # os, os.path, open, shutil and pathlib all work on a Path, relative to the work's root
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        with open(os.path.join(self.checkpoint_dir, "a.txt"), "w") as f:
            f.write("written with open")
        (self.checkpoint_dir / "b.txt").write_text("written with pathlib")
        shutil.copy(os.path.join(self.checkpoint_dir, "a.txt"), self.checkpoint_dir / "c.txt")
        self.files_here = sorted(os.listdir(self.checkpoint_dir))
        self.abs_checkpoint_dir = os.path.abspath(self.checkpoint_dir)
        # state: JSON-able values and Paths come back to the flow; private attributes do not
        self.report = "lit://outputs/report.txt"  # a lit:// string set in run
        FsPath(self.report).write_text("report")
        self.number, self.ratio, self.flag, self.nothing = 7, 0.5, True, None
        self.nested = {"list": [1, "two", {"three": 3}], "ok": False}
        self._private = "stays in the work"
        self.hash_here = self.checkpoint_dir.hash
        # attributes the flow set since the last run
        self.seen_from_flow.append(
            [getattr(self, "message", None), getattr(self, "given", None) is not None and self.given.to_dict(),
             isinstance(getattr(self, "given", None), Path)]
        )


class Recorder(Work):
    def run(self) -> None:
        self.pid = os.getpid()
        self.cwd = os.getcwd()
        self.my_name = self.name


class Stage(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.train = Recorder()


class Inner(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.leaf = Recorder()


class TreeFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.source = Source()
        self.stages = [Stage(), Stage()]
        self.sub = Inner()
        self.by_key = {"eval": Recorder()}
        self.flow_runs = 0

    def run(self) -> None:
        self.flow_runs += 1
        self.source.run()
        self.source.message = "hello from the flow"
        self.source.given = Path("lit://outputs/elsewhere", origin="root.sub.leaf")
        self.source.run()
        for stage in self.stages:
            stage.train.run()
        self.sub.leaf.run()
        self.by_key["eval"].run()


@pytest.fixture(scope="module")
def tree_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree") / "app"
    return run_app(TreeFlow(), root), root


def all_recorders(flow: TreeFlow) -> list[Work]:
    return [flow.source, flow.stages[0].train, flow.stages[1].train, flow.sub.leaf, flow.by_key["eval"]]


def test_each_work_runs_in_its_own_process(tree_app):
    flow, _ = tree_app
    pids = [w.pid for w in all_recorders(flow)]
    assert TEST_PID not in pids
    assert len(set(pids)) == len(pids)


def test_work_name_is_its_attribute_path_from_the_root_flow(tree_app):
    flow, _ = tree_app
    names = [w.my_name for w in all_recorders(flow)]
    assert names == ["root.source", "root.stages.0.train", "root.stages.1.train", "root.sub.leaf", "root.by_key.eval"]
    assert [w.name for w in all_recorders(flow)] == names


def test_work_cwd_is_its_own_root_under_the_app_root(tree_app):
    flow, root = tree_app
    for w in all_recorders(flow):
        assert w.cwd == os.path.join(os.path.realpath(root), "works", w.my_name)


def test_os_open_shutil_and_pathlib_work_on_a_path_relative_to_the_work_root(tree_app):
    flow, root = tree_app
    assert flow.source.files_here == ["a.txt", "b.txt", "c.txt"]
    on_disk = os.path.realpath(root) + "/works/root.source/outputs/checkpoints"
    assert flow.source.abs_checkpoint_dir == on_disk
    assert (FsPath(on_disk) / "c.txt").read_text() == "written with open"
    assert (FsPath(on_disk) / "b.txt").read_text() == "written with pathlib"


def test_lit_string_set_in_init_is_a_path_whose_origin_is_that_work(tree_app):
    flow, _ = tree_app
    p = flow.source.checkpoint_dir
    assert isinstance(p, Path)
    assert os.fspath(p) == "outputs/checkpoints"
    assert p.origin_name == "root.source"


def test_lit_string_set_in_run_comes_back_as_a_path_whose_origin_is_that_work(tree_app):
    flow, _ = tree_app
    p = flow.source.report
    assert isinstance(p, Path)
    assert os.fspath(p) == "outputs/report.txt"
    assert p.origin_name == "root.source"


def test_path_hash_is_the_same_in_the_work_and_the_flow(tree_app):
    flow, _ = tree_app
    assert flow.source.hash_here == flow.source.checkpoint_dir.hash


def test_state_json_values_flow_back_after_run(tree_app):
    flow, _ = tree_app
    s = flow.source
    assert s.runs == 2
    assert (s.number, s.ratio, s.flag, s.nothing) == (7, 0.5, True, None)
    assert s.nested == {"list": [1, "two", {"three": 3}], "ok": False}


def test_private_attributes_are_not_state(tree_app):
    flow, _ = tree_app
    assert not hasattr(flow.source, "_private")


def test_attributes_set_by_the_flow_are_seen_at_the_next_run(tree_app):
    flow, _ = tree_app
    first, second = flow.source.seen_from_flow
    assert first == [None, False, False]
    assert second[0] == "hello from the flow"
    assert second[1] == {"path": "outputs/elsewhere", "origin_name": "root.sub.leaf", "consumer_name": "root.source"}
    assert second[2] is True  # a Path assigned by the flow stays a Path, with its origin


def test_app_run_runs_the_flow_once_and_stops_every_work(tree_app):
    flow, _ = tree_app
    assert flow.flow_runs == 1
    assert not any(w.is_running for w in all_recorders(flow))
    assert not any(pid_alive(w.pid) for w in all_recorders(flow))


# ======================================================================================
# Automatic transfer of Paths among run arguments
# ======================================================================================
class Producer(Work):
    def __init__(self) -> None:
        super().__init__()
        self.folder = "lit://out/folder"
        self.single = "lit://out/single.txt"
        self.other = "lit://out/other.txt"
        self.missing = "lit://out/missing"  # never created

    def run(self) -> None:
        os.makedirs(self.folder / "sub", exist_ok=True)
        (self.folder / "sub" / "x.txt").write_text("origin x")
        (self.folder / "y.bin").write_bytes(os.urandom(300_000))
        FsPath(self.single).write_text("origin single")
        FsPath(self.other).write_text("origin other")
        self.tree = {k: listing(getattr(self, k)) for k in ("folder", "single", "other")}


class Receiver(Work):
    def run(self, *args, prepare: bool = False, **kwargs) -> None:
        if prepare:  # local files that the transfer must overwrite, or leave alone
            os.makedirs("out/folder/sub", exist_ok=True)
            FsPath("out/folder/sub/x.txt").write_text("stale local x")
            FsPath("out/single.txt").write_text("stale local single")
            FsPath("out/missing").write_text("local only, origin has nothing here")
            return
        folder_list, (single,), by_key = args[0], args[1], kwargs["by_key"]
        (folder,) = folder_list
        missing = kwargs["missing"]
        self.received = {
            "folder": listing(folder), "single": listing(single), "other": listing(by_key["other"]),
        }
        self.types = [type(p).__name__ for p in (folder, single, by_key["other"], missing)]
        self.consumers = [p.consumer_name for p in (folder, single, by_key["other"], missing)]
        self.origins = [p.origin_name for p in (folder, single, by_key["other"], missing)]
        self.transfers = {"folder": transfer_fields(folder), "missing": transfer_fields(missing)}
        self.missing_text = FsPath(missing).read_text()


class ArgsFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.producer = Producer()
        self.receiver = Receiver()

    def run(self) -> None:
        self.producer.run()
        self.receiver.run(prepare=True)
        p = self.producer
        self.receiver.run([p.folder], (p.single,), by_key={"other": p.other}, missing=p.missing)


#: Fixtures whose tests also run with TLS between the works (App(tls=True)): the same
#: semantics must hold over https (tests/test_tls.py tests TLS itself).
TLS_PARAMS = {"params": [False, True], "ids": ["plain", "tls"]}


@pytest.fixture(scope="module", **TLS_PARAMS)
def args_app(tmp_path_factory, request):
    return run_app(ArgsFlow(), tmp_path_factory.mktemp("args") / "app", tls=request.param)


def test_paths_among_run_args_are_transferred_before_run_also_in_lists_tuples_and_dicts(args_app):
    assert args_app.receiver.received == args_app.producer.tree


def test_automatic_transfer_overwrites_local_files(args_app):
    received = args_app.receiver.received
    assert received["single"][""][2] == blake3.blake3(b"origin single").hexdigest()
    assert received["folder"]["sub/x.txt"][2] == blake3.blake3(b"origin x").hexdigest()


def test_paths_that_do_not_exist_at_the_origin_pass_through_untouched(args_app):
    r = args_app.receiver
    assert r.types[3] == "Path"
    assert r.origins[3] == "root.producer"
    assert r.missing_text == "local only, origin has nothing here"
    assert r.transfers["missing"] is None


def test_received_paths_keep_their_origin_and_name_the_receiver_as_consumer(args_app):
    r = args_app.receiver
    assert r.types == ["Path"] * 4
    assert r.origins == ["root.producer"] * 4
    assert r.consumers == ["root.receiver"] * 4


def test_last_transfer_records_the_automatic_get_on_the_path_run_receives(args_app):
    t = args_app.receiver.transfers["folder"]
    assert t is not None
    assert t["files"] == 2
    assert t["bytes_total"] == 300_000 + len("origin x")
    assert t["chunks_transferred"] >= 2  # the stale x.txt shares nothing with the origin's
    assert t["bytes_transferred"] > 0


# ======================================================================================
# get(), exists_local(), exists_remote(), last_transfer
# ======================================================================================
BIG = 3 << 20


class Origin(Work):
    def __init__(self) -> None:
        super().__init__()
        self.tree = "lit://shared/tree"

    def run(self, change: bool = False) -> None:
        t = self.tree
        if not change:
            os.makedirs(t / "bin", exist_ok=True)
            os.makedirs(t / "empty" / "deeper", exist_ok=True)
            (t / "a.txt").write_text("a")
            (t / "naïve name ü.txt").write_text("unicode")
            (t / "big.bin").write_bytes(random.Random(1).randbytes(BIG))
            (t / "bin" / "tool.sh").write_text("#!/bin/sh\necho hi\n")
            os.chmod(t / "bin" / "tool.sh", 0o755)
            os.symlink("a.txt", t / "link")
            os.symlink("../big.bin", t / "bin" / "big_link")
            os.symlink("bin", t / "dir_link")
        else:  # change 1 KiB in the middle of big.bin
            with open(t / "big.bin", "r+b") as f:
                f.seek(BIG // 2)
                f.write(b"\xff" * 1024)
        self.listing = listing(t)


class Consumer(Work):
    def __init__(self) -> None:
        super().__init__()
        self.tree: Path | None = None  # set by the flow: no automatic transfer
        self.log: list[object] = []

    def _try(self, label: str, fn) -> None:  # noqa: ANN001
        try:
            value = fn()
        except Exception as e:
            self.log.append([label, type(e).__name__, str(e)])
        else:
            self.log.append([label, "ok", value])

    def run(self, step: str) -> None:
        tree = self.tree
        assert tree is not None
        if step == "first":
            self.before = {"exists_local": tree.exists_local(), "exists_remote": tree.exists_remote()}
            tree.get()
            self.first_get = {"listing": listing(tree), "transfer": transfer_fields(tree),
                              "exists_local": tree.exists_local()}
            self._try("get_again", tree.get)
            tree.get(overwrite=True)
            self.unchanged_get = transfer_fields(tree)
            # local edits: changed and removed files, local-only files and folders, a file
            # that became a folder, a folder that became a file, a retargeted link
            (tree / "big.bin").write_bytes(b"edited here")
            (tree / "local_only.txt").write_text("mine")
            os.makedirs(tree / "local_dir" / "x")
            os.remove(tree / "bin" / "tool.sh")
            os.remove(tree / "a.txt")
            os.makedirs(tree / "a.txt" / "inner")
            shutil.rmtree(tree / "empty")
            (tree / "empty").write_text("now a file")
            os.remove(tree / "link")
            os.symlink("big.bin", tree / "link")
            tree.get(overwrite=True)
            self.after_overwrite = listing(tree)
            # a file inside the shared folder, fetched alone into a folder that is not here
            shutil.rmtree(tree)
            (tree / "bin" / "tool.sh").get()
            self.single_file = listing(tree)
            tree.get(overwrite=True)
            missing = tree / "not_there"
            self.missing = {"exists_remote": missing.exists_remote(), "exists_local": missing.exists_local()}
            self._try("get_missing", missing.get)
            self._try("get_missing_overwrite", lambda: missing.get(overwrite=True))
            self.missing_left_nothing = not os.path.lexists(missing)
        else:  # the origin changed its files since the first get
            tree.get(overwrite=True)
            self.changed_get = {"listing": listing(tree), "transfer": transfer_fields(tree)}


class GetFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.origin = Origin()
        self.consumer = Consumer()
        self.in_flow: dict[str, str] = {}

    def run(self) -> None:
        self.origin.run()
        self.first_listing = self.origin.listing
        self.consumer.tree = self.origin.tree
        self.consumer.run("first")
        for label, call in (("get", lambda p: p.get()), ("get_overwrite", lambda p: p.get(overwrite=True)),
                            ("exists_local", lambda p: p.exists_local()), ("exists_remote", lambda p: p.exists_remote())):
            try:
                call(self.origin.tree)
            except Exception as e:
                self.in_flow[label] = type(e).__name__
            else:
                self.in_flow[label] = "no error"
        self.origin.run(change=True)
        self.consumer.run("second")


@pytest.fixture(scope="module", **TLS_PARAMS)
def get_app(tmp_path_factory, request):
    return run_app(GetFlow(), tmp_path_factory.mktemp("get") / "app", tls=request.param)


def test_exists_remote_asks_the_origin_and_exists_local_looks_here(get_app):
    assert get_app.consumer.before == {"exists_local": False, "exists_remote": True}
    assert get_app.consumer.first_get["exists_local"] is True
    assert get_app.consumer.missing == {"exists_remote": False, "exists_local": False}


def test_get_makes_the_local_tree_equal_to_the_origins_with_exec_bits_and_symlinks(get_app):
    got = get_app.consumer.first_get["listing"]
    assert got == get_app.first_listing
    assert got["bin/tool.sh"][1] is True and got["a.txt"][1] is False
    assert got["link"] == ("link", "a.txt")
    assert got["bin/big_link"] == ("link", "../big.bin")
    assert got["dir_link"] == ("link", "bin")
    assert got["empty/deeper"] == ("dir",)


def test_get_without_overwrite_raises_file_exists_when_the_path_exists_locally(get_app):
    assert ["get_again", "FileExistsError"] == get_app.consumer.log[0][:2]


def test_get_of_a_path_missing_at_the_origin_raises_file_not_found(get_app):
    log = {entry[0]: entry[1] for entry in get_app.consumer.log}
    assert log["get_missing"] == "FileNotFoundError"
    assert log["get_missing_overwrite"] == "FileNotFoundError"
    assert get_app.consumer.missing_left_nothing


def test_get_overwrite_restores_changed_files_and_removes_local_only_files(get_app):
    assert get_app.consumer.after_overwrite == get_app.first_listing


def test_get_of_a_derived_path_fetches_that_file_alone(get_app):
    tool = get_app.first_listing["bin/tool.sh"]
    assert get_app.consumer.single_file == {"bin": ("dir",), "bin/tool.sh": tool}


def test_get_and_exists_raise_runtime_error_in_a_flow(get_app):
    assert get_app.in_flow == {k: "RuntimeError" for k in ("get", "get_overwrite", "exists_local", "exists_remote")}


def test_last_transfer_of_a_first_get_moves_every_chunk(get_app):
    t = get_app.consumer.first_get["transfer"]
    assert t["files"] == 4
    assert t["bytes_total"] == BIG + len("a") + len("unicode") + len("#!/bin/sh\necho hi\n")
    assert t["chunks_transferred"] >= 3
    assert t["chunks_reused"] == 0
    assert 0 < t["bytes_transferred"] <= t["bytes_total"] + 1024  # random bytes: not compressed
    assert 0 <= t["seconds"] < 30


def test_get_of_unchanged_files_transfers_nothing(get_app):
    first, again = get_app.consumer.first_get["transfer"], get_app.consumer.unchanged_get
    assert again["bytes_transferred"] == 0
    assert again["chunks_transferred"] == 0
    assert again["chunks_reused"] == first["chunks_transferred"]
    assert (again["files"], again["bytes_total"]) == (first["files"], first["bytes_total"])


def test_get_asks_the_origin_for_its_current_files_and_moves_only_changed_chunks(get_app):
    changed = get_app.consumer.changed_get
    assert changed["listing"] == get_app.origin.listing
    assert changed["listing"]["big.bin"] != get_app.first_listing["big.bin"]
    t = changed["transfer"]
    assert 1 <= t["chunks_transferred"] <= 3
    assert t["chunks_reused"] >= 1
    assert 0 < t["bytes_transferred"] < BIG // 2


# ======================================================================================
# Errors, blocking and parallel runs
# ======================================================================================
class Failing(Work):
    def run(self, fail: bool = True) -> None:
        self.ran = True
        if fail:
            raise_deep()


def raise_deep() -> None:
    raise ValueError("checkpoint 7 is corrupt")


class Sleeper(Work):
    def __init__(self, parallel: bool = False) -> None:
        super().__init__(parallel=parallel)
        self.finished = False

    def run(self, seconds: float, fail: bool = False) -> None:
        self.pid = os.getpid()
        time.sleep(seconds)
        if fail:
            raise RuntimeError("failed in the background")
        self.finished = True


class ErrorsFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.failing = Failing()
        self.blocking = Sleeper()
        self.background = Sleeper(parallel=True)
        self.background_failing = Sleeper(parallel=True)
        self.errors: dict[str, WorkError] = {}
        self.timings: dict[str, float] = {}
        self.running: dict[str, bool] = {}

    def run(self) -> None:
        try:
            self.failing.run()
        except WorkError as e:
            self.errors["blocking"] = e
        self.failing.run(fail=False)  # the work is still usable after an error

        t0 = time.monotonic()
        self.blocking.run(0.5)
        self.timings["blocking"] = time.monotonic() - t0
        self.blocking_finished_on_return = self.blocking.finished

        t0 = time.monotonic()
        self.background.run(1.5)
        self.timings["parallel_return"] = time.monotonic() - t0
        self.running["after_start"] = self.background.is_running
        self.finished_before_wait = self.background.finished
        self.background.wait()
        self.timings["parallel_wait"] = time.monotonic() - t0
        self.running["after_wait"] = self.background.is_running
        self.finished_after_wait = self.background.finished

        self.background_failing.run(0.2, fail=True)
        try:
            self.background_failing.wait()
        except WorkError as e:
            self.errors["parallel"] = e


@pytest.fixture(scope="module")
def errors_app(tmp_path_factory):
    return run_app(ErrorsFlow(), tmp_path_factory.mktemp("errors") / "app")


def test_an_exception_in_a_work_reaches_the_flow_as_work_error_with_name_and_remote_traceback(errors_app):
    e = errors_app.errors["blocking"]
    assert isinstance(e, WorkError)
    assert e.work_name == "root.failing"
    assert "ValueError" in e.remote_traceback
    assert "checkpoint 7 is corrupt" in e.remote_traceback
    assert "raise_deep" in e.remote_traceback
    assert "root.failing" in str(e) and "checkpoint 7 is corrupt" in str(e)


def test_a_work_runs_again_after_an_error(errors_app):
    assert errors_app.failing.ran is True


def test_run_blocks_until_the_work_returns(errors_app):
    assert errors_app.timings["blocking"] >= 0.5
    assert errors_app.blocking_finished_on_return is True


def test_parallel_run_returns_at_once_and_is_running_until_it_finishes(errors_app):
    f = errors_app
    assert f.timings["parallel_return"] < 1.0
    assert f.running == {"after_start": True, "after_wait": False}
    assert f.finished_before_wait is False


def test_wait_blocks_until_a_parallel_run_finishes_and_then_its_state_is_seen(errors_app):
    assert errors_app.timings["parallel_wait"] >= 1.5
    assert errors_app.finished_after_wait is True
    assert errors_app.background.finished is True


def test_wait_re_raises_the_error_of_a_parallel_run(errors_app):
    e = errors_app.errors["parallel"]
    assert isinstance(e, WorkError)
    assert e.work_name == "root.background_failing"
    assert "failed in the background" in e.remote_traceback


# ======================================================================================
# A trainer keeps writing checkpoints while a deploy work gets them again and again
# ======================================================================================
CKPT_SIZE = 256 << 10
INPLACE_SIZE = 4 << 20
MAX_VERSIONS = 400  # the trainers write until the flow stops them; this only bounds the disk
STATES_WANTED = 4  # distinct states the deploy work must pick up before it returns


class RenamingTrainer(Work):
    """Adds checkpoint after checkpoint to its folder, each written whole (tmp + rename)."""

    def __init__(self) -> None:
        super().__init__(parallel=True)
        self.checkpoint_dir = "lit://outputs/checkpoints"

    def run(self) -> None:
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        for i in range(MAX_VERSIONS):
            write_atomically(os.path.join(self.checkpoint_dir, f"ckpt_{i:03d}"), versioned(i, CKPT_SIZE))
            time.sleep(0.1)
        time.sleep(600)


class InPlaceTrainer(Work):
    """Overwrites one checkpoint file in place, version after version, while it is served."""

    def __init__(self) -> None:
        super().__init__(parallel=True)
        self.latest = "lit://outputs/latest.ckpt"

    def run(self) -> None:
        os.makedirs(os.path.dirname(self.latest), exist_ok=True)
        write_atomically(os.fspath(self.latest), versioned(0, INPLACE_SIZE))  # whole from the start
        fd = os.open(self.latest, os.O_WRONLY)
        for i in range(1, MAX_VERSIONS):
            data = memoryview(versioned(i, INPLACE_SIZE))  # same size: no truncation
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], done)
            time.sleep(0.1)
        time.sleep(600)


class Deploy(Work):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []

    def run(self, ckpt: Path, kind: str) -> None:
        """get() again and again until STATES_WANTED different states arrived; check each."""
        seen: list[int] = []
        refused = 0
        deadline = time.monotonic() + 60
        while len(set(seen)) < STATES_WANTED and time.monotonic() < deadline:
            if not ckpt.exists_remote():
                time.sleep(0.01)
                continue
            try:
                ckpt.get(overwrite=True)
            except OSError as e:
                # A file that keeps changing while served may make a get give up (detected,
                # never torn): then the local copy must be as it was.
                refused += 1
                self.problems.extend(self._check(ckpt, kind, [], f"after a refused get ({type(e).__name__}: {e})"))
                continue
            self.problems.extend(self._check(ckpt, kind, seen, "after a get"))
        self.seen = seen
        self.refused = refused

    @staticmethod
    def _check(ckpt: Path, kind: str, seen: list[int], when: str) -> list[str]:
        if not os.path.lexists(ckpt):
            return []
        if kind == "folder":
            names = sorted(os.listdir(ckpt))
            if names != [f"ckpt_{i:03d}" for i in range(len(names))]:
                return [f"{when}: not a state the trainer had: {names}"]
            problems = []
            for i, name in enumerate(names):
                try:
                    if version_of((ckpt / name).read_bytes()) != i:
                        problems.append(f"{when}: {name} holds another checkpoint")
                except ValueError as e:
                    problems.append(f"{when}: {name}: {e}")
            if not problems and names:
                seen.append(len(names) - 1)
            return problems
        try:
            seen.append(version_of(FsPath(ckpt).read_bytes()))
        except ValueError as e:
            return [f"{when}: {e}"]
        return []


class LiveFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.renaming = RenamingTrainer()
        self.inplace = InPlaceTrainer()
        self.deploy = Deploy()

    def run(self) -> None:
        self.renaming.run()
        self.deploy.run(self.renaming.checkpoint_dir, "folder")
        self.seen_folder = self.deploy.seen
        self.renaming_running_after_deploy = self.renaming.is_running
        self.renaming.stop()

        self.inplace.run()
        self.deploy.run(self.inplace.latest, "file")
        self.seen_file = self.deploy.seen
        self.refused_file = self.deploy.refused
        self.inplace_running_after_deploy = self.inplace.is_running
        self.inplace.stop()


@pytest.fixture(scope="module")
def live_app(tmp_path_factory):
    return run_app(LiveFlow(), tmp_path_factory.mktemp("live") / "app")


def test_repeated_gets_during_training_each_see_a_state_the_trainer_really_had(live_app):
    assert live_app.deploy.problems == []
    assert live_app.renaming_running_after_deploy


def test_repeated_gets_pick_up_newer_checkpoints_in_order(live_app):
    seen = live_app.seen_folder
    assert len(set(seen)) >= STATES_WANTED, f"only saw {seen} within 60 s"
    assert seen == sorted(seen)


def test_a_file_overwritten_in_place_while_served_arrives_as_one_whole_version(live_app):
    assert live_app.deploy.problems == []
    assert live_app.inplace_running_after_deploy
    seen = live_app.seen_file
    assert len(set(seen)) >= STATES_WANTED, f"only saw {seen} within 60 s ({live_app.refused_file} gets refused)"
    assert seen == sorted(seen)


# ======================================================================================
# stop(), persistence
# ======================================================================================
class Keeper(Work):
    def __init__(self) -> None:
        super().__init__()
        self.checkpoint_dir = "lit://outputs/checkpoints"  # saved as an artifact
        self.log_dir = "outputs/logs"  # a plain string: not saved

    def run(self, die_after_persisting: bool = False) -> None:
        self.pid = os.getpid()
        if die_after_persisting:
            wait_until_persisted(self.name, os.fspath(self.checkpoint_dir))
            os._exit(3)
        os.makedirs(self.checkpoint_dir / "sub", exist_ok=True)
        (self.checkpoint_dir / "model.ckpt").write_bytes(random.Random(5).randbytes(200_000))
        (self.checkpoint_dir / "sub" / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(self.checkpoint_dir / "sub" / "run.sh", 0o755)
        os.symlink("../model.ckpt", self.checkpoint_dir / "sub" / "model_link")
        os.makedirs(self.log_dir, exist_ok=True)
        FsPath(self.log_dir, "train.log").write_text("log")
        self.listing = listing(self.checkpoint_dir)


def wait_until_persisted(work: str, rel: str, timeout: float = 30) -> None:
    """Inside a work: wait until the background persister stored ``rel``. (Test-only peek at
    the artifact store; the public API has no such hook.)"""
    from pathapi.runtime.context import current

    store = current().artifacts
    deadline = time.monotonic() + timeout
    while store.manifest(work, rel) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{rel} of {work} was not persisted within {timeout} s")
        time.sleep(0.02)


class LateReader(Work):
    def run(self, checkpoint_dir: Path, origin: str) -> None:
        self.auto = {"listing": listing(checkpoint_dir) if os.path.lexists(checkpoint_dir) else None,
                     "transfer": transfer_fields(checkpoint_dir)}
        self.exists_remote = checkpoint_dir.exists_remote()
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        checkpoint_dir.get()
        self.manual = listing(checkpoint_dir)
        again = checkpoint_dir
        again.get(overwrite=True)
        self.regot = transfer_fields(again)
        logs = Path("lit://outputs/logs", origin=origin)
        self.logs_exists_remote = logs.exists_remote()
        try:
            logs.get()
        except FileNotFoundError:
            self.logs_get = "FileNotFoundError"
        else:
            self.logs_get = "no error"


class PersistFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.keeper = Keeper()
        self.dying = Keeper()
        self.sleeper = Sleeper(parallel=True)
        self.reader = LateReader()
        self.late_reader = LateReader()
        self.errors: dict[str, str] = {}

    def run(self) -> None:
        # stop() an idle work: it persists, then its process ends
        self.keeper.run()
        self.keeper.stop()
        self.keeper_alive_after_stop = pid_alive(self.keeper.pid)
        try:
            self.keeper.run()
        except WorkError as e:
            self.errors["run_after_stop"] = str(e)
        self.reader.run(self.keeper.checkpoint_dir, "root.keeper")

        # a work that dies (after persisting) is still a source
        self.dying.run()
        try:
            self.dying.run(die_after_persisting=True)
        except WorkError as e:
            self.errors["died"] = str(e)
        self.dying_alive = pid_alive(self.dying.pid)
        self.late_reader.run(self.dying.checkpoint_dir, "root.dying")

        # stop() a running parallel work: its process ends
        self.sleeper.run(0)
        self.sleeper.wait()  # now its pid is in its state
        self.sleeper.run(60)
        time.sleep(0.3)
        t0 = time.monotonic()
        self.sleeper.stop()
        self.stop_seconds = time.monotonic() - t0
        self.sleeper_alive_after_stop = pid_alive(self.sleeper.pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def persist_app(tmp_path_factory):
    base = tmp_path_factory.mktemp("persist")
    cwd = base / "cwd"
    cwd.mkdir()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        flow = run_app(PersistFlow(), base / "app")
    finally:
        os.chdir(old)
    return flow, cwd


def test_stop_ends_the_works_process(persist_app):
    flow, _ = persist_app
    assert flow.keeper_alive_after_stop is False
    assert "stopped" in flow.errors["run_after_stop"]


def test_stop_ends_a_running_parallel_work(persist_app):
    flow, _ = persist_app
    assert flow.sleeper_alive_after_stop is False
    assert flow.stop_seconds < 15


def test_after_the_origin_stopped_run_args_are_transferred_from_the_artifact_store(persist_app):
    flow, _ = persist_app
    assert flow.reader.auto["listing"] == flow.keeper.listing
    assert flow.reader.auto["transfer"]["files"] == 2


def test_after_the_origin_stopped_get_and_exists_remote_use_the_persisted_files(persist_app):
    flow, _ = persist_app
    assert flow.reader.exists_remote is True
    assert flow.reader.manual == flow.keeper.listing
    assert flow.reader.manual["sub/run.sh"][1] is True
    assert flow.reader.manual["sub/model_link"] == ("link", "../model.ckpt")
    assert flow.reader.regot["bytes_transferred"] == 0


def test_plain_strings_are_not_persisted(persist_app):
    flow, _ = persist_app
    assert isinstance(flow.keeper.log_dir, str) and not isinstance(flow.keeper.log_dir, Path)
    assert flow.reader.logs_exists_remote is False
    assert flow.reader.logs_get == "FileNotFoundError"


def test_after_the_origin_died_having_persisted_others_still_get_its_files(persist_app):
    flow, _ = persist_app
    assert "root.dying" in flow.errors["died"]
    assert flow.dying_alive is False
    assert flow.late_reader.auto["listing"] == flow.dying.listing
    assert flow.late_reader.exists_remote is True
    assert flow.late_reader.manual == flow.dying.listing
    assert flow.late_reader.logs_get == "FileNotFoundError"


def test_app_writes_nothing_outside_its_root(persist_app):
    _, cwd = persist_app
    assert os.listdir(cwd) == []


# ======================================================================================
# App(root=None, store=...)
# ======================================================================================
class Writer(Work):
    def __init__(self) -> None:
        super().__init__()
        self.out = "lit://out.txt"

    def run(self) -> None:
        FsPath(self.out).write_text("x")
        self.cwd = os.getcwd()


class WriterFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.writer = Writer()

    def run(self) -> None:
        self.writer.run()


def test_app_root_defaults_to_dot_pathapi_and_store_can_be_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flow = WriterFlow()
    store = tmp_path / "store"
    App(flow, store=store).run()
    assert flow.writer.cwd == str(tmp_path.resolve() / ".pathapi" / "works" / "root.writer")
    assert (tmp_path / ".pathapi" / "works" / "root.writer" / "out.txt").read_text() == "x"
    assert any(p.is_file() for p in store.rglob("*"))  # the Path was persisted there
    assert not (tmp_path / ".pathapi" / "artifacts").exists()


class Fetcher(Work):
    def run(self, out: Path) -> None:
        self.text = FsPath(out).read_text()
        self.exists_remote = out.exists_remote()


class StoreFlow(WriterFlow):
    def __init__(self) -> None:
        super().__init__()
        self.fetcher = Fetcher()

    def run(self) -> None:
        self.writer.run()
        self.writer.stop()
        self.fetcher.run(self.writer.out)


def test_a_store_folder_given_to_the_app_keeps_paths_after_the_origin_stopped(tmp_path):
    flow = StoreFlow()
    store = tmp_path / "elsewhere" / "store"
    App(flow, root=tmp_path / "app", store=store).run()
    assert flow.fetcher.text == "x"
    assert flow.fetcher.exists_remote is True
    assert any((store / "refs").iterdir())  # persisted where the app was told, not under its root
    assert not (tmp_path / "app" / "artifacts").exists()


# ======================================================================================
# The original page's examples, with only their imports changed
# ======================================================================================
class SourceWork(LightningWork):
    def __init__(self):
        super().__init__()
        self.checkpoint_dir = None

    def run(self):
        # Normally you would do:
        # self.checkpoint_dir = "outputs/checkpoints"
        # os.makedirs("outputs/checkpoints")
        # ...

        # In Lightning, do:
        self.checkpoint_dir = "lit://outputs/checkpoints"
        os.makedirs(self.checkpoint_dir)
        ...


class DestinationWork(LightningWork):
    def run(self, checkpoint_dir):
        # The directory is now accessible inside this Work
        files = os.listdir(checkpoint_dir)
        ...


class PageFlow(LightningFlow):  # "Flow" on the page
    def __init__(self):
        super().__init__()
        self.source = SourceWork()
        self.destination = DestinationWork()

    def run(self):
        self.source.run()
        # Pass the Path reference from one work to another
        self.destination.run(self.source.checkpoint_dir)


class PersistWork(LightningWork):  # "Work" on the page
    def __init__(self):
        super().__init__()
        # The files in this path will be saved as an artifact when the Work finishes
        self.checkpoint_dir = "lit://outputs/checkpoints"

        # The files in this path WON'T be saved because it is not declared as a Lightning Path
        self.log_dir = "outputs/logs"


# The page's checkpoint example saves with torch, which is not a dependency: a stand-in with
# the same calls. The page's two slips are fixed (``self.model_checkpoints_path`` for
# ``self.checkpoint_dir``, and ``torch.load`` of a bare file name, relative to the wrong folder).
torch = types.SimpleNamespace(
    tensor=list,
    save=lambda obj, path: FsPath(path).write_bytes(pickle.dumps(obj)),
    load=lambda path: pickle.loads(FsPath(path).read_bytes()),
)


class ModelTraining(LightningWork):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_dir = "lit://outputs/checkpoints"

    def run(self):
        # create a directory
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        # make fake checkpoints
        checkpoint_1 = torch.tensor([0, 1, 2, 3, 4])
        checkpoint_2 = torch.tensor([0, 1, 2, 3, 4])
        torch.save(checkpoint_1, os.path.join(self.checkpoint_dir, "checkpoint_1.ckpt"))
        torch.save(checkpoint_2, os.path.join(self.checkpoint_dir, "checkpoint_2.ckpt"))


class ModelDeploy(LightningWork):
    def __init__(self, *args, **kwargs):
        super().__init__()

    def run(self, checkpoint_dir):
        ckpts = os.listdir(checkpoint_dir)
        checkpoint_1 = torch.load(os.path.join(checkpoint_dir, ckpts[0]))
        checkpoint_2 = torch.load(os.path.join(checkpoint_dir, ckpts[1]))


class CheckpointFlow(LightningFlow):  # "Flow" on the page
    def __init__(self):
        super().__init__()
        self.train = ModelTraining()

        # pass the checkpoint path
        self.deploy = ModelDeploy()

    def run(self):
        self.train.run()
        self.deploy.run(checkpoint_dir=self.train.checkpoint_dir)


def test_lightning_aliases_are_the_pathapi_classes():
    assert (LightningWork, LightningFlow, LightningApp) == (Work, Flow, App)


def test_page_example_source_to_destination_runs_unchanged(tmp_path):
    flow = PageFlow()
    LightningApp(flow, root=tmp_path / "app").run()
    assert isinstance(flow.source.checkpoint_dir, Path)
    assert flow.source.checkpoint_dir.origin_name == "root.source"
    assert (tmp_path / "app" / "works" / "root.destination" / "outputs" / "checkpoints").is_dir()


def test_page_example_persist_declares_one_path_and_one_plain_string():
    w = PersistWork()
    assert isinstance(w.checkpoint_dir, Path)
    assert type(w.log_dir) is str


def test_page_example_model_checkpoint_runs(tmp_path):
    flow = CheckpointFlow()
    LightningApp(flow, root=tmp_path / "app").run()
    got = tmp_path / "app" / "works" / "root.deploy" / "outputs" / "checkpoints"
    assert sorted(os.listdir(got)) == ["checkpoint_1.ckpt", "checkpoint_2.ckpt"]
    assert torch.load(got / "checkpoint_1.ckpt") == [0, 1, 2, 3, 4]
