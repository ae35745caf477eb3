"""Garbage collection, leases and pack compaction (cas.gc, cas.leases, LocalChunkStore.compact).

What is promised (docs/design.md, "Garbage collection"):
- a collection deletes exactly the chunks no persisted manifest names, and every manifest
  stays fully readable;
- it never runs while a persist holds its lease (it fails at once with StoreBusyError), and
  a persist waits while a collection runs; a lease whose holder was killed does not block;
- an unreadable ref aborts the collection before anything is deleted;
- compaction returns the space of deleted chunks, skips packs a writer holds, lets readers
  that looked a chunk up before it moved read it, and a compaction killed at any instant
  leaves a store that opens and holds every live chunk.
Real processes hold the leases, persist and compact; kills are SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trees import File, Model, write_tree

from cas.errors import GcError, StoreBusyError
from cas.gc import GcReport
from cas.hashing import ChunkId, chunk_id
from cas.leases import HOST, LEASE_VERSION, Leases
from cas.manifest import Manifest
from cas.repository import Repository
from cas.store import LocalChunkStore, LocalRefStore, MemoryChunkStore
from cas.workspace import Workspace
from pathapi.artifacts import ArtifactStore, decode_ref
from pathapi.version import Version

CHILD = Path(__file__).with_name("_gc_child.py")
ROOT = Path(__file__).resolve().parents[1]


class Child:
    """A _gc_child.py process; ``lines`` collects its stdout as it arrives."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        with self._seen:
            if not self._seen.wait_for(lambda: text in self.lines or self.proc.poll() is not None, timeout):
                pytest.fail(f"child did not print {text!r} in time")
        if text not in self.lines:
            pytest.fail(f"child exited {self.proc.returncode} before {text!r}: {self.proc.stderr.read()}")  # type: ignore[union-attr]

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(60) == 0, self.proc.stderr.read()  # type: ignore[union-attr]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(60)


def random_files(rng: random.Random, files: int = 4) -> Model:
    """A folder of ``files`` files of random sizes (empty to 400 kB) and bytes."""
    return {f"f{k}.bin": File(rng.randbytes(rng.choice([0, 10, 50_000, 400_000]))) for k in range(files)}


def all_readable(store: ArtifactStore, m: Manifest) -> bool:
    ids = m.chunk_ids()
    if store.chunks.has_many(ids) != ids:
        return False
    return all(chunk_id(data) == cid for cid, data in store.chunks.get_many(ids))


# -- what a collection deletes ----------------------------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    trees=st.lists(st.integers(0, 2**32), min_size=1, max_size=5),
    dropped=st.sets(st.integers(0, 4)),
    memory=st.booleans(),
)
def test_gc_deletes_exactly_the_chunks_no_manifest_names(tmp_path_factory: pytest.TempPathFactory,
                                                         trees: list[int], dropped: set[int], memory: bool) -> None:
    base = tmp_path_factory.mktemp("gc")
    chunks = MemoryChunkStore() if memory else LocalChunkStore(base / "chunks", pack_limit=1 << 20)
    store = ArtifactStore(Repository(chunks, LocalRefStore(base / "refs"), LocalRefStore(base / "leases"), str(base)))
    kept: dict[str, Manifest] = {}
    with Workspace(base / "ws") as ws:
        for i, seed in enumerate(trees):
            write_tree(base / f"t{i}", random_files(random.Random(seed)))
            m = store.persist("w", f"t{i}", str(base / f"t{i}"), ws, version=Version(1, 1, Version.ENDED))
            assert m is not None
            kept[f"w/t{i}"] = m
    # Chunks no ref ever named (a persist killed before its ref, say) are garbage too.
    stray = [(chunk_id(d), d) for d in (b"stray one", b"stray two")]
    chunks.put_many(stray)
    for i in dropped & set(range(len(trees))):
        assert store.refs.delete(f"w/t{i}")
        del kept[f"w/t{i}"]
    live = set().union(*(m.chunk_ids() for m in kept.values())) if kept else set()
    before = set(chunks.iter_ids())

    report = store.gc(min_garbage=0.0)

    assert set(chunks.iter_ids()) == live
    assert report.deleted_chunks == len(before - live) and report.live_chunks == len(live)
    for m in kept.values():
        assert all_readable(store, m)
    if not memory:
        assert report.compaction is not None and not report.compaction.corrupt
    store.close()


def test_gc_dry_run_deletes_nothing(tmp_path: Path) -> None:
    store = ArtifactStore.open(None, tmp_path)
    store.chunks.put_many([(chunk_id(b"orphan"), b"orphan")])
    report = store.gc(dry_run=True)
    assert report.deleted_chunks == 1 and report.dry_run
    assert store.chunks.has_many([chunk_id(b"orphan")])
    store.close()


def test_an_unreadable_ref_aborts_gc_before_anything_is_deleted(tmp_path: Path) -> None:
    store = ArtifactStore.open(None, tmp_path)
    write_tree(tmp_path / "t", random_files(random.Random(1)))
    with Workspace(tmp_path / "ws") as ws:
        store.persist("w", "t", str(tmp_path / "t"), ws, version=Version(1, 1, Version.ENDED))
    store.chunks.put_many([(chunk_id(b"orphan"), b"orphan")])
    before = set(store.chunks.iter_ids())
    ref_file = next(p for p in (tmp_path / "artifacts" / "refs").iterdir() if not p.name.startswith("."))
    raw = bytearray(ref_file.read_bytes())
    raw[-40] ^= 0x01  # one bit of the manifest's last chunk id: it would still decode
    ref_file.write_bytes(bytes(raw))
    with pytest.raises(GcError, match="damaged") as e:
        store.gc()
    assert "nothing was deleted" in str(e.value)
    assert set(store.chunks.iter_ids()) == before
    store.close()


# -- leases -----------------------------------------------------------------------------
def test_gc_is_refused_while_another_process_holds_a_persist_lease(tmp_path: Path) -> None:
    store = ArtifactStore.open(None, tmp_path)
    store.chunks.put_many([(chunk_id(b"orphan"), b"orphan")])
    child = Child("lease", str(tmp_path / "artifacts" / "leases"), "shared")
    try:
        child.wait_for("held")
        with pytest.raises(StoreBusyError, match="test holder"):
            store.gc()
        assert store.chunks.has_many([chunk_id(b"orphan")])
        assert not store.leases.live("exclusive"), "a refused gc must take its own lease back"
    finally:
        child.release()
    assert store.gc().deleted_chunks == 1
    store.close()


def test_a_lease_whose_process_was_killed_does_not_block_gc(tmp_path: Path) -> None:
    store = ArtifactStore.open(None, tmp_path)
    store.chunks.put_many([(chunk_id(b"orphan"), b"orphan")])
    child = Child("lease", str(tmp_path / "artifacts" / "leases"), "shared")
    child.wait_for("held")
    child.kill()
    assert len(store.leases.all("shared")) == 1  # the record stays behind...
    assert store.gc().deleted_chunks == 1  # ...but is dead, and gc removes it
    assert store.leases.all() == []
    store.close()


def test_persist_waits_while_a_gc_holds_the_exclusive_lease(tmp_path: Path) -> None:
    store = ArtifactStore.open(None, tmp_path)
    write_tree(tmp_path / "t", random_files(random.Random(2)))
    child = Child("lease", str(tmp_path / "artifacts" / "leases"), "exclusive")
    child.wait_for("held")
    done = threading.Event()

    def persist() -> None:
        with Workspace(tmp_path / "ws") as ws:
            store.persist("w", "t", str(tmp_path / "t"), ws, version=Version(1, 1, Version.ENDED))
        done.set()

    t = threading.Thread(target=persist)
    t.start()
    try:
        assert not done.wait(1.5), "persist went ahead while a gc held the store"
        assert store.refs.get("w/t") is None and not list(store.chunks.iter_ids())
    finally:
        child.release()
    t.join(60)
    assert done.is_set() and store.refs.get("w/t") is not None
    store.close()


def _lease_record(host: str, renewed: float, ttl: float = 600.0) -> bytes:
    return json.dumps({"v": LEASE_VERSION, "kind": "shared", "what": "remote persist", "host": host,
                       "pid": 1, "start": "1", "renewed": renewed, "ttl": ttl}).encode()


def test_leases_of_other_hosts_count_until_their_ttl_runs_out(tmp_path: Path) -> None:
    refs = LocalRefStore(tmp_path / "leases")
    leases = Leases(refs)
    assert "other-host" not in HOST
    refs.put("shared/fresh", _lease_record("other-host/boot", time.time()))
    with pytest.raises(StoreBusyError, match="remote persist"), leases.exclusive("gc"):
        pass
    refs.put("shared/fresh", _lease_record("other-host/boot", time.time() - 601))
    with leases.exclusive("gc"):
        assert [lease.name for lease in leases.live()] == [n for n in refs.names("exclusive/")]
    assert leases.break_dead() == 1 and refs.get("shared/fresh") is None


def test_a_lease_of_a_live_process_that_stopped_renewing_it_expires(tmp_path: Path) -> None:
    """A persist whose store went away could not delete its lease; the lease must not block
    collections for as long as its (still running) process lives."""
    from cas.leases import _start_time

    refs = LocalRefStore(tmp_path / "leases")
    me = json.loads(_lease_record(HOST, time.time()))
    me.update(pid=os.getpid(), start=_start_time(os.getpid()))
    refs.put("shared/mine", json.dumps(me).encode())
    assert len(Leases(refs).live()) == 1
    me["renewed"] = time.time() - 601
    refs.put("shared/mine", json.dumps(me).encode())
    assert Leases(refs).live() == []


def test_a_held_lease_is_renewed(tmp_path: Path) -> None:
    leases = Leases(LocalRefStore(tmp_path / "leases"), ttl=0.4)
    with leases.shared("slow persist"):
        first = leases.all("shared")[0].renewed
        deadline = time.monotonic() + 30
        while leases.all("shared")[0].renewed == first:
            assert time.monotonic() < deadline, "lease was never renewed"
            time.sleep(0.05)
    assert leases.all() == []


def test_two_collections_at_once_never_both_run(tmp_path: Path) -> None:
    leases = Leases(LocalRefStore(tmp_path / "leases"))
    with leases.exclusive("first"), pytest.raises(StoreBusyError, match="first"), leases.exclusive("second"):
        pass


def test_gc_racing_a_persisting_process_never_leaves_a_manifest_without_its_chunks(tmp_path: Path) -> None:
    """A child persists 40 versions of a changing tree while this process collects in a loop."""
    Path(tmp_path / "app").mkdir()
    child = Child("persist", str(tmp_path / "app"), str(tmp_path / "tree"), "40", "7")
    store = ArtifactStore.open(None, tmp_path / "app")
    try:
        runs, busy, deleted = collect_while_running(child.proc, store.gc, lambda: _whole(store, "writer/tree"))
        child.wait_for("done")
    finally:
        if child.proc.poll() is None:
            child.kill()
    assert child.proc.wait(60) == 0, child.proc.stderr.read()  # type: ignore[union-attr]
    final = decode_ref(store.refs.get("writer/tree"))[0]  # type: ignore[arg-type]
    assert all_readable(store, final)
    store.gc(min_garbage=0.0)
    assert set(store.chunks.iter_ids()) == final.chunk_ids()
    assert runs >= 1 and deleted > 0, (runs, busy, deleted)
    store.close()


def _whole(store: ArtifactStore, ref: str) -> bool:
    raw = store.refs.get(ref)
    return raw is None or all_readable(store, decode_ref(raw)[0])


def collect_while_running(proc: subprocess.Popen[str], gc: Callable[..., GcReport],
                          whole: Callable[[], bool]) -> tuple[int, int, int]:
    """Collect in a loop while ``proc`` runs (once at least), checking ``whole()`` after each
    collection that ran; (collections run, refused as busy, chunks deleted)."""
    runs = busy = deleted = 0
    while proc.poll() is None or runs == 0:
        try:
            report = gc(min_garbage=0.0)
        except StoreBusyError:
            busy += 1
            time.sleep(random.uniform(0, 0.02))
            continue
        runs += 1
        deleted += report.deleted_chunks
        # Chunks can only have been added since the collection: the current ref is whole.
        assert whole(), f"after gc run {runs}: the ref names deleted chunks"
    return runs, busy, deleted


# -- compaction -------------------------------------------------------------------------
def fill(store: LocalChunkStore, n: int, seed: int, size: int = 40_000) -> list[tuple[ChunkId, bytes]]:
    rng = random.Random(seed)
    items = [(chunk_id(d), d) for d in (rng.randbytes(size) for _ in range(n))]
    store.put_many(items)
    return items


def pack_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "packs").iterdir())


def test_compaction_returns_the_space_of_deleted_chunks(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path, pack_limit=1 << 20)
    items = fill(store, 120, seed=3)
    gone = {cid for cid, _ in items[::3]} | {cid for cid, _ in items[1::3]}
    store.delete_many(gone)
    store.close()  # its writer pack is now free to compact
    store = LocalChunkStore(tmp_path, pack_limit=1 << 20)
    before = pack_bytes(tmp_path)
    stats = store.compact()
    after = pack_bytes(tmp_path)
    live = [(cid, d) for cid, d in items if cid not in gone]
    assert after == stats.bytes_after and stats.bytes_reclaimed == before - after
    assert after <= sum(44 + len(d) for _, d in live)  # random bytes: stored raw
    assert dict(store.get_many([cid for cid, _ in live])) == dict(live)
    assert not store.has_many(gone)
    assert store.compact().packs_rewritten == 0  # nothing left to gain
    store.close()


def compact_in_child(root: Path, min_garbage: float) -> dict[str, int]:
    """Compact ``root`` in another process (LMDB allows one open index per process)."""
    script = (
        "import sys, json, dataclasses; from cas.store import LocalChunkStore\n"
        "with LocalChunkStore(sys.argv[1]) as s:\n"
        "    print(json.dumps(dataclasses.asdict(s.compact(min_garbage=float(sys.argv[2])))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(root), str(min_garbage)], check=True,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    return json.loads(out.stdout)


def test_compaction_skips_the_pack_a_writer_holds(tmp_path: Path) -> None:
    writer = LocalChunkStore(tmp_path)
    items = fill(writer, 20, seed=4)
    writer.delete_many([cid for cid, _ in items[:15]])
    (held,) = list((tmp_path / "packs").iterdir())
    size = held.stat().st_size
    assert compact_in_child(tmp_path, 0.0)["packs_rewritten"] == 0
    assert held.exists() and held.stat().st_size == size
    more = fill(writer, 3, seed=5)  # the writer goes on appending to it
    writer.close()
    assert compact_in_child(tmp_path, 0.2)["packs_rewritten"] == 1 and not held.exists()
    keep = items[15:] + more
    with LocalChunkStore(tmp_path) as store:
        assert {cid: bytes(d) for cid, d in store.get_many([cid for cid, _ in keep])} == dict(keep)


def test_a_reader_that_looked_up_chunks_before_compaction_still_reads_them(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path, pack_limit=256 << 10)
    items = fill(store, 40, seed=6)
    store.delete_many([cid for cid, _ in items[::2]])
    store.close()
    reader = LocalChunkStore(tmp_path)
    live = items[1::2]
    it = reader.get_many([cid for cid, _ in live])
    got = [next(it)]  # locations of all ids are looked up now, one pack is open
    assert compact_in_child(tmp_path, 0.0)["packs_rewritten"] >= 2
    got += list(it)
    assert [(cid, bytes(d)) for cid, d in got] == live
    reader.close()


def test_compaction_killed_at_random_instants_leaves_every_live_chunk(tmp_path: Path) -> None:
    """SIGKILL a process that compacts in a loop at 12 random instants; the store stays whole."""
    store = LocalChunkStore(tmp_path, pack_limit=1 << 20)
    items = fill(store, 300, seed=8, size=30_000)
    store.delete_many([cid for cid, _ in items[::2]])
    live = dict(items[1::2])
    store.close()
    script = (
        "import sys; from cas.store import LocalChunkStore\n"
        "s = LocalChunkStore(sys.argv[1], pack_limit=1 << 20)\n"
        "print('open', flush=True)\n"
        "while True: s.compact(min_garbage=0.0)\n"
    )
    rng = random.Random(9)
    for i in range(12):
        proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.stdout is not None and proc.stdout.readline() == b"open\n"
        time.sleep(rng.uniform(0.0, 0.5))
        assert proc.poll() is None, "the compacting child died on its own"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with LocalChunkStore(tmp_path) as check:
            ids = list(check.iter_ids())
            assert set(ids) == set(live), f"kill {i}: the set of chunks changed"
            assert {cid: bytes(d) for cid, d in check.get_many(ids)} == live
    with LocalChunkStore(tmp_path) as final:
        final.compact(min_garbage=0.0)
        # Copies left by killed compactions are reclaimed (only young unnamed packs may stay).
        named = sum(p.stat().st_size for p in (tmp_path / "packs").glob("*.pack"))
        assert named == sum(44 + len(d) for d in live.values())


# -- the command ------------------------------------------------------------------------
def test_pathapi_gc_command_reclaims_old_versions_and_keeps_the_current_one(tmp_path: Path) -> None:
    app = tmp_path / "app"
    store = ArtifactStore.open(None, app)
    tree = tmp_path / "tree"
    with Workspace(tmp_path / "ws") as ws:
        write_tree(tree, random_files(random.Random(10)))
        old = store.persist("w", "ckpt", str(tree), ws, version=Version(1, 1, Version.ENDED))
        shutil.rmtree(tree)
        write_tree(tree, random_files(random.Random(11)))
        new = store.persist("w", "ckpt", str(tree), ws, version=Version(1, 1, Version.ENDED))
    assert old is not None and new is not None
    store.close()

    def gc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pathapi", "gc", "--root", str(app), *args],
                              check=False, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)

    dry = gc("--dry-run")
    garbage = len(old.chunk_ids() - new.chunk_ids())
    assert dry.returncode == 0 and f"would delete {garbage}" in dry.stdout, dry
    real = gc()
    assert real.returncode == 0 and f"deleted {garbage}" in real.stdout, real
    store = ArtifactStore.open(None, app)
    assert set(store.chunks.iter_ids()) == new.chunk_ids() and all_readable(store, new)
    # The persisted tree restores exactly.
    out = tmp_path / "restored"
    with Workspace(tmp_path / "ws2") as ws:
        ws.sync(new, str(out), remote=store.chunks)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in tree.iterdir()}
    child = Child("lease", str(app / "artifacts" / "leases"), "shared")
    try:
        child.wait_for("held")
        busy = gc()
        assert busy.returncode == 75 and "lease" in busy.stderr, busy
    finally:
        child.release()
    store.close()
    missing = subprocess.run([sys.executable, "-m", "pathapi", "gc", "--root", str(tmp_path / "nowhere")],
                             check=False, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert missing.returncode == 2 and "no artifact store" in missing.stderr
