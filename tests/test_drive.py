"""SPEC "Drive": ``Drive("lit://name")`` with the original API's put, list, get and delete,
kept in the app's artifact store on the CAS.

Semantics about works (ownership, flows refused, outliving the app run, concurrent works)
run real apps; the rest drives the API in this process as one work or another (a
``WorkContext`` set by hand, as a work's process has one), so that many cases stay cheap.
Kills are SIGKILL of real child processes (tests/_drive_child.py). Nothing asserts a
duration, except that a get with a timeout waited at least that long before giving up.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path as FsPath

import pytest
from _drive_child import version_of, versioned
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trees import File, read_tree, write_tree

from cas.errors import ManifestError, UnsupportedVersionError
from cas.workspace import Workspace
from pathapi import (
    App,
    Drive,
    DriveAmbiguousError,
    DriveDuplicateError,
    DriveFileNotFoundError,
    DriveNameError,
    DriveTimeoutError,
    Flow,
    Work,
)
from pathapi.artifacts import ArtifactStore
from pathapi.drive import drive_entries, drive_ref, is_drive_ref, list_drives, read_drive
from pathapi.driveindex import DriveIndex
from pathapi.runtime.context import WorkContext, current, set_current
from pathapi.version import Version

CHILD = FsPath(__file__).with_name("_drive_child.py")
ROOT = FsPath(__file__).resolve().parents[1]


# -- one process playing several works ---------------------------------------------------
class Bench:
    """An artifact store (an app root's, or S3) and works that use it from this process."""

    def __init__(self, base: FsPath, url: str | None = None) -> None:
        self.base = base
        self.url = url
        self.store = ArtifactStore.open(url, base / "app")
        self.works: dict[str, WorkContext] = {}

    def work(self, name: str) -> WorkContext:
        if name not in self.works:
            root = self.base / "works" / name
            root.mkdir(parents=True, exist_ok=True)
            self.works[name] = WorkContext(name, str(root), Workspace(self.base / "state" / name), self.store,
                                           "secret", 30.0, in_run=True)
        return self.works[name]

    def root(self, name: str) -> FsPath:
        return FsPath(self.work(name).root)

    @contextmanager
    def as_work(self, name: str) -> Iterator[FsPath]:
        before = current()
        set_current(self.work(name))
        try:
            yield self.root(name)
        finally:
            set_current(before)

    def chunk_count(self) -> int:
        return sum(1 for _ in self.store.chunks.iter_ids())

    def close(self) -> None:
        for ctx in self.works.values():
            ctx.workspace.close()
        self.store.close()


@pytest.fixture
def bench(tmp_path: FsPath) -> Iterator[Bench]:
    b = Bench(tmp_path)
    yield b
    b.close()


def write(root: FsPath, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


# ======================================================================================
# Names
# ======================================================================================
@pytest.mark.parametrize("text", ["lit://a/b", "drive", "s3://bucket/x", "lit://", "lit://..", "/abs", "lit://a/"])
def test_a_name_with_a_slash_or_without_lit_is_refused(text: str) -> None:
    with pytest.raises(DriveNameError) as e:
        Drive(text)
    assert isinstance(e.value, ValueError) and repr(text) in str(e.value)


def test_a_drive_is_named_by_what_follows_lit_and_pickles() -> None:
    import pickle

    d = Drive("lit://checkpoints", allow_duplicates=True)
    assert (d.id, str(d), d.allow_duplicates, d.component_name) == ("checkpoints", "checkpoints", True, None)
    back = pickle.loads(pickle.dumps(d))
    assert back == d and back.allow_duplicates


def test_inside_a_work_the_running_work_is_the_drives_component(bench: Bench) -> None:
    d = Drive("lit://d", component_name="root.someone")  # the original's argument is taken
    assert d.component_name == "root.someone"
    with bench.as_work("root.me") as root:
        assert d.component_name == "root.me"  # but a work only ever puts as itself
        write(root, "f.txt", b"f")
        d.put("f.txt")
        assert [e.component for e in d.entries()] == ["root.me"]


# ======================================================================================
# put / list / get / delete, in one process
# ======================================================================================
def test_put_then_list_shows_files_across_components_or_of_one(bench: Bench) -> None:
    d = Drive("lit://shared")
    with bench.as_work("root.a") as root:
        assert d.list() == []
        write(root, "a.txt", b"Hello World !")
        write_tree(root / "data", {"x.bin": File(b"x" * 10), "sub/y.bin": File(b"y" * 20)})
        d.put("a.txt")
        d.put("data")
    with bench.as_work("root.b") as root:
        write(root, "b.txt", b"from b")
        d.put("lit://b.txt")  # a lit:// spelling names the same place
        assert d.list() == ["a.txt", "data", "b.txt"]  # by component, then path
        assert d.list(".", component_name="root.a") == ["a.txt", "data"]
        assert d.list(component_name="root.b") == ["b.txt"]
        assert d.list(component_name="root.nobody") == []
        assert d.list("data") == ["data/sub", "data/x.bin"]
        assert d.list("data/sub") == ["data/sub/y.bin"]
        assert d.list("a.txt") == ["a.txt"]  # a file lists as itself
        assert d.list("missing") == []
        kinds = {(e.component, e.path): (e.kind, e.size, e.files) for e in d.entries()}
        assert kinds == {("root.a", "a.txt"): ("file", 13, 1), ("root.a", "data"): ("dir", 30, 2),
                         ("root.b", "b.txt"): ("file", 6, 1)}


def test_a_put_of_a_path_another_component_put_is_refused_unless_allow_duplicates(bench: Bench) -> None:
    strict, relaxed = Drive("lit://d"), Drive("lit://d", allow_duplicates=True)
    with bench.as_work("root.a") as root:
        write(root, "same.txt", b"a's")
        write(root, "folder/one.txt", b"1")
        strict.put("same.txt")
        strict.put("folder")
        strict.put("same.txt")  # a component may replace its own files
    with bench.as_work("root.b") as root:
        write(root, "same.txt", b"b's")
        write(root, "folder/two.txt", b"2")
        before = bench.chunk_count()
        with pytest.raises(DriveDuplicateError) as e:
            strict.put("same.txt")
        assert isinstance(e.value, FileExistsError) and "root.a" in str(e.value)
        with pytest.raises(DriveDuplicateError):
            strict.put("folder")
        assert bench.chunk_count() == before  # refused before any chunk moved
        strict.put("folder/two.txt")  # not a path root.a put (only a folder above it)
        relaxed.put("same.txt")
        assert strict.list() == ["folder", "same.txt", "folder", "same.txt"]
        assert strict.list("folder") == ["folder/one.txt", "folder/two.txt"]


def test_get_of_a_path_several_components_put_raises_and_component_name_chooses(bench: Bench) -> None:
    d = Drive("lit://d", allow_duplicates=True)
    for name in ("root.a", "root.b"):
        with bench.as_work(name) as root:
            write(root, "f.txt", name.encode())
            d.put("f.txt")
    with bench.as_work("root.c") as root:
        with pytest.raises(DriveAmbiguousError) as e:
            d.get("f.txt")
        assert "root.a" in str(e.value) and "root.b" in str(e.value) and isinstance(e.value, LookupError)
        assert not (root / "f.txt").exists()
        d.get("f.txt", component_name="root.b")
        assert (root / "f.txt").read_bytes() == b"root.b"


def test_get_of_a_missing_file_raises_file_not_found(bench: Bench) -> None:
    d = Drive("lit://d")
    with bench.as_work("root.a") as root:
        write(root, "here.txt", b"x")
        d.put("here.txt")
    with bench.as_work("root.b") as root:
        with pytest.raises(FileNotFoundError):
            d.get("nothing.txt")
        with pytest.raises(FileNotFoundError):
            d.get("here.txt", component_name="root.b")
        with pytest.raises(FileNotFoundError):
            d.put("not-here.txt")
        assert not (root / "nothing.txt").exists()


def test_get_lands_a_folder_exactly_and_a_file_at_a_sub_path(bench: Bench) -> None:
    tree = {"w.bin": File(random.Random(1).randbytes(700_000)), "run.sh": File(b"#!/bin/sh\n", executable=True),
            "deep/er/n.txt": File(b"n", mode=0o600)}
    d = Drive("lit://d")
    with bench.as_work("root.a") as root:
        write_tree(root / "ckpt", tree)
        d.put("ckpt")
    with bench.as_work("root.b") as root:
        d.get("ckpt")
        assert read_tree(root / "ckpt") == read_tree(bench.root("root.a") / "ckpt")
        d.get("ckpt/deep/er/n.txt", overwrite=True)
        assert (root / "ckpt" / "deep" / "er" / "n.txt").read_bytes() == b"n"


def test_get_never_overwrites_a_local_file_unless_overwrite(bench: Bench) -> None:
    d = Drive("lit://d")
    with bench.as_work("root.a") as root:
        write(root, "m.bin", b"the drive's")
        d.put("m.bin")
    with bench.as_work("root.b") as root:
        write(root, "m.bin", b"mine")
        with pytest.raises(FileExistsError):
            d.get("m.bin")
        assert (root / "m.bin").read_bytes() == b"mine"
        d.get("m.bin", overwrite=True)
        assert (root / "m.bin").read_bytes() == b"the drive's"


def test_delete_removes_the_works_own_files_only(bench: Bench) -> None:
    d = Drive("lit://d", allow_duplicates=True)
    with bench.as_work("root.a") as root:
        write(root, "a.txt", b"a")
        write(root, "both.txt", b"a")
        write(root, "dir/x/y.txt", b"y")
        for rel in ("a.txt", "both.txt", "dir"):
            d.put(rel)
    with bench.as_work("root.b") as root:
        write(root, "both.txt", b"b")
        d.put("both.txt")
        with pytest.raises(DriveFileNotFoundError) as e:
            d.delete("a.txt")
        assert "root.a" in str(e.value)
        d.delete("both.txt")
        assert d.list() == ["a.txt", "both.txt", "dir"]
    with bench.as_work("root.a"):
        d.delete("dir/x/y.txt")  # the folders it leaves empty go with it
        d.delete("a.txt")
        assert d.list() == ["both.txt"]
        d.delete("both.txt")
        assert d.list() == []
        with pytest.raises(FileNotFoundError):
            d.delete("both.txt")
    assert read_drive(bench.store, "d").spaces == {}


def test_get_with_a_timeout_waits_past_a_second_then_raises(bench: Bench) -> None:
    d = Drive("lit://d")
    with bench.as_work("root.b"):
        t0 = time.monotonic()
        with pytest.raises(DriveTimeoutError) as e:
            d.get("late.txt", timeout=2.5)
        assert time.monotonic() - t0 >= 2.5  # the original gave up after about 1 s
        assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, TimeoutError)


def test_get_with_a_timeout_returns_the_file_once_another_process_puts_it(bench: Bench) -> None:
    d = Drive("lit://d")
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(bench.base / "app"), "root.late", str(bench.base / "works" / "root.late"),
         str(bench.base / "state" / "root.late"), "later", "d", "late.bin", "1.5"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with bench.as_work("root.b") as root:
            d.get("late.bin", timeout=120)
            assert version_of((root / "late.bin").read_bytes()) == 1
        assert child.stdout.readline().strip() == "put"  # it was put, then fetched
    finally:
        child.kill()
        child.wait()


def test_flows_and_code_outside_a_run_may_not_use_a_drive(bench: Bench) -> None:
    d = Drive("lit://d")
    calls = [lambda: d.put("a"), lambda: d.list(), lambda: d.get("a"), lambda: d.delete("a"), lambda: d.entries()]
    for call in calls:
        with pytest.raises(RuntimeError, match="inside a work's run"):
            call()


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", ".", "a/../../b"])
def test_a_path_outside_the_works_root_is_refused(bench: Bench, rel: str) -> None:
    d = Drive("lit://d")
    with bench.as_work("root.a"):
        for call in (lambda: d.put(rel), lambda: d.get(rel), lambda: d.delete(rel)):
            with pytest.raises(ValueError):
                call()


# ======================================================================================
# On the CAS: chunks, sharing with Paths, garbage collection, the index
# ======================================================================================
def test_an_unchanged_put_moves_no_chunk_and_a_changed_one_only_new_chunks(bench: Bench) -> None:
    d = Drive("lit://d")
    big = bytearray(random.Random(7).randbytes(3 << 20))
    with bench.as_work("root.a") as root:
        write(root, "w.bin", bytes(big))
        d.put("w.bin")
        stored, index = bench.chunk_count(), bench.store.refs.get(drive_ref("d"))
        assert stored > 4
        d.put("w.bin")
        assert bench.chunk_count() == stored
        assert bench.store.refs.get(drive_ref("d")) == index  # nothing rewritten at all
        big[100:120] = b"\xff" * 20  # one chunk changes
        write(root, "w.bin", bytes(big))
        d.put("w.bin")
        assert bench.chunk_count() == stored + 1


def test_a_drive_shares_chunks_with_persisted_paths(bench: Bench) -> None:
    ctx = bench.work("root.a")
    write(bench.root("root.a"), "ckpt/model.bin", random.Random(3).randbytes(2 << 20))
    bench.store.persist_in_root("root.a", "ckpt", ctx.root, ctx.workspace, version=Version(1, 1, Version.ENDED))
    stored = bench.chunk_count()
    with bench.as_work("root.a"):
        Drive("lit://d").put("ckpt")
    assert bench.chunk_count() == stored


def test_gc_after_drive_puts_keeps_every_chunk_the_drive_needs(bench: Bench) -> None:
    d = Drive("lit://d")
    with bench.as_work("root.a") as root:
        for v in (1, 2, 3):  # two replaced versions leave garbage behind
            write(root, "v.bin", versioned(v, 1 << 20))
            d.put("v.bin")
        write_tree(root / "folder", {"k.bin": File(random.Random(4).randbytes(900_000))})
        d.put("folder")
    index = read_drive(bench.store, "d")
    report = bench.store.gc(min_garbage=0.0)
    assert report.deleted_chunks > 0
    assert set(bench.store.chunks.iter_ids()) == index.chunk_ids()
    with bench.as_work("root.b") as root:
        d.get("v.bin")
        d.get("folder")
        assert version_of((root / "v.bin").read_bytes()) == 3
        assert read_tree(root / "folder") == read_tree(bench.root("root.a") / "folder")


def test_list_is_one_read_of_the_drives_index_ref(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Drive("lit://d")
    with bench.as_work("root.a") as root:
        for i in range(5):
            write(root, f"f{i}", b"x")
            d.put(f"f{i}")
        for i in range(20):  # other refs in the store are not read
            bench.store.refs.put(f"root.a/other{i}", b"not a manifest")
        seen: list[str] = []
        refs = bench.store.refs
        real_get, real_names = refs.get, refs.names
        monkeypatch.setattr(refs, "get", lambda name: seen.append(f"get {name}") or real_get(name))
        monkeypatch.setattr(refs, "names", lambda prefix="": seen.append(f"names {prefix}") or real_names(prefix))
        assert d.list() == [f"f{i}" for i in range(5)]
        assert seen == [f"get {drive_ref('d')}"]


def test_the_read_api_lists_drives_without_a_running_work(bench: Bench) -> None:
    with bench.as_work("root.a") as root:
        write(root, "x.bin", b"x" * 100)
        Drive("lit://one").put("x.bin")
        Drive("lit://two").put("x.bin")
    bench.store.refs.put("root.a/path", b"")  # a persisted Path's ref is no drive
    assert list_drives(bench.store) == ["one", "two"]
    assert is_drive_ref(drive_ref("one")) and not is_drive_ref("root.a/path")
    entries = drive_entries(read_drive(bench.store, "one"))
    assert [(e.component, e.path, e.kind, e.size) for e in entries] == [("root.a", "x.bin", "file", 100)]
    assert read_drive(bench.store, "never").spaces == {}


def test_the_index_refuses_damage_and_unknown_versions(bench: Bench) -> None:
    with bench.as_work("root.a") as root:
        write(root, "x.bin", b"x")
        Drive("lit://d").put("x.bin")
    raw = bench.store.refs.get(drive_ref("d"))
    assert raw is not None and raw[:4] == b"PDRV"
    assert DriveIndex.decode(raw).encode() == raw
    for bad in (raw[:-1], raw + b"\0", raw[:10], b"XXXX" + raw[4:]):
        with pytest.raises(ManifestError):
            DriveIndex.decode(bad)
    with pytest.raises(UnsupportedVersionError):
        DriveIndex.decode(raw[:4] + (2).to_bytes(2, "little") + raw[6:])


# ======================================================================================
# Concurrency and kills
# ======================================================================================
def start_child(base: FsPath, store: str, name: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), store, name, str(base / "works" / name), str(base / "state" / name), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def put_concurrently(base: FsPath, store: str, count: int) -> None:
    """Two processes put ``count`` files each into drive ``d``, released at the same moment."""
    kids = [start_child(base, store, f"root.w{k}", "puts", "d", f"w{k}", str(count)) for k in range(2)]
    try:
        for kid in kids:
            assert kid.stdout is not None and kid.stdout.readline().strip() == "ready", kid.stderr.read()  # type: ignore[union-attr]
        for kid in kids:
            assert kid.stdin is not None
            kid.stdin.write("go\n")
            kid.stdin.flush()
        for kid in kids:
            out, err = kid.communicate(timeout=300)
            assert kid.returncode == 0 and out.strip() == "done", err
    finally:
        for kid in kids:
            kid.kill()


def test_two_processes_putting_at_once_lose_none_of_each_others_entries(bench: Bench) -> None:
    put_concurrently(bench.base, str(bench.base / "app"), 25)
    index = read_drive(bench.store, "d")
    assert sorted(index.spaces) == ["root.w0", "root.w1"]
    for k in range(2):
        names = {e.path for e in index.spaces[f"root.w{k}"].manifest.files()}
        assert names == {f"w{k}/f{i}.bin" for i in range(25)}
    assert not bench.store.leases.live()  # every mutex and lease given back


def test_a_put_killed_at_any_instant_leaves_the_old_entry_or_the_new_one(bench: Bench) -> None:
    rng = random.Random(11)
    store = str(bench.base / "app")
    done = 0  # the newest version a child reported as put
    for round_ in range(6):
        kid = start_child(bench.base, store, "root.writer", "versions", "d", "ckpt/model.bin", str(done + 1), "50")
        delay = rng.uniform(0.2, 2.0)  # the child's imports take part of it
        timer = threading.Timer(delay, kid.kill)
        timer.start()
        out, _ = kid.communicate(timeout=300)
        timer.cancel()
        assert kid.returncode != 0, "the child finished before it was killed: kill sooner"
        reported = [int(x) for x in out.split()[1::2]]
        done = max([done, *reported])
        index = read_drive(bench.store, "d")  # decodes, and names only chunks that are stored
        assert bench.store.chunks.has_many(index.chunk_ids()) == index.chunk_ids()
        with bench.as_work("root.reader") as root:
            listed = Drive("lit://d").list("ckpt")
            if done == 0 and not listed:
                continue  # killed before its first put finished: nothing is visible, nothing half
            assert listed == ["ckpt/model.bin"], f"round {round_}"
            Drive("lit://d").get("ckpt/model.bin", overwrite=True)
            got = version_of((root / "ckpt" / "model.bin").read_bytes())  # whole, never torn
            assert got in (done, done + 1), f"round {round_}: got version {got}, {done} was the last put"
    assert done > 0, "no put finished in any round: kill later"


def test_a_put_killed_holding_the_mutex_leaves_the_old_entry_and_blocks_no_one(bench: Bench) -> None:
    d = Drive("lit://d")
    with bench.as_work("root.writer") as root:
        write(root, "ckpt/model.bin", versioned(1))
        d.put("ckpt/model.bin")
    kid = start_child(bench.base, str(bench.base / "app"), "root.writer", "die-in-swap", "d", "ckpt/model.bin", "2")
    out, err = kid.communicate(timeout=120)
    assert kid.returncode == -9 and out.strip() == "in swap", err
    assert bench.store.leases.all("mutex"), "the dead holder's mutex record is still there"
    with bench.as_work("root.reader") as root:
        d.get("ckpt/model.bin")
        assert version_of((root / "ckpt" / "model.bin").read_bytes()) == 1  # the old entry, whole
    with bench.as_work("root.writer") as root:
        write(root, "ckpt/model.bin", versioned(3))
        d.put("ckpt/model.bin")  # a holder dead on this host does not count: no wait for its TTL
    with bench.as_work("root.reader") as root:
        d.get("ckpt/model.bin", overwrite=True)
        assert version_of((root / "ckpt" / "model.bin").read_bytes()) == 3


class Putter(Work):
    """Puts files into the Drive until it has put ``count`` and seen the other work's too,
    so the two works' puts overlap."""

    def __init__(self, tag: str, other: str, count: int) -> None:
        super().__init__(parallel=True)
        self.drive = Drive("lit://together")
        self.tag, self.other, self.count = tag, other, count
        self.put = 0
        self.saw_other_while_putting = False

    def run(self) -> None:
        while self.put < 300 and (self.put < self.count or not self.saw_other_while_putting):
            rel = f"{self.tag}/f{self.put}.txt"
            os.makedirs(self.tag, exist_ok=True)
            with open(rel, "w") as f:
                f.write(f"{self.tag} {self.put}")
            self.drive.put(rel)
            self.put += 1
            if self.drive.list(".", component_name=self.other):
                self.saw_other_while_putting = True


class TwoPutters(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.a = Putter("a", "root.b", 15)
        self.b = Putter("b", "root.a", 15)

    def run(self) -> None:
        self.a.run()
        self.b.run()
        self.a.wait()
        self.b.wait()


def test_two_works_putting_at_once_lose_none_of_each_others_entries(tmp_path: FsPath) -> None:
    flow = TwoPutters()
    App(flow, root=tmp_path).run()
    assert flow.a.saw_other_while_putting and flow.b.saw_other_while_putting
    store = ArtifactStore.open(None, tmp_path)
    index = read_drive(store, "together")
    store.close()
    for work, tag in ((flow.a, "a"), (flow.b, "b")):
        names = {e.path for e in index.spaces[f"root.{tag}"].manifest.files()}
        assert names == {f"{tag}/f{i}.txt" for i in range(work.put)}


# ======================================================================================
# A model of put/delete/list, checked by hypothesis
# ======================================================================================
COMPONENTS = ["root.a", "root.b"]
NAMES = ["a.txt", "b.bin", "d", "d/x.txt", "d/e/y.bin"]
OPS = st.lists(
    st.tuples(st.sampled_from(["put", "put", "delete"]), st.sampled_from(COMPONENTS), st.sampled_from(NAMES),
              st.integers(0, 3)),
    max_size=12,
)


def local_files(component: str, rel: str, seed: int) -> dict[str, bytes]:
    """What ``component`` has at ``rel`` before it puts it (``d`` is always a folder)."""
    def data(path: str) -> bytes:
        size = 100_000 if seed == 3 else 10
        return random.Random(f"{component}{path}{seed}").randbytes(size)

    if rel == "d":
        return {"d/x.txt": data("d/x.txt"), "d/e/y.bin": data("d/e/y.bin")}
    return {rel: data(rel)}


def under(path: str, rel: str) -> bool:
    return path == rel or path.startswith(rel + "/")


def model_listing(model: dict[str, dict[str, bytes]], path: str, component: str | None) -> list[str]:
    out = []
    for comp in sorted(model):
        if component not in (None, comp):
            continue
        files = model[comp]
        if path in files:
            out.append(path)
            continue
        prefix = "" if path == "." else path + "/"
        out += sorted({prefix + f[len(prefix):].split("/")[0] for f in files if f.startswith(prefix)})
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, allow_duplicates=st.booleans())
def test_list_matches_a_model_of_puts_and_deletes(tmp_path_factory: pytest.TempPathFactory,
                                                  ops: list[tuple[str, str, str, int]], allow_duplicates: bool) -> None:
    b = Bench(tmp_path_factory.mktemp("model"))
    d = Drive("lit://m", allow_duplicates=allow_duplicates)
    model: dict[str, dict[str, bytes]] = {}
    try:
        for op, comp, rel, seed in ops:
            mine = model.get(comp, {})
            others = [c for c in model if c != comp and any(under(f, rel) for f in model[c])]
            with b.as_work(comp) as root:
                if op == "put":
                    if rel == "d":
                        shutil.rmtree(root / "d", ignore_errors=True)
                    files = local_files(comp, rel, seed)
                    for path, data in files.items():
                        write(root, path, data)
                    if others and not allow_duplicates:
                        with pytest.raises(DriveDuplicateError):
                            d.put(rel)
                    else:
                        d.put(rel)
                        model[comp] = {f: v for f, v in mine.items() if not under(f, rel)} | files
                elif any(under(f, rel) for f in mine):
                    d.delete(rel)
                    model[comp] = {f: v for f, v in mine.items() if not under(f, rel)}
                else:
                    with pytest.raises(FileNotFoundError):
                        d.delete(rel)
                model = {c: f for c, f in model.items() if f}
            with b.as_work("root.reader") as root:
                for component in (None, *COMPONENTS):
                    assert d.list(".", component) == model_listing(model, ".", component)
                assert d.list("d") == model_listing(model, "d", None)
                holders = [c for c in sorted(model) if any(under(f, rel) for f in model[c])]
                if len(holders) > 1:
                    with pytest.raises(DriveAmbiguousError):
                        d.get(rel, overwrite=True)
                elif not holders:
                    with pytest.raises(FileNotFoundError):
                        d.get(rel, overwrite=True)
                else:
                    d.get(rel, overwrite=True)
                    want = {f: v for f, v in model[holders[0]].items() if under(f, rel)}
                    assert {f: (root / f).read_bytes() for f in want} == want
                    if rel == "d":
                        got = {str(p.relative_to(root)) for p in (root / "d").rglob("*") if p.is_file()}
                        assert got == set(want)
    finally:
        b.close()


# ======================================================================================
# Real apps: ownership, flows, outliving the app run
# ======================================================================================
class Writer(Work):
    def __init__(self) -> None:
        super().__init__()
        self.own = Drive("lit://own")
        self.component = ""
        self.listed: list[str] = []

    def run(self, drive: Drive) -> None:
        with open("a.txt", "w") as f:
            f.write("Hello World !")
        os.makedirs("data", exist_ok=True)
        with open("data/x.txt", "w") as f:
            f.write("x")
        drive.put("a.txt")
        drive.put("data")
        self.own.put("a.txt")
        os.remove("a.txt")
        self.component = str(self.own.component_name)
        self.listed = drive.list()


class Reader(Work):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, object] = {}

    def run(self, drive: Drive) -> None:
        seen = self.seen
        seen["exists_before"] = os.path.exists("a.txt")
        seen["list"] = drive.list(".")
        seen["list_writer"] = drive.list(".", component_name="root.writer")
        seen["list_me"] = drive.list(".", component_name="root.reader")
        drive.get("a.txt")
        seen["a"] = open("a.txt").read()
        drive.get("data")
        seen["data"] = sorted(os.listdir("data"))
        for what, call in (("delete", lambda: drive.delete("a.txt")), ("put", lambda: drive.put("a.txt")),
                           ("missing", lambda: drive.get("missing.txt"))):
            try:
                call()
                seen[what] = "no error"
            except Exception as e:
                seen[what] = type(e).__name__


class DriveFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.drive = Drive("lit://drive_1")
        self.writer = Writer()
        self.reader = Reader()
        self.flow_error = ""

    def run(self) -> None:
        try:
            self.drive.list()
        except RuntimeError as e:
            self.flow_error = str(e)
        self.writer.run(self.drive)
        self.reader.run(self.drive)


class LaterReader(Work):
    def __init__(self) -> None:
        super().__init__()
        self.a = ""

    def run(self) -> None:
        Drive("lit://drive_1").get("a.txt", component_name="root.writer")
        self.a = open("a.txt").read()


class LaterFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.later = LaterReader()

    def run(self) -> None:
        self.later.run()


@pytest.fixture(scope="module")
def drive_app(tmp_path_factory: pytest.TempPathFactory) -> tuple[DriveFlow, FsPath]:
    root = tmp_path_factory.mktemp("drive-app")
    flow = DriveFlow()
    App(flow, root=root).run()
    return flow, root


def test_a_drive_held_by_a_work_belongs_to_that_work(drive_app: tuple[DriveFlow, FsPath]) -> None:
    flow, _ = drive_app
    assert flow.writer.component == "root.writer"
    assert flow.writer.own.component_name == "root.writer"  # seen from the flow too
    assert flow.writer.listed == ["a.txt", "data"]


def test_works_share_files_through_a_drive_the_flow_passes_them(drive_app: tuple[DriveFlow, FsPath]) -> None:
    seen = drive_app[0].reader.seen
    assert seen["exists_before"] is False
    assert seen["list"] == ["a.txt", "data"] and seen["list_writer"] == ["a.txt", "data"] and seen["list_me"] == []
    assert seen["a"] == "Hello World !" and seen["data"] == ["x.txt"]
    assert seen["delete"] == "DriveFileNotFoundError"  # not the reader's to delete
    assert seen["put"] == "DriveDuplicateError"  # root.writer put a.txt
    assert seen["missing"] == "DriveFileNotFoundError"


def test_a_flow_may_not_use_a_drive(drive_app: tuple[DriveFlow, FsPath]) -> None:
    assert "inside a work's run" in drive_app[0].flow_error


def test_a_drive_outlives_the_works_and_the_app_run(drive_app: tuple[DriveFlow, FsPath]) -> None:
    _, root = drive_app
    flow = LaterFlow()
    App(flow, root=root).run()
    assert flow.later.a == "Hello World !"
    store = ArtifactStore.open(None, root)
    assert list_drives(store) == ["drive_1", "own"]
    store.close()


# ======================================================================================
# S3
# ======================================================================================
@pytest.fixture
def s3_bench(s3_server: object, tmp_path: FsPath) -> Iterator[Bench]:
    from s3server import aws_env
    from test_store_s3 import BUCKET

    with aws_env(s3_server.env()):  # type: ignore[attr-defined]
        b = Bench(tmp_path, f"s3://{BUCKET}/drive-{secrets.token_hex(4)}")
        yield b
        b.close()


def test_a_drive_on_s3_puts_lists_gets_deletes_and_survives_gc(s3_bench: Bench) -> None:
    b = s3_bench
    d = Drive("lit://s3drive")
    with b.as_work("root.a") as root:
        write(root, "w.bin", random.Random(5).randbytes(2 << 20))
        d.put("w.bin")
        stored = b.chunk_count()
        d.put("w.bin")
        assert b.chunk_count() == stored  # an unchanged put moves nothing
        write(root, "gone.bin", b"soon deleted")
        d.put("gone.bin")
        d.delete("gone.bin")
    assert b.store.gc(min_garbage=0.0).deleted_chunks == 1
    with b.as_work("root.b") as root:
        assert d.list() == ["w.bin"]
        d.get("w.bin")
        assert (root / "w.bin").read_bytes() == (b.root("root.a") / "w.bin").read_bytes()
    assert list_drives(b.store) == ["s3drive"]


def test_two_processes_putting_at_once_on_s3_lose_nothing(s3_bench: Bench) -> None:
    assert s3_bench.url is not None
    put_concurrently(s3_bench.base, s3_bench.url, 10)
    index = read_drive(s3_bench.store, "d")
    assert {c: len(list(s.manifest.files())) for c, s in index.spaces.items()} == {"root.w0": 10, "root.w1": 10}


# ======================================================================================
# The example, through the command line
# ======================================================================================
def test_the_drive_example_runs_and_its_file_outlives_the_run(tmp_path: FsPath) -> None:
    from test_examples import run_example

    out, works = run_example("drive", tmp_path)
    assert out.splitlines()[:4] == ["['a.txt']", "False", "True", "Hello World !"]
    assert (works / "root.work_2" / "a.txt").read_text() == "Hello World !"
    assert not (works / "root.work_1" / "a.txt").exists()
    store = ArtifactStore.open(None, tmp_path / "app")
    assert [e.component for e in drive_entries(read_drive(store, "drive_1"))] == ["root.work_1"]
    store.close()


def test_the_index_is_the_bytes_format_md_describes() -> None:
    """A second encoder, written from docs/format.md ("Drive index"), not from driveindex."""
    import struct

    from cas.chunking import DEFAULT_PARAMS
    from cas.hashing import chunk_id
    from cas.manifest import Kind, Manifest, file_entry

    data = b"hello"
    tree = Manifest.build(DEFAULT_PARAMS, Kind.DIR, [file_entry("a.txt", [(chunk_id(data), len(data))])])
    m = tree.encode()
    name = "root.w".encode()
    raw = (b"PDRV" + struct.pack("<HHQI", 1, 0, 7, 1) + struct.pack("<H", len(name)) + name
           + struct.pack("<qI", 123, len(m)) + m)
    index = DriveIndex.decode(raw)
    assert index.generation == 7 and list(index.spaces) == ["root.w"]
    assert index.spaces["root.w"].manifest == tree and index.spaces["root.w"].updated_ns == 123
    assert index.encode() == raw and index.chunk_ids() == {chunk_id(data)}



def test_drives_show_in_the_catalog_and_in_pathapi_ls(bench: Bench) -> None:
    import json
    import subprocess
    import sys

    from pathapi.ui.catalog import Catalog

    with bench.as_work("root.a") as root:
        write(root, "x.bin", b"x" * 100)
        os.makedirs(root / "d", exist_ok=True)
        write(root, "d/y.bin", b"y" * 50)
        Drive("lit://shared").put("x.bin")
        Drive("lit://shared").put("d")
    with bench.as_work("root.b") as root:
        write(root, "z.bin", b"z" * 7)
        Drive("lit://shared").put("z.bin")
    want = [{"name": "shared", "components": ["root.a", "root.b"], "files": 3, "size": 157}]
    assert Catalog(bench.store).drives() == want
    out = subprocess.run([sys.executable, "-m", "pathapi", "ls", "--root", str(bench.base / "app"), "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout)["drives"] == want
