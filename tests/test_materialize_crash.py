"""Crash safety of sync, for real: a child process runs Workspace.sync and is SIGKILLed.

The receiver holds version 1 of a tree (many small files, a few multi-MiB ones) and syncs
to version 2, in which some big files are patched in place (few changed chunks) and others
replaced, small files change, appear and disappear, a folder becomes a file and a file a
folder, exec bits flip and links move. The child (tests/_sync_child.py) is killed at random
instants spread over the whole sync, and just before chosen operations of the apply phase
(seen through audit hooks), and recover() itself is killed while it replays. After each kill:

- no file is torn: each entry is entirely version 1 or version 2, except the files that a
  committed journal patches in place (by design they are finished by recover());
- with no committed journal, the tree is exactly version 1 (or exactly version 2, when the
  kill came as the finished sync was removing its journal);
- recover() alone then gives exactly version 2 if a journal was committed, else leaves the
  tree as it was, and a new sync gives version 2 with no ``txn`` left in the state folder.

``CAS_CRASH_KILLS`` sets the number of random kills (default 30).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from cas.manifest import Manifest
from cas.plan import Action, plan_update
from cas.store.local import LocalChunkStore
from trees import (
    SMALL_PARAMS,
    CountingSource,
    KiB,
    MiB,
    Dir,
    File,
    Link,
    Model,
    make_workspace,
    manifest_of,
    put_tree_chunks,
    read_tree,
    write_tree,
)

REPO = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "_sync_child.py"
KILLS = int(os.environ.get("CAS_CRASH_KILLS", "30"))


def versions() -> tuple[Model, Model]:
    """(old, new): the receiver's tree before the sync and the target."""
    rnd = random.Random(20240615)
    old: Model = {"empty-dir": Dir(), "big": Dir(), "links": Dir(), "m": Dir()}
    for d in range(6):
        old[f"d{d}"] = Dir()
        for i in range(16):
            old[f"d{d}/f{i:02d}"] = File(rnd.randbytes(rnd.randrange(0, 10 * KiB)), i % 7 == 0)
    a = rnd.randbytes(2 * MiB)
    b = rnd.randbytes(1 * MiB + 512 * KiB)
    c = rnd.randbytes(2 * MiB)
    d = rnd.randbytes(2 * MiB)
    m = rnd.randbytes(200 * KiB)
    old.update({
        "big/a.bin": File(a), "big/b.bin": File(b), "big/c.bin": File(c, True), "big/d.bin": File(d),
        "m/x.dat": File(m), "links/to-a": Link("../big/a.bin"), "links/to-d0": Link("../d0"),
        "ünï 日本": Dir(), "ünï 日本/é 🙂 patched": File(m[::-1]), "ünï 日本/ñ\nreplaced": File(m[:5000]),
    })

    new: Model = dict(old)

    def poke(data: bytes, *offsets: int) -> bytes:
        buf = bytearray(data)
        for off in offsets:
            buf[off : off + 100] = rnd.randbytes(100)
        return bytes(buf)

    new["big/a.bin"] = File(poke(a, 10_000, 1 * MiB + 77, 2 * MiB - 5000))  # patched in place
    new["big/b.bin"] = File(rnd.randbytes(len(b)))  # replaced
    new["big/c.bin"] = File(c[: 1 * MiB] + rnd.randbytes(KiB) + c[1 * MiB :], True)  # shifted: rewritten from seeds
    new["big/d.bin"] = File(poke(d[: 3 * MiB // 2], 500_000))  # shrunk and patched
    new["m/x.dat"] = File(poke(m, 100_000), True)  # patched, now executable
    new["ünï 日本/é 🙂 patched"] = File(poke(m[::-1], 150_000))  # names in the journal are not ASCII
    new["ünï 日本/ñ\nreplaced"] = File(rnd.randbytes(5000), True)
    for d_ in range(6):
        for i in range(16):
            p = f"d{d_}/f{i:02d}"
            if i % 3 == 0:
                new[p] = File(rnd.randbytes(rnd.randrange(0, 10 * KiB)), i % 2 == 0)
            elif i % 5 == 1:
                del new[p]
            elif i % 11 == 2:
                new[p] = File(new[p].data, not new[p].executable)  # type: ignore[arg-type]
    for k in [p for p in new if p == "d5" or p.startswith("d5/")]:
        del new[k]
    new["d5"] = File(rnd.randbytes(5000))  # a folder became a file
    del new["d4/f04"]
    new["d4/f04"] = Dir()  # a file became a folder
    new["d4/f04/inner"] = File(old["d4/f04"].data)  # type: ignore[arg-type]
    new["new"] = Dir()
    for i in range(12):
        new[f"new/n{i:02d}"] = File(rnd.randbytes(rnd.randrange(0, 10 * KiB)))
    new["links/to-a"] = Link("../big/b.bin")
    del new["links/to-d0"]
    new["links/to-new"] = Link("../new")
    del new["empty-dir"]
    new["another-empty-dir"] = Dir()
    return old, new


@dataclass
class Setup:
    base: Path
    old: Model
    new: Model
    target: Manifest
    job_template: dict  # type: ignore[type-arg]
    pristine: Path

    def receiver(self, name: str) -> tuple[Path, Path, Path]:
        """A receiver holding the old tree: (tree, state folder, job file)."""
        root = self.base / name
        root.mkdir()
        dest, state = root / "tree", root / "state"
        shutil.copytree(self.pristine, dest, symlinks=True)
        job = root / "job.json"
        return dest, state, job

    def write_job(self, job: Path, dest: Path, state: Path, **extra: object) -> None:
        job.write_text(json.dumps({**self.job_template, "dest": str(dest), "state": str(state), **extra}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    base = tmp_path_factory.mktemp("crash")
    old, new = versions()
    store = LocalChunkStore(base / "store")
    ws = make_workspace(base / "origin-state")
    try:
        for name, model in (("v1", old), ("v2", new)):
            write_tree(base / name, model)
            m = ws.snapshot(base / name)
            put_tree_chunks(store, base / name, m)
        target = m
    finally:
        ws.close()
        store.close()
    assert target == manifest_of(new)
    (base / "target.manifest").write_bytes(target.encode())
    plan = plan_update(manifest_of(old), target)
    actions = {s.path: s.action for s in plan.steps}
    patched = {"big/a.bin", "big/d.bin", "m/x.dat", "ünï 日本/é 🙂 patched"}
    assert {p for p, a in actions.items() if a == Action.PATCH} == patched
    assert actions["big/b.bin"] == actions["big/c.bin"] == actions["ünï 日本/ñ\nreplaced"] == Action.PLACE
    p = SMALL_PARAMS
    template = {
        "store": str(base / "store"),
        "manifest": str(base / "target.manifest"),
        "params": [p.min_size, p.avg_size, p.max_size],
    }
    return Setup(base, old, new, target, template, base / "v1")


_remover = ThreadPoolExecutor(1, thread_name_prefix="rm")


def discard(path: Path) -> None:
    """Remove a receiver in the background (unlinks are slow here; they overlap the next run)."""
    _remover.submit(shutil.rmtree, path, True)


@dataclass
class Child:
    """A child process started ahead of time on a fresh receiver (its interpreter starts
    while we check the previous one), waiting to be told go."""

    proc: subprocess.Popen[str]
    dest: Path
    state: Path

    def go(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line != "ready\n":
            self.proc.kill()
            raise AssertionError(f"child did not start: {line!r} {self.proc.communicate()[1]}")
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def wait(self) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode in (0, -signal.SIGKILL), err
        return self.proc.returncode, out


def start(setup: Setup, name: str, **extra: object) -> Child:
    dest, state, job = setup.receiver(name)
    setup.write_job(job, dest, state, **extra)
    return start_on(setup, job, dest, state)


def start_on(setup: Setup, job: Path, dest: Path, state: Path) -> Child:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(job)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    return Child(proc, dest, state)


def run_to_end(setup: Setup, name: str) -> tuple[float, int]:
    """(seconds the sync took, operations in its apply phase), from a child left alone."""
    child = start(setup, name)
    child.go()
    code, out = child.wait()
    assert code == 0
    assert read_tree(child.dest) == setup.new
    _, seconds, events = out.split()
    return float(seconds), int(events)


def journal(state: Path) -> list | None:  # type: ignore[type-arg]
    """The committed operations in ``state``, or None if no journal is committed."""
    try:
        return json.loads((state / "txn" / "ops").read_text())["ops"]
    except FileNotFoundError:
        return None


def check_not_torn(setup: Setup, dest: Path, state: Path) -> bool:
    """Every entry is old or new; whole tree old if nothing was committed. Returns whether
    a journal is committed."""
    tree = read_tree(dest)
    assert tree is not None
    ops = journal(state)
    if ops is None:
        # nothing committed (or the sync finished and was removing its txn folder)
        assert tree == setup.old or tree == setup.new
        return False
    in_flight = {op[1] for op in ops if op[0] == "patch"}  # patched in place: recover() completes them
    for path, node in tree.items():
        if path not in in_flight:
            assert node in (setup.old.get(path), setup.new.get(path)), f"{path}: {node!r} is neither old nor new"
        else:
            assert node.kind == "file"
    return True


def check_recover_then_sync(setup: Setup, dest: Path, state: Path, committed: bool) -> None:
    ws = make_workspace(state)
    store = LocalChunkStore(setup.job_template["store"])
    try:
        assert ws.recover() == committed
        tree = read_tree(dest)
        assert tree == setup.new if committed else tree in (setup.old, setup.new)
        assert not (state / "txn").exists()
        remote = CountingSource(store)
        ws.sync(setup.target, dest, remote=remote)
        assert read_tree(dest) == setup.new
        assert ws.snapshot(dest).id == setup.target.id
        assert not (state / "txn").exists()
        if committed:
            assert remote.delivered == []  # recover() had finished it all
    finally:
        ws.close()
        store.close()


@pytest.fixture(scope="module")
def baseline(setup) -> tuple[float, int]:
    """(typical seconds of the sync, operations in its apply phase), from two children left alone."""
    (s1, e1), (s2, e2) = run_to_end(setup, "baseline1"), run_to_end(setup, "baseline2")
    assert e1 == e2
    return (s1 + s2) / 2, e1


def test_sync_killed_at_random_instants_never_leaves_a_torn_file_and_recovers(setup, baseline):
    typical = baseline[0]
    rnd = random.Random(os.environ.get("CAS_CRASH_SEED", "7"))
    span = 1.15 * typical
    delays = [(i + rnd.random()) * span / KILLS for i in range(KILLS)]  # one in each slice of the sync
    outcomes = {"finished": 0, "killed, nothing committed": 0, "killed, committed": 0}
    child = start(setup, "kill000")
    for i, delay in enumerate(delays):
        child.go()
        time.sleep(delay)
        child.kill()
        code, _ = child.wait()
        nxt = start(setup, f"kill{i + 1:03d}") if i + 1 < KILLS else None  # starts while we check
        if code == 0:
            outcomes["finished"] += 1
            assert read_tree(child.dest) == setup.new
        else:
            committed = check_not_torn(setup, child.dest, child.state)
            outcomes["killed, committed" if committed else "killed, nothing committed"] += 1
            check_recover_then_sync(setup, child.dest, child.state, committed)
        discard(child.dest.parent)
        child = nxt  # type: ignore[assignment]
    print(f"sync takes ~{typical:.3f}s; {KILLS} kills within {span:.3f}s: {outcomes}")
    assert outcomes["finished"] <= KILLS * 2 // 3, outcomes  # most kills did land inside the sync


def test_sync_killed_right_after_its_commit_is_finished_by_recover_alone(setup):
    child = start(setup, "after-commit", die_at_apply_event=1)
    child.go()
    assert child.wait()[0] == -signal.SIGKILL
    assert journal(child.state) is not None
    assert read_tree(child.dest) == setup.old  # committed, nothing applied yet

    ws = make_workspace(child.state)
    try:
        assert ws.recover() is True
    finally:
        ws.close()
    assert read_tree(child.dest) == setup.new
    assert not (child.state / "txn").exists()


def test_sync_killed_at_any_operation_of_its_apply_phase_is_finished_by_recover_alone(setup, baseline):
    events = baseline[1]
    assert events > 20
    points = sorted({2, 3, events // 2, events, *random.Random(3).sample(range(4, events), 5)})
    child = start(setup, f"apply{points[0]:05d}", die_at_apply_event=points[0])
    for i, n in enumerate(points):
        child.go()
        assert child.wait()[0] == -signal.SIGKILL, n
        nxt = start(setup, f"apply{points[i + 1]:05d}", die_at_apply_event=points[i + 1]) if i + 1 < len(points) else None
        assert check_not_torn(setup, child.dest, child.state) is True
        ws = make_workspace(child.state)
        try:
            assert ws.recover() is True
        finally:
            ws.close()
        assert read_tree(child.dest) == setup.new, f"killed before apply operation {n} of {events}"
        assert not (child.state / "txn").exists()
        check_recover_then_sync(setup, child.dest, child.state, committed=False)
        discard(child.dest.parent)
        child = nxt  # type: ignore[assignment]


def test_recover_killed_while_replaying_a_journal_is_finished_by_the_next_recover(setup, baseline):
    events = baseline[1]
    rnd = random.Random(5)
    for first, second in [(1, 2), (events // 3, 1), (events // 2, events // 2), (events - 1, rnd.randrange(2, events))]:
        child = start(setup, f"twice{first:05d}-{second:05d}", die_at_apply_event=first)
        child.go()
        assert child.wait()[0] == -signal.SIGKILL
        job = child.dest.parent / "job.json"
        setup.write_job(job, child.dest, child.state, die_at_apply_event=second, recover_only=True)
        again = start_on(setup, job, child.dest, child.state)
        again.go()
        again.wait()  # killed, or done if the replay needed fewer operations
        assert check_not_torn(setup, child.dest, child.state) == (again.proc.returncode != 0)
        ws = make_workspace(child.state)
        try:
            assert ws.recover() == (again.proc.returncode != 0)
        finally:
            ws.close()
        assert read_tree(child.dest) == setup.new
        assert not (child.state / "txn").exists()
        discard(child.dest.parent)
