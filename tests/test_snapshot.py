"""Snapshots of real trees: what they record, what they refuse, the stat cache, and files
that change while they are read (a real concurrent writer)."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cas.chunking import Chunker, ChunkerParams, KiB, MiB
from cas.errors import FileChangedError, SnapshotError, UnsafePathError
from cas.manifest import Entry, Kind, Manifest
from cas.snapshot import snapshot
from cas.statcache import RACY_NS, StatCache

SMALL = ChunkerParams(min_size=256, avg_size=1 * KiB, max_size=4 * KiB)


class CountingChunker(Chunker):
    """Our chunker, recording which files it was asked to read (by size hint)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reads = 0

    def chunk_file(self, fd: int, size_hint: int = -1) -> tuple[bytes, int]:
        self.reads += 1
        return super().chunk_file(fd, size_hint)


@pytest.fixture
def chunker() -> Iterator[Chunker]:
    with Chunker(SMALL, segment_size=8 * KiB) as c:
        yield c


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- a tree on disk and the manifest it should have -------------------------------------------
Spec = dict[str, "bytes | tuple[str, bytes | str] | Spec"]


def make_tree(root: Path, spec: Spec) -> None:
    """Create ``spec`` under ``root``: bytes = file, ("exec", bytes), ("link", target), dict = dir."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for name, node in spec.items():
        p = root / name
        if isinstance(node, dict):
            make_tree(p, node)
        elif isinstance(node, bytes):
            p.write_bytes(node)
            p.chmod(0o644)
        elif node[0] == "exec":
            p.write_bytes(node[1])  # type: ignore[arg-type]
            p.chmod(0o755)
        else:
            os.symlink(node[1], p)


def expected_entries(chunker: Chunker, spec: Spec, prefix: str = "") -> list[Entry]:
    out: list[Entry] = []
    for name, node in spec.items():
        path = f"{prefix}/{name}" if prefix else name
        if isinstance(node, dict):
            out.append(Entry(path, Kind.DIR, mode=0o755))
            out += expected_entries(chunker, node, path)
        elif isinstance(node, bytes):
            out.append(Entry(path, Kind.FILE, False, len(node), chunker.chunk_bytes(node), mode=0o644))
        elif node[0] == "exec":
            data = node[1]
            assert isinstance(data, bytes)
            out.append(Entry(path, Kind.FILE, True, len(data), chunker.chunk_bytes(data), mode=0o755))
        else:
            out.append(Entry(path, Kind.SYMLINK, target=str(node[1])))
    return out


def expected_manifest(chunker: Chunker, spec: Spec) -> Manifest:
    return Manifest.build(chunker.params, Kind.DIR, expected_entries(chunker, spec), root_mode=0o755)


def rich_spec() -> Spec:
    return {
        "empty.txt": b"",
        "one": b"x",
        "small.bin": data_of(3000, 1),
        "big.bin": data_of(200 * KiB + 3, 2),  # many chunks, several pipeline segments
        "run.sh": ("exec", b"#!/bin/sh\necho hi\n"),
        "empty-dir": {},
        "a": {
            "b": {"c": {"deep.txt": b"deep", "nothing": {}}},
            "to-file": ("link", "b/c/deep.txt"),
            "to-root": ("link", ".."),
            "to-dir": ("link", "b"),
            "up-and-down": ("link", "../a/b/c/../c/deep.txt"),
            "dangling-inside": ("link", "b/no-such-file"),
        },
        "ünï cødé 日本": {"ファイル.txt": "データ".encode(), "emoji-\U0001f600": b"smile"},
        "link-to-link": ("link", "a/to-file"),
        "self": ("link", "."),
    }


# -- what a snapshot records ----------------------------------------------------------------------
def test_snapshot_of_a_tree_records_files_dirs_exec_bits_and_links(tmp_path: Path, chunker: Chunker) -> None:
    spec = rich_spec()
    make_tree(tmp_path / "t", spec)
    m = snapshot(tmp_path / "t", chunker)
    assert m == expected_manifest(chunker, spec)
    assert m.root_kind == Kind.DIR
    assert m.by_path["run.sh"].executable and not m.by_path["small.bin"].executable
    assert m.by_path["big.bin"].chunk_count > 10
    assert m.by_path["a/b/c/nothing"].kind == Kind.DIR
    assert m.by_path["a/to-root"].target == ".."
    assert Manifest.decode(m.encode()) == m


def test_snapshot_is_deterministic_and_tracks_changes(tmp_path: Path, chunker: Chunker) -> None:
    spec = rich_spec()
    make_tree(tmp_path / "t", spec)
    first = snapshot(tmp_path / "t", chunker)
    assert snapshot(tmp_path / "t", chunker).id == first.id
    (tmp_path / "t" / "a" / "b" / "c" / "deep.txt").write_bytes(b"DEEP")
    changed = snapshot(tmp_path / "t", chunker)
    assert changed.id != first.id
    assert changed.by_path["a/b/c/deep.txt"].chunks == chunker.chunk_bytes(b"DEEP")
    (tmp_path / "t" / "small.bin").chmod(0o755)
    assert snapshot(tmp_path / "t", chunker).by_path["small.bin"].executable


NAME = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\\\x00:", exclude_categories=("Cs",)),
    min_size=1,
    max_size=6,
).filter(lambda s: s not in (".", ".."))


@st.composite
def specs(draw: st.DrawFn, depth: int = 0) -> Spec:
    spec: Spec = {}
    for name in draw(st.lists(NAME, max_size=5, unique=True)):
        kind = draw(st.sampled_from(["file", "file", "exec", "dir", "link"] if depth < 3 else ["file", "link"]))
        if kind == "file":
            spec[name] = draw(st.binary(max_size=3000))
        elif kind == "exec":
            spec[name] = ("exec", draw(st.binary(max_size=50)))
        elif kind == "dir":
            spec[name] = draw(specs(depth + 1))
        else:  # up to the root, then to any sibling name at the top (it may or may not exist)
            spec[name] = ("link", "/".join([".."] * depth + [draw(NAME)]))
    return spec


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=specs())
def test_snapshot_of_any_generated_tree_equals_the_model(
    tmp_path_factory: pytest.TempPathFactory, chunker: Chunker, spec: Spec
) -> None:
    root = tmp_path_factory.mktemp("gen")
    make_tree(root, spec)
    assert snapshot(root, chunker) == expected_manifest(chunker, spec)


def test_snapshot_of_a_single_file_is_a_file_manifest(tmp_path: Path, chunker: Chunker) -> None:
    data = data_of(50 * KiB, 3)
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "f").chmod(0o700)
    m = snapshot(tmp_path / "f", chunker)
    assert m.root_kind == Kind.FILE
    assert m.entries == (Entry("", Kind.FILE, True, len(data), chunker.chunk_bytes(data), mode=0o700),)


def test_snapshot_of_an_empty_file_and_an_empty_dir(tmp_path: Path, chunker: Chunker) -> None:
    (tmp_path / "f").touch(0o640)
    (tmp_path / "d").mkdir(0o710)
    (tmp_path / "f").chmod(0o640)
    (tmp_path / "d").chmod(0o710)
    assert snapshot(tmp_path / "f", chunker).entries == (Entry("", Kind.FILE, mode=0o640),)
    d = snapshot(tmp_path / "d", chunker)
    assert d.entries == () and d.root_mode == 0o710


def test_symlink_as_root_is_followed_to_a_directory(tmp_path: Path, chunker: Chunker) -> None:
    make_tree(tmp_path / "real", rich_spec())
    os.symlink("real", tmp_path / "alias")
    assert snapshot(tmp_path / "alias", chunker) == snapshot(tmp_path / "real", chunker)


def test_symlink_as_root_is_followed_to_a_file(tmp_path: Path, chunker: Chunker) -> None:
    (tmp_path / "real.bin").write_bytes(b"payload")
    os.symlink("real.bin", tmp_path / "alias")
    os.symlink("alias", tmp_path / "alias2")
    m = snapshot(tmp_path / "alias2", chunker)
    assert m.root_kind == Kind.FILE and m == snapshot(tmp_path / "real.bin", chunker)


def test_snapshot_accepts_str_and_relative_paths(
    tmp_path: Path, chunker: Chunker, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path / "t", {"f": b"1"})
    monkeypatch.chdir(tmp_path)
    assert snapshot("t", chunker) == snapshot(str(tmp_path / "t"), chunker)


# -- what a snapshot refuses ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "links,bad",
    [
        ({"esc": "../outside"}, "esc"),
        ({"abs": "/etc/passwd"}, "abs"),
        ({"root-abs": "/"}, "root-abs"),
        ({"sub/up": "../.."}, "sub/up"),
        ({"sub/L": "..", "M": "sub/L/.."}, "M"),  # through another link of the tree
    ],
)
def test_symlink_leaving_the_tree_raises_unsafe_path_naming_it(
    tmp_path: Path, chunker: Chunker, links: dict[str, str], bad: str
) -> None:
    make_tree(tmp_path / "t", {"sub": {}, "f": b"1"})
    (tmp_path / "outside").write_bytes(b"secret")
    for path, target in links.items():
        os.symlink(target, tmp_path / "t" / path)
    with pytest.raises(UnsafePathError) as info:
        snapshot(tmp_path / "t", chunker)
    assert info.value.path == bad
    assert str(tmp_path / "t" / bad) in str(info.value)


def test_symlink_loop_in_the_tree_raises_unsafe_path(tmp_path: Path, chunker: Chunker) -> None:
    make_tree(tmp_path / "t", {"a": ("link", "b"), "b": ("link", "a")})
    with pytest.raises(UnsafePathError):
        snapshot(tmp_path / "t", chunker)


def test_fifo_in_the_tree_raises_snapshot_error_naming_it(tmp_path: Path, chunker: Chunker) -> None:
    make_tree(tmp_path / "t", {"d": {"f": b"1"}})
    os.mkfifo(tmp_path / "t" / "d" / "pipe")
    with pytest.raises(SnapshotError) as info:
        snapshot(tmp_path / "t", chunker)
    assert info.value.path == str(tmp_path / "t" / "d" / "pipe")
    assert "pipe" in str(info.value)


def test_fifo_as_root_raises_snapshot_error(tmp_path: Path, chunker: Chunker) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SnapshotError, match="pipe"):
        snapshot(tmp_path / "pipe", chunker)


def test_unix_socket_in_the_tree_raises_snapshot_error(chunker: Chunker) -> None:
    # AF_UNIX paths are limited to ~108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory() as d:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(os.path.join(d, "sock"))
            with pytest.raises(SnapshotError, match="sock"):
                snapshot(d, chunker)


def test_missing_root_raises_file_not_found(tmp_path: Path, chunker: Chunker) -> None:
    with pytest.raises(FileNotFoundError) as info:
        snapshot(tmp_path / "nope", chunker)
    assert info.value.filename == str(tmp_path / "nope")
    os.symlink("nope", tmp_path / "dangling")
    with pytest.raises(FileNotFoundError):
        snapshot(tmp_path / "dangling", chunker)


def test_name_that_is_not_utf8_raises_snapshot_error_naming_it(tmp_path: Path, chunker: Chunker) -> None:
    (tmp_path / "t").mkdir()
    with open(os.path.join(os.fsencode(tmp_path / "t"), b"bad-\xff"), "wb") as f:
        f.write(b"x")
    with pytest.raises(SnapshotError, match="bad-"):
        snapshot(tmp_path / "t", chunker)


def _snapshot_as_nobody(root: str) -> dict[str, str]:
    """Snapshot ``root`` in a forked child that has dropped root's privileges."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                with Chunker(SMALL) as c:
                    snapshot(root, c)
                out = {"error": ""}
            except SnapshotError as e:
                out = {"error": type(e).__name__, "path": str(e.path), "message": str(e)}
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                out = {"error": type(e).__name__, "path": "", "message": repr(e)}
            os.write(w, json.dumps(out).encode())
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        raw = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and raw, "child could not drop privileges"
    return json.loads(raw)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder that an unprivileged user can traverse (pytest's own tmp root is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="cas-snapshot-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for p in d.rglob("*"):
            if not p.is_symlink():
                p.chmod(0o700)
        subprocess.run(["rm", "-rf", str(d)], check=True)


@pytest.mark.parametrize("what", ["file", "dir"])
def test_unreadable_entry_raises_snapshot_error_naming_it(shared_tmp: Path, what: str) -> None:
    make_tree(shared_tmp / "t", {"ok": b"1", "locked": b"secret" if what == "file" else {"inner": b"x"}})
    (shared_tmp / "t" / "locked").chmod(0)
    if os.geteuid() == 0:  # root reads anything: check as an ordinary user
        got = _snapshot_as_nobody(str(shared_tmp / "t"))
    else:
        with pytest.raises(SnapshotError) as info, Chunker(SMALL) as c:
            snapshot(shared_tmp / "t", c)
        got = {"error": type(info.value).__name__, "path": str(info.value.path), "message": str(info.value)}
    assert got["error"] == "SnapshotError", got
    assert got["path"] == str(shared_tmp / "t" / "locked")
    assert "ermission" in got["message"]


class VanishingChunker(Chunker):
    """On its first read, deletes every other file of the folder (a concurrent cleanup)."""

    def __init__(self, folder: Path, params: ChunkerParams) -> None:
        super().__init__(params)
        self.folder = folder
        self.first: str | None = None

    def chunk_file(self, fd: int, size_hint: int = -1) -> tuple[bytes, int]:
        if self.first is None:
            ino = os.fstat(fd).st_ino
            for p in self.folder.iterdir():
                if p.stat().st_ino == ino:
                    self.first = p.name
                else:
                    p.unlink()
        return super().chunk_file(fd, size_hint)


def test_entries_that_vanish_during_the_walk_are_left_out(tmp_path: Path) -> None:
    files = {f"f{i}": data_of(100 + i, i) for i in range(5)}
    make_tree(tmp_path / "t", files)  # type: ignore[arg-type]
    with VanishingChunker(tmp_path / "t", SMALL) as c:
        m = snapshot(tmp_path / "t", c)
    assert c.first is not None
    assert [e.path for e in m.entries] == [c.first]
    assert m.entries[0].chunks == c.chunk_bytes(files[c.first])


# -- files that change while they are read (deterministic) ------------------------------------------
class AppendingChunker(Chunker):
    """Appends to the file it reads, on its first ``times`` reads (a concurrent writer)."""

    def __init__(self, path: Path, times: int) -> None:
        super().__init__(SMALL)
        self.path = path
        self.times = times
        self.reads = 0

    def chunk_file(self, fd: int, size_hint: int = -1) -> tuple[bytes, int]:
        self.reads += 1
        if self.reads <= self.times:
            with open(self.path, "ab") as f:
                f.write(b"more")
        return super().chunk_file(fd, size_hint)


def test_file_changing_once_during_the_read_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"base")
    with AppendingChunker(path, times=1) as c:
        m = snapshot(path, c)
        # Read again after the change; once more if that read began within a timestamp tick
        # of the write (see cas.snapshot): 2 or 3 reads, depending on the machine's speed.
        assert c.reads in (2, 3)
        assert m.entries[0].chunks == c.chunk_bytes(b"basemore")


def test_file_changing_on_every_read_raises_file_changed_after_the_retries(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    path = tmp_path / "t" / "log"
    path.write_bytes(b"base")
    with AppendingChunker(path, times=100) as c:
        with pytest.raises(FileChangedError) as info:
            snapshot(tmp_path / "t", c, retries=2)
        assert c.reads == 3
    assert info.value.path == str(path)
    assert isinstance(info.value, SnapshotError)


class FifoSwappingChunker(Chunker):
    """Replaces the file it reads with a FIFO (so the retry opens a FIFO)."""

    def __init__(self, path: Path) -> None:
        super().__init__(SMALL)
        self.path = path

    def chunk_file(self, fd: int, size_hint: int = -1) -> tuple[bytes, int]:
        if not stat.S_ISFIFO(os.lstat(self.path).st_mode):
            os.unlink(self.path)
            os.mkfifo(self.path)
        return super().chunk_file(fd, size_hint)


def test_file_replaced_by_a_fifo_during_the_read_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    outcome: list[BaseException | Manifest] = []

    def run() -> None:
        with FifoSwappingChunker(path) as c:
            try:
                outcome.append(snapshot(path, c))
            except BaseException as e:  # noqa: BLE001 - examined below
                outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # release the blocked open, then fail
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail("snapshot blocked opening a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], SnapshotError), outcome
    assert outcome[0].path == str(path)


# -- the stat cache ---------------------------------------------------------------------------------
def settle_past_racy_window() -> None:
    """Let every file written so far leave the racy window (its ctime is now - RACY_NS).

    Callers give their files an mtime that is not a whole second: the cache may treat those
    as coming from a coarse-grained filesystem, with a longer window.
    """
    time.sleep(RACY_NS / 1e9 + 0.1)


def an_hour_ago_ns() -> int:
    """A past mtime that is not a whole second."""
    return (time.time_ns() // 10**9 - 3600) * 10**9 + 123_456_789


def test_stat_cache_skips_unchanged_files_and_rereads_changed_ones(tmp_path: Path) -> None:
    spec: Spec = {
        "a.bin": data_of(20 * KiB, 1),
        "b.bin": data_of(5000, 2),
        "d": {"c.bin": data_of(300, 3), "e": {}},
        "x.sh": ("exec", b"#!/bin/sh\n"),
        "l": ("link", "a.bin"),
    }
    root = tmp_path / "t"
    make_tree(root, spec)
    past = an_hour_ago_ns()
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.utime(p, ns=(past, past))
    settle_past_racy_window()
    cache_dir = tmp_path / "cache"

    with StatCache(cache_dir) as cache, CountingChunker(SMALL) as c1:
        first = snapshot(root, c1, cache)
    assert c1.reads == 4
    assert first == expected_manifest(c1, spec)

    # A fresh cache object on the same LMDB (as a new process would open it): nothing read.
    with StatCache(cache_dir) as cache, CountingChunker(SMALL) as c2:
        assert snapshot(root, c2, cache) == first
        assert c2.reads == 0

        # Same size, new bytes, and even the old mtime put back: the ctime still moved.
        target = root / "b.bin"
        old = target.stat()
        target.write_bytes(data_of(5000, 99))
        os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns))
        assert target.stat().st_size == old.st_size and target.stat().st_mtime_ns == old.st_mtime_ns
        changed = snapshot(root, c2, cache)
        assert c2.reads == 1
        assert changed.by_path["b.bin"].chunks == c2.chunk_bytes(data_of(5000, 99))
        assert changed.by_path["a.bin"] == first.by_path["a.bin"]

        # Rewritten again, mtime now: racy, so it is read (twice: once more after the
        # timestamp tick, see cas.snapshot), not cached, and read again next time.
        target.write_bytes(data_of(5000, 98))
        soon = time.time_ns() + 60 * 10**9  # an mtime that stays "now" for the whole test
        os.utime(target, ns=(soon, soon))
        before = c2.reads
        assert snapshot(root, c2, cache).by_path["b.bin"].chunks == c2.chunk_bytes(data_of(5000, 98))
        assert c2.reads > before
        before = c2.reads
        assert snapshot(root, c2, cache).by_path["b.bin"].chunks == c2.chunk_bytes(data_of(5000, 98))
        assert c2.reads > before

    # Other chunking parameters do not use these entries.
    os.utime(root / "b.bin", ns=(past, past))  # no longer racy: each file is read exactly once
    other = ChunkerParams(min_size=512, avg_size=1 * KiB, max_size=4 * KiB)
    with StatCache(cache_dir) as cache, CountingChunker(other) as c3:
        snapshot(root, c3, cache)
        assert c3.reads == 4


def test_stat_cache_does_not_cache_racy_files(tmp_path: Path) -> None:
    root = tmp_path / "t"
    make_tree(root, {"new.bin": data_of(3000, 1)})
    soon = time.time_ns() + 60 * 10**9  # racy for the whole test, however slow the machine
    os.utime(root / "new.bin", ns=(soon, soon))
    with StatCache(tmp_path / "cache") as cache, CountingChunker(SMALL) as c:
        first = snapshot(root, c, cache)
        after_first = c.reads
        second = snapshot(root, c, cache)
    assert after_first >= 1 and c.reads > after_first  # the second snapshot read it again
    assert first == second


def test_stat_cache_entry_is_not_used_for_a_file_replaced_by_rename(tmp_path: Path) -> None:
    root = tmp_path / "t"
    make_tree(root, {"f": data_of(3000, 1)})
    stamp = an_hour_ago_ns()
    os.utime(root / "f", ns=(stamp, stamp))
    settle_past_racy_window()
    with StatCache(tmp_path / "cache") as cache, CountingChunker(SMALL) as c:
        snapshot(root, c, cache)
        (tmp_path / "new").write_bytes(data_of(3000, 2))
        os.utime(tmp_path / "new", ns=(stamp, stamp))  # same size and mtime, another inode
        os.replace(tmp_path / "new", root / "f")
        m = snapshot(root, c, cache)
    assert c.reads == 2
    assert m.by_path["f"].chunks == c.chunk_bytes(data_of(3000, 2))


def test_losing_the_stat_cache_loses_nothing(tmp_path: Path, chunker: Chunker) -> None:
    root = tmp_path / "t"
    make_tree(root, rich_spec())
    with StatCache(tmp_path / "cache") as cache:
        with_cache = snapshot(root, chunker, cache)
    subprocess.run(["rm", "-rf", str(tmp_path / "cache")], check=True)
    with StatCache(tmp_path / "cache") as cache:
        assert snapshot(root, chunker, cache) == with_cache == snapshot(root, chunker)


# -- a real race: a writer process rewriting a file while snapshots are taken -------------------------
SIZE = 6 * MiB
PIECE = 256 * KiB

WRITER = textwrap.dedent(
    """
    import os, random, sys, time
    path = sys.argv[1]
    size, piece = int(sys.argv[2]), int(sys.argv[3])
    seconds, pause = float(sys.argv[4]), float(sys.argv[5])
    contents = [random.Random(1).randbytes(size), random.Random(2).randbytes(size)]
    rng = random.Random(0)
    end = time.monotonic() + seconds
    rewrites = 0
    while time.monotonic() < end:
        data = memoryview(contents[rewrites % 2])
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # torn states from here ...
        off = 0
        while off < size:
            off += os.write(fd, data[off : off + piece])
        os.close(fd)  # ... to here
        rewrites += 1
        time.sleep(rng.random() * pause)
    print(rewrites)
    """
)


def run_race(tmp_path: Path, seconds: float, pause: float) -> dict[str, object]:
    """Snapshot ``tmp_path/t`` over and over while a writer process rewrites ``t/f``."""
    a, b = data_of(SIZE, 1), data_of(SIZE, 2)
    root = tmp_path / "t"
    root.mkdir()
    path = root / "f"
    path.write_bytes(a)
    with Chunker(ChunkerParams(), segment_size=1 * MiB) as c:
        whole = {c.chunk_bytes(a): "A", c.chunk_bytes(b): "B"}
        prefixes: dict[tuple[int, bytes], bool] = {}

        def is_prefix_state(size: int, chunks: bytes) -> bool:
            """Whether the content is A[:size] or B[:size]: a state truncate+write passes through."""
            key = (size, chunks)
            if key not in prefixes:
                prefixes[key] = chunks in (c.chunk_bytes(a[:size]), c.chunk_bytes(b[:size]))
            return prefixes[key]

        outcomes = {"A": 0, "B": 0, "changed": 0, "partial": 0}
        torn: list[str] = []
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(SIZE), str(PIECE), str(seconds), str(pause)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            i = 0
            while writer.poll() is None:
                i += 1
                try:
                    m = snapshot(root, c, retries=i % 3)
                except FileChangedError as e:
                    assert e.path == str(path)
                    outcomes["changed"] += 1
                    continue
                assert [e.path for e in m.entries] == ["f"]
                entry = m.entries[0]
                if entry.chunks in whole:
                    outcomes[whole[entry.chunks]] += 1
                elif is_prefix_state(entry.size, entry.chunks):
                    outcomes["partial"] += 1
                else:
                    torn.append(f"size {entry.size}")
        finally:
            out, _ = writer.communicate(timeout=60)
    return {**outcomes, "torn": torn, "rewrites": int(out)}


def test_snapshots_during_concurrent_rewrites_capture_only_states_the_file_had(tmp_path: Path) -> None:
    """Each snapshot is FileChangedError, or exactly A, B, or a state between truncate and the
    end of the write (a prefix of A or B, which the file really held) - never a mix."""
    got = run_race(tmp_path, seconds=4.0, pause=0.03)
    assert got["torn"] == [], got
    assert got["rewrites"] >= 20, got  # the writer really raced the snapshots
    assert got["changed"] >= 1, got  # changes during reads were seen (and refused)
    assert got["A"] + got["B"] >= 1, got  # and whole states were captured
