"""The product's main invariant (SPEC "Path": ``get``), driven by hypothesis.

After every ``get`` the consumer's tree equals the origin's tree at the time of the get
(paths, bytes, executable bits, links), and the transfer moved exactly the chunks the
consumer lacked: ``chunks_transferred`` = the distinct chunk ids of the origin's tree minus
those found in the consumer's files before the get, and ``bytes_transferred`` at most their
payload sizes on the wire (less where a changed chunk came as a block delta). The expectations are computed here, independently: trees are
read byte by byte, cut with the chunker and hashed with BLAKE3 by this module, and the wire
size of a chunk is what zstd-when-it-pays makes of it.

Speed: the property runs many sequences of (origin edits, consumer gets with or without
overwrite, consumer local edits) without spawning processes. The origin is a real
:class:`OriginService` on loopback in this process; the consumer side is the real
``pathapi.transfer.get`` with a :class:`WorkContext` set as the current one (what a work
process does, minus the spawning). One App-based test then runs a fixed sequence through
real work processes.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from trees import Model, chunks_of, read_tree

from cas.chunking import DEFAULT_PARAMS, Chunker, ChunkerParams
from cas.compress import maybe_compress
from cas.workspace import Workspace
from pathapi import App, Flow, Path, Work
from pathapi.aio import io_loop
from pathapi.artifacts import ArtifactStore
from pathapi.wire.client import close_sessions
from pathapi.runtime.context import WorkContext, current, set_current
from pathapi.wire.origin import OriginService
from pathapi.transfer import TransferRecord, get

KiB = 1024
MiB = 1024 * KiB
ORIGIN = "root.origin"
CONSUMER = "root.consumer"
#: Small chunks, so that files of a few hundred KiB have dozens of them.
SMALL = ChunkerParams(min_size=1 * KiB, avg_size=4 * KiB, max_size=16 * KiB)
#: Files are slices of one random blob, so that different files and versions share chunks.
BLOB = random.Random(1234).randbytes(1 * MiB)


# -- trees, read independently -------------------------------------------------------------
def show(tree: Model | None) -> dict[str, Any] | None:
    if tree is None:
        return None
    return {k: (v[0], len(v[1]), v[2]) if v[0] == "file" else v for k, v in tree.items()}


# -- edits -----------------------------------------------------------------------------------
NAMES = ["a", "b", "sub/c", "sub/d", "sub/deep/e", "x y/é"]  # also a space and non-ASCII
LINKS = {"l1": "a", "sub/l2": "../b", "l3": "sub"}  # links that stay inside the tree
BASE_SIZES = [123 * KiB, 40 * KiB, 200 * KiB, 10 * KiB, 60 * KiB, 0]  # every tree starts with NAMES

Edit = tuple[Any, ...]

_write = st.tuples(st.just("write"), st.sampled_from(NAMES), st.integers(0, len(BLOB) - 1),
                  st.integers(0, 300 * KiB))
_patch = st.tuples(st.just("patch"), st.sampled_from(NAMES), st.floats(0, 1), st.integers(1, 8 * KiB),
                   st.integers(0, 2**32))
edits = st.one_of(  # repeated branches weigh more
    _write, _write, _write, _patch, _patch, _patch,
    st.tuples(st.just("append"), st.sampled_from(NAMES), st.integers(1, 40 * KiB), st.integers(0, 2**32)),
    st.tuples(st.just("truncate"), st.sampled_from(NAMES), st.floats(0, 1)),
    st.tuples(st.just("delete"), st.sampled_from([*NAMES, "sub", *LINKS])),
    st.tuples(st.just("chmod"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("link"), st.sampled_from(sorted(LINKS))),
    st.tuples(st.just("copy"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
)

def apply_edit(root: FsPath, edit: Edit) -> None:
    """Perform ``edit`` on the folder ``root`` (an edit that does not apply is a no-op)."""
    kind, name = edit[0], edit[1]
    path = root / name
    if kind == "write":
        off, size = edit[2], edit[3]
        data = (BLOB + BLOB)[off : off + size]
        if path.is_symlink() or path.is_dir():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.is_symlink():
            return
        path.write_bytes(data)
    elif kind in ("patch", "append", "truncate", "chmod"):
        if path.is_symlink() or not path.is_file():
            return
        if kind == "patch":
            size = path.stat().st_size
            at = int(edit[2] * size)
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(random.Random(edit[4]).randbytes(edit[3]))
        elif kind == "append":
            with open(path, "ab") as f:
                f.write(random.Random(edit[3]).randbytes(edit[2]))
        elif kind == "truncate":
            os.truncate(path, int(edit[2] * path.stat().st_size))
        else:
            os.chmod(path, 0o755 if edit[2] else 0o644)
    elif kind == "delete":
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    elif kind == "link":
        if os.path.lexists(path) or not path.parent.is_dir() or path.parent.is_symlink():
            return
        os.symlink(LINKS[name], path)
    elif kind == "rand":  # fresh random bytes: chunks nobody holds
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(random.Random(edit[3]).randbytes(edit[2]))
    elif kind == "copy":  # a second file with the same chunks
        dst = root / edit[2]
        if path.is_symlink() or not path.is_file() or os.path.lexists(dst) or dst.parent.is_symlink():
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)


_origin_edit = st.tuples(st.just("origin"), edits)
_consumer_edit = st.tuples(st.just("consumer"), edits)
_get = st.tuples(st.just("get"), st.sampled_from([True, True, True, False]))  # the overwrite flag
_removal = st.one_of(  # acted on only for some values: hypothesis otherwise favours them
    st.tuples(st.just("consumer_rm"), st.integers(0, 5)),  # the whole local copy removed (at 3)
    st.tuples(st.just("origin_rm"), st.integers(0, 9)),  # the path vanishes at the origin (at 4)
)
steps = st.one_of(*[_origin_edit] * 8, *[_consumer_edit] * 2, *[_get] * 5, _removal)  # repeats weigh more


# -- one origin service and one consumer context, in this process -------------------------------
@dataclass
class Rig:
    origin_root: FsPath
    consumer_root: FsPath
    ctx: WorkContext
    chunker: Chunker
    counter: Iterator[int]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    base = tmp_path_factory.mktemp("sync_property")
    origin_root = base / "works" / ORIGIN
    consumer_root = base / "works" / CONSUMER
    origin_root.mkdir(parents=True)
    consumer_root.mkdir(parents=True)
    secret = "s3cret-" + os.urandom(8).hex()
    origin_ws = Workspace(base / "state" / ORIGIN, params=SMALL)
    service = OriginService(ORIGIN, str(origin_root), secret, origin_ws)
    url = io_loop().run(service.start(), timeout=30)
    consumer_ws = Workspace(base / "state" / CONSUMER, params=SMALL)
    artifacts = ArtifactStore.open(None, base)
    ctx = WorkContext(CONSUMER, str(consumer_root), consumer_ws, artifacts, secret, 10.0,
                      registry={ORIGIN: url, CONSUMER: None}, in_run=True)
    previous = current()
    set_current(ctx)
    chunker = Chunker(SMALL)
    try:
        yield Rig(origin_root, consumer_root, ctx, chunker, itertools.count())
    finally:
        set_current(previous)
        io_loop().run(service.stop(), timeout=30)
        io_loop().run(close_sessions(), timeout=10)
        chunker.close()
        consumer_ws.close()
        origin_ws.close()
        artifacts.close()


def _note(text: str, outcome: str | None = None) -> None:
    try:
        note(text)
        if outcome is not None:
            event(outcome)
    except InvalidArgument:  # outside a hypothesis test
        pass


def check_get(rig: Rig, p: Path, origin_dest: FsPath, dest: FsPath, overwrite: bool) -> None:
    """One get, checked against what is on both sides just before it."""
    before_origin = read_tree(origin_dest)
    before_local = read_tree(dest)
    _note(f"get(overwrite={overwrite}): origin {show(before_origin)} local {show(before_local)}")
    if before_local is not None and not overwrite:
        with pytest.raises(FileExistsError):
            get(p, overwrite=False)
        assert read_tree(dest) == before_local, "a refused get changed the local tree"
        _note("refused", "get: FileExistsError")
        return
    if before_origin is None:
        with pytest.raises(FileNotFoundError) as info:
            get(p, overwrite=overwrite)
        assert os.fspath(p) in str(info.value) and ORIGIN in str(info.value)
        assert read_tree(dest) == before_local, "a failed get changed the local tree"
        _note("missing", "get: FileNotFoundError")
        return
    record = get(p, overwrite=overwrite)
    assert isinstance(record, TransferRecord)
    after = read_tree(dest)
    assert after == before_origin, f"local {show(after)} != origin {show(before_origin)}"
    # exactly the chunks the consumer lacked crossed the wire
    wanted = chunks_of(before_origin, rig.chunker)
    held = set(chunks_of(before_local, rig.chunker))
    lacking = set(wanted) - held
    assert record.chunks_transferred == len(lacking), (record, len(wanted), len(held))
    # ...each whole (zstd where it pays) or as a block delta against the consumer's old bytes
    # at its place, which is never more than the whole chunk
    whole = sum(len(maybe_compress(wanted[c])[1]) for c in lacking)
    assert (0 < record.bytes_transferred <= whole) if lacking else record.bytes_transferred == 0, (record, whole)
    assert record.chunks_reused == len(wanted) - len(lacking)
    files = [n for n in before_origin.values() if n[0] == "file"]
    assert record.files == len(files)
    assert record.bytes_total == sum(len(n[1]) for n in files)
    assert record.source == "origin"
    assert not (FsPath(rig.ctx.workspace.state_dir) / "txn").exists()
    _note(f"{record}", "get: " + ("all moved" if not held & set(wanted) else
                                 "nothing moved" if not lacking else "some moved, some reused"))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    initial=st.lists(edits, max_size=6),
    script=st.lists(steps, min_size=6, max_size=20),
    file_root=st.booleans(),
)
def test_get_makes_the_local_tree_equal_the_origins_and_moves_only_lacking_chunks(
    rig: Rig, initial: list[Edit], script: list[tuple[str, Any]], file_root: bool
) -> None:
    n = next(rig.counter)
    rel = f"ex{n}/data"
    origin_dest = rig.origin_root / rel
    dest = rig.consumer_root / rel
    p = Path(f"lit://{rel}", origin=ORIGIN)

    def edit(root: FsPath, e: Edit) -> None:
        if file_root:  # the shared path is one file: edits of "a" act on it
            if e[1] != "a" or e[0] in ("link", "copy"):
                return
            scratch = root.parent / (root.name + ".d")
            scratch.mkdir(parents=True, exist_ok=True)
            if root.exists():
                shutil.move(root, scratch / "a")
            apply_edit(scratch, e)
            if (scratch / "a").is_file():
                shutil.move(scratch / "a", root)
            shutil.rmtree(scratch)
        else:
            root.mkdir(parents=True, exist_ok=True)
            apply_edit(root, e)

    # every tree starts with some files, then the drawn edits
    base = [("write", name, 37_000 * i, size) for i, (name, size) in enumerate(zip(NAMES, BASE_SIZES))]
    for e in [*base, *initial]:
        edit(origin_dest, e)
    origin_dest.parent.mkdir(parents=True, exist_ok=True)
    if not file_root:
        origin_dest.mkdir(parents=True, exist_ok=True)
    # A first get fills the local copy, so that the script's gets are mostly updates.
    for kind, arg in [("get", False), *script, ("get", True)]:
        if kind == "origin":
            note(f"origin edit {arg}")
            edit(origin_dest, arg)
        elif kind == "consumer":
            if os.path.lexists(dest) and (file_root or dest.is_dir()):
                note(f"consumer edit {arg}")
                edit(dest, arg)
        elif kind == "consumer_rm":
            if arg != 3:
                continue
            if dest.is_dir():
                shutil.rmtree(dest)
            elif os.path.lexists(dest):
                dest.unlink()
        elif kind == "origin_rm":
            if arg != 4:
                continue
            note("origin removes the path")
            if origin_dest.is_dir():
                shutil.rmtree(origin_dest)
            elif os.path.lexists(origin_dest):
                origin_dest.unlink()
        else:
            check_get(rig, p, origin_dest, dest, overwrite=arg)


def test_a_local_copy_of_another_kind_is_replaced(rig: Rig) -> None:
    """A file where the origin has a folder (and the reverse) is replaced by overwrite=True;
    chunks inside the old local file still count as held."""
    n = next(rig.counter)
    origin_dest = rig.origin_root / f"kind{n}" / "data"
    dest = rig.consumer_root / f"kind{n}" / "data"
    origin_dest.mkdir(parents=True)
    (origin_dest / "f").write_bytes(BLOB[:200 * KiB])
    dest.parent.mkdir(parents=True)
    dest.write_bytes(BLOB[:100 * KiB])  # a file where the origin has a folder
    p = Path(f"lit://kind{n}/data", origin=ORIGIN)
    check_get(rig, p, origin_dest, dest, overwrite=True)
    shutil.rmtree(origin_dest)
    origin_dest.write_bytes(BLOB[50 * KiB : 300 * KiB])  # and now the reverse
    check_get(rig, p, origin_dest, dest, overwrite=True)


# -- the same invariant through real work processes --------------------------------------------
def tree_chunks(root: FsPath) -> tuple[Model | None, dict[bytes, bytes]]:
    tree = read_tree(root)
    with Chunker(DEFAULT_PARAMS) as chunker:
        return tree, chunks_of(tree, chunker)


class Producer(Work):
    def __init__(self) -> None:
        super().__init__()
        self.out = "lit://out"

    def run(self, script: list[Edit]) -> None:
        os.makedirs(self.out, exist_ok=True)
        for e in script:
            apply_edit(FsPath(self.out), e)


class Receiver(Work):
    def __init__(self) -> None:
        super().__init__()
        self.source: Path | None = None
        self.records: list[dict[str, Any] | str] = []

    def run(self, action: str, overwrite: bool = True, script: list[Edit] | None = None) -> None:
        assert self.source is not None
        if action == "edit":
            for e in script or []:
                apply_edit(FsPath(self.source), e)
            return
        try:
            self.source.get(overwrite=overwrite)
        except FileExistsError as e:
            self.records.append(f"FileExistsError: {e}")
            return
        lt = self.source.last_transfer
        assert lt is not None
        self.records.append({k: getattr(lt, k) for k in lt.__dataclass_fields__})


class SyncFlow(Flow):
    def __init__(self, root: FsPath) -> None:
        super().__init__()
        self.producer = Producer()
        self.receiver = Receiver()
        self.root = root
        self.checks: list[tuple[Any, ...]] = []

    def run(self) -> None:
        origin = self.root / "works" / "root.producer" / "out"
        local = self.root / "works" / "root.receiver" / "out"
        self.receiver.source = self.producer.out

        def get(overwrite: bool) -> None:
            want, want_chunks = tree_chunks(origin)
            had, had_chunks = tree_chunks(local)
            self.receiver.run("get", overwrite=overwrite)
            got, _ = tree_chunks(local)
            lacking = set(want_chunks) - set(had_chunks)
            wire = sum(len(maybe_compress(want_chunks[c])[1]) for c in lacking)
            self.checks.append((overwrite, want, had, got, len(lacking), wire, self.receiver.records[-1]))

        # a 3 MiB file, a copy of it edited in one place, a small executable, a link, an empty file
        self.producer.run([("rand", "a", 3 * MiB, 1), ("copy", "a", "sub/c"), ("patch", "sub/c", 0.9, 4 * KiB, 2),
                           ("rand", "b", 10_000, 3), ("chmod", "b", True), ("link", "l1"),
                           ("write", "x y/é", 7, 0)])
        get(False)  # nothing here yet: every distinct chunk moves, once
        self.producer.run([("patch", "a", 0.5, 4 * KiB, 4), ("append", "sub/c", 300 * KiB, 5), ("delete", "b")])
        get(True)  # only the chunks around the edits
        get(False)  # refused: exists locally
        self.receiver.run("edit", script=[("patch", "a", 0.3, 2000, 6), ("rand", "sub/d", 2 * MiB, 7),
                                          ("chmod", "a", True), ("delete", "l1")])
        get(True)  # local edits undone, local-only file removed; a's lost chunk is still in sub/c
        get(True)  # nothing to do


def test_sync_invariant_through_real_work_processes(tmp_path: FsPath) -> None:
    root = tmp_path / "app"
    flow = SyncFlow(root)
    App(flow, root=root).run()
    assert len(flow.checks) == 5
    for i, (overwrite, want, had, got, lacking, wire, record) in enumerate(flow.checks):
        if i == 2:
            assert isinstance(record, str) and record.startswith("FileExistsError"), record
            assert got == had
            continue
        assert isinstance(record, dict), record
        assert got == want, f"step {i}: local {show(got)} != origin {show(want)}"
        assert record["chunks_transferred"] == lacking, (i, record, lacking)
        assert (0 < record["bytes_transferred"] <= wire) if lacking else record["bytes_transferred"] == 0, (i, record, wire)
        assert record["source"] == "origin"
    # the numbers that make it a delta transfer, not a copy
    first, second, fourth, fifth = (flow.checks[i][-1] for i in (0, 1, 3, 4))
    assert first["bytes_total"] > 6 * MiB and first["bytes_transferred"] < 4.5 * MiB  # the copy moved once
    assert 0 < second["chunks_transferred"] <= 6 and second["chunks_reused"] >= 5
    assert second["bytes_transferred"] < 2 * MiB
    assert fourth["chunks_reused"] > 0
    assert fifth["chunks_transferred"] == 0 and fifth["bytes_transferred"] == 0
