"""An interrupted get resumes: chunks an earlier attempt already wrote are not fetched again.

The staged files of an attempt that failed (an origin that died, a full disk) or was killed
are kept as ``resume/`` in the state folder and read back, each chunk verified, by the next
sync; they are removed once a sync succeeds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from cas import ChunkNotFoundError, LocalChunkStore, SeedSource, Workspace
from cas.chunking import ChunkerParams
from cas.hashing import ChunkId

PARAMS = ChunkerParams(min_size=2048, avg_size=8192, max_size=32768)
HERE = Path(__file__).resolve().parent


class Dies:
    """A remote that delivers ``limit`` chunks, then fails the way a dead origin does."""

    def __init__(self, inner: LocalChunkStore, limit: int) -> None:
        self.inner, self.limit, self.sent = inner, limit, 0

    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        return self.inner.has_many(ids)

    def get_many(self, ids: Iterable[ChunkId]) -> Iterator[tuple[ChunkId, bytes]]:
        for cid, data in self.inner.get_many(ids):
            if self.sent >= self.limit:
                raise ConnectionError("origin died")
            self.sent += 1
            yield cid, bytes(data)


class Counting(Dies):
    def __init__(self, inner: LocalChunkStore) -> None:
        super().__init__(inner, limit=10**9)


@pytest.fixture
def origin(tmp_path: Path) -> tuple[Workspace, LocalChunkStore, Path]:
    src = tmp_path / "origin"
    (src / "sub").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    (src / "sub" / "other.bin").write_bytes(os.urandom(1 << 20))
    ws = Workspace(tmp_path / "ostate", PARAMS)
    store = LocalChunkStore(tmp_path / "store")
    return ws, store, src


def _publish(ws: Workspace, store: LocalChunkStore, src: Path):  # type: ignore[no-untyped-def]
    m = ws.snapshot(src)
    store.put_many(SeedSource(m, src).get_many(sorted(m.chunk_ids())))
    return m


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _interrupted(tmp_path: Path, store: LocalChunkStore, m, limit: int) -> tuple[Workspace, Path]:  # type: ignore[no-untyped-def]
    """A consumer whose first sync of ``m`` failed after ``limit`` chunks (a dead origin)."""
    ws = Workspace(tmp_path / "cstate", PARAMS)
    dest = tmp_path / "consumer" / "data"
    with pytest.raises(ConnectionError):
        ws.sync(m, dest, remote=Dies(store, limit=limit))
    return ws, dest


def test_a_get_that_failed_half_way_fetches_only_the_rest_next_time(tmp_path: Path, origin) -> None:  # type: ignore[no-untyped-def]
    ows, store, src = origin
    m = _publish(ows, store, src)
    total = len(m.chunk_ids())
    ws, dest = _interrupted(tmp_path, store, m, limit=total // 2)
    assert not dest.exists()  # nothing of the failed attempt is visible
    assert (tmp_path / "cstate" / "resume").is_dir()
    again = Counting(store)
    r = ws.sync(m, dest, remote=again)
    assert _tree(dest) == _tree(src)
    assert again.sent == total - total // 2 == r.chunks_fetched
    assert not (tmp_path / "cstate" / "resume").exists()  # removed once a sync succeeded


def test_a_get_killed_mid_fetch_resumes_where_it_stopped(tmp_path: Path, origin) -> None:  # type: ignore[no-untyped-def]
    ows, store, src = origin
    m = _publish(ows, store, src)
    store.close()
    total = len(m.chunk_ids())
    (tmp_path / "m.bin").write_bytes(m.encode())
    state, dest = tmp_path / "cstate", tmp_path / "consumer" / "data"
    child = subprocess.Popen(
        [sys.executable, str(HERE / "_resume_child.py"), str(state), str(dest), str(tmp_path / "store"), str(tmp_path / "m.bin")],
        stdout=subprocess.PIPE, text=True,
    )
    got = 0
    assert child.stdout is not None
    for line in child.stdout:
        got = int(line.split()[1])
        if got >= total // 3:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(30)
    assert child.returncode == -signal.SIGKILL and 0 < got < total
    ws = Workspace(state, PARAMS)
    with LocalChunkStore(tmp_path / "store") as s:
        again = Counting(s)
        ws.sync(m, dest, remote=again)
    assert _tree(dest) == _tree(src)
    # Chunks handed over before the kill were written (the last one perhaps not yet).
    assert again.sent <= total - got + 1, (again.sent, total, got)


def test_a_resume_folder_that_makes_no_sense_is_dropped_and_the_get_still_succeeds(tmp_path: Path, origin) -> None:  # type: ignore[no-untyped-def]
    ows, store, src = origin
    m = _publish(ows, store, src)
    ws, dest = _interrupted(tmp_path, store, m, limit=5)
    resume = tmp_path / "cstate" / "resume"
    (resume / "resume.json").write_text("{ not json")
    r = ws.sync(m, dest, remote=Counting(store))
    assert _tree(dest) == _tree(src) and r.chunks_fetched == len(m.chunk_ids())
    assert not resume.exists()


def test_staged_bytes_that_were_damaged_are_fetched_again_not_trusted(tmp_path: Path, origin) -> None:  # type: ignore[no-untyped-def]
    ows, store, src = origin
    m = _publish(ows, store, src)
    total = len(m.chunk_ids())
    ws, dest = _interrupted(tmp_path, store, m, limit=total - 3)
    invert = bytes(range(255, -1, -1))
    kept = [p for p in (tmp_path / "cstate" / "resume").rglob("*") if p.is_file() and p.name != "resume.json"]
    assert kept, "the interrupted sync kept nothing to resume from"
    for staged in kept:  # staged files and the journal's patch data: every byte inverted, so
        with open(staged, "r+b") as f:  # every chunk in them (however short) fails verification
            data = f.read().translate(invert)
            f.seek(0)
            f.write(data)
    r = ws.sync(m, dest, remote=Counting(store))
    assert _tree(dest) == _tree(src)
    assert r.chunks_fetched == total  # every damaged chunk failed verification and came anew


def test_no_chunk_source_at_all_still_raises_chunk_not_found(tmp_path: Path, origin) -> None:  # type: ignore[no-untyped-def]
    ows, store, src = origin
    m = _publish(ows, store, src)
    ws = Workspace(tmp_path / "cstate", PARAMS)
    with pytest.raises(ChunkNotFoundError):
        ws.sync(m, tmp_path / "consumer" / "data", remote=None)
