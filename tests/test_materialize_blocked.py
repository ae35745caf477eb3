"""A sync that something in the receiver's tree blocks (issue 11, item 2).

- What can be checked before the commit point is: a file where a parent folder of the
  destination must go, or a folder inside it that this process can neither write nor chmod,
  is a MaterializeError naming it and saying what to do, with nothing changed.
- A read-only folder the consumer owns is not a block: it is written, and keeps its mode.
- If the tree changes after the commit point so that the sync cannot finish, the error names
  the blocking folder and says the destination is partly updated; syncs of other
  destinations in the same state folder go on working, and the next sync of the blocked one
  completes it once the cause is gone.

Tests run as root, whom folder modes do not stop: the syncing child drops the capabilities
that let root ignore them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so the kernel refuses for
real. The "after the commit point" moment is exact: the child stops itself (SIGSTOP) just
before the first operation after the commit rename, seen through an audit hook.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cas.errors import MaterializeError
from cas.store.local import LocalChunkStore
from trees import Dir, File, Model, make_workspace, manifest_of, put_tree_chunks, read_tree, write_tree

CHILD = Path(__file__).resolve().parent / "_blocked_child.py"
NOBODY = 65534


def version(n: int) -> Model:
    return {
        "top.txt": File(f"top {n}".encode()),
        "sub": Dir(),
        "sub/a.bin": File(b"A" * 50_000 + f"a {n}".encode()),
        "sub/b.txt": File(f"b {n}".encode()),
        "late": Dir(),
        "late/z.txt": File(f"z {n}".encode()),
        "ro": Dir(0o500),
        "ro/inside.txt": File(f"inside {n}".encode(), mode=0o400),
    }


class Rig:
    """An origin tree per version with its chunks in a local store, and a receiver."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.store_dir = base / "store"
        self.store = LocalChunkStore(self.store_dir)
        self.state = base / "state"
        self.manifests: dict[int, Path] = {}
        self.models: dict[int, Model] = {}
        for n in (1, 2):
            model = version(n)
            origin = base / f"origin{n}"
            write_tree(origin, model)
            m = manifest_of(model)
            put_tree_chunks(self.store, origin, m)
            (base / f"m{n}").write_bytes(m.encode())
            self.manifests[n], self.models[n] = base / f"m{n}", model

    def sync_here(self, n: int, dest: Path) -> None:
        ws = make_workspace(self.state)
        try:
            ws.sync(manifest_of(self.models[n]), dest, remote=self.store)
        finally:
            ws.close()

    def child(self, n: int, dest: Path, **job: object) -> subprocess.Popen[str]:
        self.store.close()  # one writer of the store at a time; the child only reads it
        spec = {"state": str(self.state), "dest": str(dest), "store": str(self.store_dir),
                "manifest": str(self.manifests[n]), "drop_dac": True, **job}
        job_file = self.base / f"job-{time.monotonic_ns()}.json"
        job_file.write_text(json.dumps(spec))
        return subprocess.Popen([sys.executable, str(CHILD), str(job_file)], stdout=subprocess.PIPE, text=True)

    def run_child(self, n: int, dest: Path, **job: object) -> dict[str, object]:
        proc = self.child(n, dest, **job)
        out, _ = proc.communicate(timeout=120)
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = Rig(tmp_path)
    yield r
    r.store.close()
    for path in tmp_path.rglob("*"):  # give every folder back its write bit, for the clean-up
        if path.is_dir() and not path.is_symlink():
            os.chmod(path, 0o755)


def fingerprint(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, p.read_bytes() if p.is_file() else b"")
    return out


def test_a_file_where_a_parent_folder_of_the_destination_goes_is_refused_before_anything_changes(rig: Rig) -> None:
    (rig.base / "a").mkdir()
    (rig.base / "a" / "b").write_bytes(b"a file, not a folder")
    with pytest.raises(MaterializeError) as info:
        rig.sync_here(1, rig.base / "a" / "b" / "c")
    message = str(info.value)
    assert str(rig.base / "a" / "b") in message and "file where a folder must be" in message
    assert "nothing" in message and "was changed" in message
    assert (rig.base / "a" / "b").read_bytes() == b"a file, not a folder"
    assert not (rig.state / "txn").exists()
    rig.sync_here(1, rig.base / "elsewhere")  # the workspace goes on working
    assert read_tree(rig.base / "elsewhere") == rig.models[1]


def test_a_read_only_folder_the_consumer_owns_is_updated_and_gets_the_origins_mode(rig: Rig) -> None:
    dest = rig.base / "dest"
    rig.sync_here(1, dest)
    os.chmod(dest / "sub", 0o555)  # the consumer made it read-only; the origin's is 0755
    result = rig.run_child(2, dest)
    assert result == {"ok": True}
    assert read_tree(dest) == rig.models[2]  # modes included
    assert (dest / "sub").stat().st_mode & 0o777 == 0o755


def test_a_folder_the_origin_made_read_only_is_filled_and_updated_and_stays_read_only(rig: Rig) -> None:
    dest = rig.base / "dest"
    assert rig.run_child(1, dest) == {"ok": True}  # "ro" (0500) is created, filled, then locked
    assert (dest / "ro").stat().st_mode & 0o777 == 0o500
    assert read_tree(dest) == rig.models[1]
    assert rig.run_child(2, dest) == {"ok": True}  # a file inside it changes
    assert read_tree(dest) == rig.models[2]
    assert (dest / "ro").stat().st_mode & 0o777 == 0o500


def test_a_folder_this_process_can_neither_write_nor_chmod_is_refused_before_anything_changes(rig: Rig) -> None:
    dest = rig.base / "dest"
    rig.sync_here(1, dest)
    os.chown(dest / "sub", NOBODY, NOBODY)  # another user's folder, 0755: not ours to write
    before = fingerprint(dest)
    result = rig.run_child(2, dest)
    assert result["ok"] is False and result["type"] == "MaterializeError"
    assert str(dest / "sub") in str(result["message"]) and "not writable" in str(result["message"])
    assert "nothing at" in str(result["message"])
    assert fingerprint(dest) == before
    assert not (rig.state / "txn" / "ops").exists()


def _wait_stopped(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        assert time.monotonic() < deadline, "the child never reached the commit point"
        time.sleep(0.01)


def block_after_commit(rig: Rig, dest: Path) -> dict[str, object]:
    """Sync ``dest`` to version 2 in a child that stops exactly after its commit point; give
    the folder ``late`` to another user then; what the child reports."""
    proc = rig.child(2, dest, pause_after_commit=True)
    try:
        _wait_stopped(proc.pid)
        os.chown(dest / "late", NOBODY, NOBODY)  # between the commit and the first operation
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_block_after_the_commit_point_is_reported_blocks_no_other_destination_and_the_next_get_completes(rig: Rig) -> None:
    dest = rig.base / "dest"
    rig.sync_here(1, dest)
    result = block_after_commit(rig, dest)
    assert result["ok"] is False and result["type"] == "MaterializeError", result
    message = str(result["message"])
    assert str(dest / "late") in message and "partly updated" in message and "get again" in message

    # Another destination in the same state folder is not blocked by the unfinished one.
    assert rig.run_child(1, rig.base / "other") == {"ok": True}
    assert read_tree(rig.base / "other") == rig.models[1]

    # Once the cause is gone, the next sync of the blocked destination completes it.
    os.chown(dest / "late", 0, 0)
    assert rig.run_child(2, dest) == {"ok": True}
    assert read_tree(dest) == rig.models[2]
    assert not (rig.state / "txn").exists()


def test_while_the_cause_remains_the_blocked_destination_is_refused_before_its_commit(rig: Rig) -> None:
    dest = rig.base / "dest"
    rig.sync_here(1, dest)
    block_after_commit(rig, dest)
    again = rig.run_child(2, dest)  # the cause is still there: caught before the commit point
    assert again["ok"] is False and "nothing at" in str(again["message"])
    assert str(dest / "late") in str(again["message"])
    shutil.rmtree(rig.base / "dest" / "late", ignore_errors=True)  # as root: the user's fix
    assert rig.run_child(2, dest) == {"ok": True}
    assert read_tree(dest) == rig.models[2]
