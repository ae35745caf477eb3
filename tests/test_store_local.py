"""LocalChunkStore: the conformance suite, on-disk faults, two writers, and SIGKILL at random.

Everything runs on real files under ``tmp_path``; the multi-process tests start real Python
processes (``tests/chunkstore_writer.py``) and kill them with SIGKILL.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis.stateful import run_state_machine_as_test

from cas.errors import ChunkCorruptError, StoreError, UnsupportedVersionError
from cas.hashing import ChunkId, chunk_id
from cas.store import LocalChunkStore
from cas.store.local import FORMAT_TEXT, INDEX, RECORD
from cas.testing import (
    ChunkStoreStateMachine,
    ChunkStoreTests,
    chunk,
    compressible_bytes,
    random_bytes,
    read_all,
    store_settings,
)

WRITER = Path(__file__).with_name("chunkstore_writer.py")


def reopen_local(store: LocalChunkStore, **kwargs: int) -> LocalChunkStore:
    """Close ``store`` and open its folder again.

    The old object is closed first: LMDB forbids one process to hold the same environment
    open twice (closing one of them would drop the other's locks).
    """
    store.close()
    return LocalChunkStore(store.root, **kwargs)


def record_location(store: LocalChunkStore, cid: ChunkId) -> tuple[Path, int, int]:
    """(pack file, record offset, stored payload length) of ``cid``, from the store's index."""
    with store._env.begin(db=store._db) as txn:
        loc = txn.get(cid)
    assert loc is not None, f"{cid.hex()} is not indexed"
    pack_id, offset, stored, _raw, _codec = INDEX.unpack(loc)
    return store._pack_path(pack_id), offset, stored


def flip_byte_in_file(path: Path, at: int) -> None:
    """Invert the byte at offset ``at`` of ``path`` in place."""
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(1)
        f.seek(at)
        f.write(bytes([old[0] ^ 0xFF]))


class TestLocalChunkStore(ChunkStoreTests):
    """The whole suite, with the default pack size."""

    can_reopen = True
    can_corrupt = True
    pack_limit = 512 << 20

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[LocalChunkStore]:
        with LocalChunkStore(tmp_path / "store", pack_limit=self.pack_limit) as s:
            yield s

    def reopen(self, store: LocalChunkStore) -> LocalChunkStore:
        return reopen_local(store, pack_limit=self.pack_limit)

    def corrupt_one_byte(self, store: LocalChunkStore, cid: ChunkId) -> None:
        path, offset, stored = record_location(store, cid)
        flip_byte_in_file(path, offset + RECORD.size + stored // 2)


class TestLocalChunkStoreWithSmallPacks(TestLocalChunkStore):
    """The suite again with 64 KiB packs, so that batches roll over to new packs mid-way."""

    pack_limit = 64 << 10


def test_local_store_agrees_with_a_dict_model(tmp_path: Path) -> None:
    def make() -> ChunkStoreStateMachine:
        store = LocalChunkStore(tmp_path / uuid.uuid4().hex, pack_limit=32 << 10)
        return ChunkStoreStateMachine(store, lambda s: reopen_local(s, pack_limit=32 << 10))

    run_state_machine_as_test(make, settings=store_settings())


# -- the folder and its format --------------------------------------------------------


def test_new_store_writes_its_format_file(tmp_path: Path) -> None:
    with LocalChunkStore(tmp_path / "s") as store:
        assert store.location == str(tmp_path / "s")
    assert (tmp_path / "s" / "FORMAT").read_text() == FORMAT_TEXT


def test_opening_a_store_of_another_format_version_raises_unsupported_version(tmp_path: Path) -> None:
    root = tmp_path / "s"
    LocalChunkStore(root).close()
    (root / "FORMAT").write_text("cas-chunkstore 99\n")
    with pytest.raises(UnsupportedVersionError) as info:
        LocalChunkStore(root)
    assert str(root) in str(info.value)
    assert "cas-chunkstore 99" in str(info.value)


def test_opening_a_store_on_a_regular_file_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "not-a-folder"
    path.write_bytes(b"hello")
    with pytest.raises(StoreError) as info:
        LocalChunkStore(path)
    assert info.value.location == str(path)
    assert str(path) in str(info.value)


# -- damage at rest ------------------------------------------------------------------


def test_missing_pack_file_raises_store_error_naming_chunk_and_store(tmp_path: Path) -> None:
    with LocalChunkStore(tmp_path / "s") as store:
        item = chunk(random_bytes(5000, seed=1))
        store.put_many([item])
        path, _, _ = record_location(store, item[0])
    path.unlink()
    with LocalChunkStore(tmp_path / "s") as store:
        with pytest.raises(StoreError) as info:
            read_all(store, [item[0]])
        assert item[0].hex() in str(info.value)
        assert info.value.location == store.location


def test_truncated_pack_raises_chunk_corrupt(tmp_path: Path) -> None:
    with LocalChunkStore(tmp_path / "s") as store:
        first, last = chunk(random_bytes(5000, seed=1)), chunk(random_bytes(5000, seed=2))
        store.put_many([first, last])
        path, offset, stored = record_location(store, last[0])
        os.truncate(path, offset + RECORD.size + stored - 10)
        with pytest.raises(ChunkCorruptError) as info:
            read_all(store, [last[0]])
        assert info.value.chunk_id == last[0].hex()
        assert store.location in str(info.value)
        assert read_all(store, [first[0]]) == dict([first])


@pytest.mark.parametrize("field_at", [0, 2, 4, RECORD.size - 1], ids=["magic", "codec", "length", "id"])
def test_damaged_record_header_raises_chunk_corrupt(tmp_path: Path, field_at: int) -> None:
    with LocalChunkStore(tmp_path / "s") as store:
        item = chunk(compressible_bytes(20_000, seed=3))
        store.put_many([item])
        path, offset, _ = record_location(store, item[0])
        flip_byte_in_file(path, offset + field_at)
        with pytest.raises(ChunkCorruptError) as info:
            read_all(store, [item[0]])
        assert info.value.chunk_id == item[0].hex()
        assert item[0].hex() in str(info.value)


# -- several processes -----------------------------------------------------------------


class Child:
    """A writer process whose stdout lines are collected by a thread as they arrive.

    Draining stdout continuously keeps the child from blocking on a full pipe, so it is
    busy writing the store (not waiting on us) when it is killed.
    """

    def __init__(self, args: list[str], stderr_path: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(WRITER.parents[1]))
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WRITER), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line == "ready\n":
                self.ready.set()
            self.lines.append(line)

    def wait_ready(self, timeout: float = 20.0) -> None:
        if not self.ready.wait(timeout):
            self.fail("did not become ready")

    def fail(self, what: str) -> None:
        self.proc.kill()
        self.proc.wait()
        pytest.fail(f"writer {what} (exit {self.proc.returncode}): {self.stderr_path.read_text()[-3000:]}")

    def finish(self, timeout: float = 60.0) -> list[str]:
        """Wait for the child to exit (or be killed) and return its complete output lines."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail("did not finish in time")
        self._reader.join(timeout)
        return [line for line in self.lines if line.endswith("\n")]


def test_two_processes_writing_one_store_at_once_add_each_chunk_once(tmp_path: Path) -> None:
    """Two processes create the same (new) store at once and put overlapping batches.

    Each chunk must be reported as new by exactly one put of one process, and the store
    must hold and verify every chunk either wrote.
    """
    for round_ in range(3):
        root = tmp_path / f"store{round_}"
        children = [Child(["race", str(root), str(round_), str(100 * round_ + k)], tmp_path / f"err{round_}-{k}") for k in range(2)]
        for c in children:
            c.wait_ready()
        for c in children:  # release both together
            assert c.proc.stdin is not None
            c.proc.stdin.write("go\n")
            c.proc.stdin.close()
        added = 0
        written: set[ChunkId] = set()
        for c in children:
            lines = c.finish()
            if c.proc.returncode != 0 or not lines or lines[-1] != "done\n":
                c.fail("failed")
            for line in lines:
                if line.startswith("added "):
                    _, n, *ids = line.split()
                    added += int(n)
                    written.update(bytes.fromhex(h) for h in ids)
        assert added == len(written)
        with LocalChunkStore(root) as store:
            ids = list(store.iter_ids())
            assert len(ids) == len(set(ids))
            assert set(ids) == written
            assert all(chunk_id(data) == cid for cid, data in store.get_many(ids))


def test_store_killed_at_random_instants_reopens_consistent(tmp_path: Path) -> None:
    """SIGKILL a writer at >= 20 random instants; after each kill the store must be whole.

    After each kill the test process opens the store and checks: it opens; every listed
    id is listed once, reads back and verifies; every batch whose ``put_many`` had returned
    in the child is fully present; and the store still takes new chunks. The kill instant
    is counted from the child's start (so some kills land while it opens the store) or,
    for two kills in three, from when the store is open (so most land inside puts).
    """
    root = tmp_path / "store"
    rng = random.Random(20261125)
    promised: set[ChunkId] = set()
    kills_inside_puts = 0
    kills = 24
    for i in range(kills):
        delay = rng.uniform(0.005, 0.4)
        child = Child(["crash", str(root), str(rng.randrange(1 << 30)), str(256 << 10)], tmp_path / f"err{i}")
        if i % 3:
            child.wait_ready()
        time.sleep(delay)
        if child.proc.poll() is not None:
            child.fail("exited before it was killed")
        os.kill(child.proc.pid, signal.SIGKILL)
        lines = child.finish()
        assert child.proc.returncode == -signal.SIGKILL
        batches = [line.split()[1:-1] for line in lines if line.startswith("batch ") and line.endswith(" end\n")]
        kills_inside_puts += bool(batches)
        for batch in batches:
            promised.update(bytes.fromhex(h) for h in batch)

        with LocalChunkStore(root) as store:
            ids = list(store.iter_ids())
            assert len(ids) == len(set(ids)), f"kill {i}: an id is listed twice"
            missing = promised - set(ids)
            assert not missing, f"kill {i} (after {delay:.3f} s): {len(missing)} chunks of returned puts are missing"
            for cid, data in store.get_many(ids):
                assert chunk_id(data) == cid
            extra = chunk(f"written by the test after kill {i}".encode())
            assert store.put_many([extra]) == 1
            promised.add(extra[0])
    # The test is only worth its time if many kills interrupted a writer in full swing
    # (typically ~20 of 24; the bound leaves room for a loaded machine).
    assert kills_inside_puts >= kills // 3
    with LocalChunkStore(root) as store:
        assert store.has_many(promised) == promised


def test_reads_after_close_raise_store_error_naming_the_store(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path / "s")
    data = b"x" * 1000
    store.put_many([(chunk_id(data), data)])
    store.close()
    for call in (
        lambda: store.has_many([chunk_id(data)]),
        lambda: list(store.get_many([chunk_id(data)])),
        lambda: list(store.iter_ids()),
        lambda: store.put_many([(chunk_id(data), data)]),
    ):
        with pytest.raises(StoreError, match="closed") as info:
            call()
        assert str(tmp_path / "s") in str(info.value)
