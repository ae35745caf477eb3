"""Sync of a folder (or file) to a manifest: the receiver ends equal to the origin's
snapshot, fetches only chunks it does not hold, and a sync that fails changes nothing.

Each scene has an origin folder with its own :class:`Workspace`, a receiver with another,
and a chunk store standing for the origin's service (the *remote*), wrapped to record
every chunk that crosses it.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cas.chunking import ChunkerParams
from cas.errors import ChunkCorruptError, ChunkNotFoundError, MaterializeError, UnsafePathError
from cas.hashing import ChunkId, verify
from cas.manifest import Entry, Kind, Manifest
from cas.plan import plan_update
from cas.sources import SeedSource
from cas.store.memory import MemoryChunkStore
from trees import (
    BYTE_OPS,
    SMALL_PARAMS,
    KiB,
    MiB,
    CountingSource,
    Dir,
    File,
    Link,
    Model,
    apply_edits,
    chunk_ids_in,
    disk_usage,
    edit_sequences,
    fast_chunker,
    make_bytes,
    make_workspace,
    manifest_of,
    put_tree_chunks,
    read_tree,
    single_files,
    trees,
    write_tree,
)

HEAVY = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# -- chunk sources standing for the remote ------------------------------------------
class CorruptingSource:
    """A remote whose transport flips a bit in some chunks; it verifies what it received,
    as every real source does, so the damage surfaces as ChunkCorruptError."""

    def __init__(self, inner, bad: set[ChunkId]) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.bad = bad
        self.location = "corrupting-remote"

    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        return self.inner.has_many(ids)

    def get_many(self, ids: Iterable[ChunkId]) -> Iterator[tuple[ChunkId, bytes]]:
        for cid, data in self.inner.get_many(ids):
            if cid in self.bad:
                data = bytes([data[0] ^ 0x40]) + bytes(data[1:])
            verify(cid, data, self.location)
            yield cid, data


# -- scenes -------------------------------------------------------------------------
@dataclass
class Scene:
    base: str
    store: MemoryChunkStore

    def __post_init__(self) -> None:
        self.origin = os.path.join(self.base, "origin", "tree")
        self.dest = os.path.join(self.base, "recv", "tree")
        self.ows = make_workspace(os.path.join(self.base, "origin", "state"))
        self.rws = make_workspace(os.path.join(self.base, "recv", "state"))
        os.makedirs(os.path.dirname(self.origin), exist_ok=True)

    @property
    def txn(self) -> str:
        return os.path.join(self.rws.state_dir, "txn")

    def publish(self) -> Manifest:
        """Snapshot the origin and make its chunks available from the remote."""
        m = self.ows.snapshot(self.origin)
        put_tree_chunks(self.store, self.origin, m)
        return m

    def close(self) -> None:
        self.ows.close()
        self.rws.close()


@contextmanager
def scene(parent: str | os.PathLike[str]) -> Iterator[Scene]:
    base = tempfile.mkdtemp(dir=parent)
    s = Scene(base, MemoryChunkStore())
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sc(tmp_path):
    with scene(tmp_path) as s:
        yield s


@pytest.fixture(scope="module")
def chunker():
    c = fast_chunker()
    yield c
    c.close()


def sync_and_check(s: Scene, origin_model: Model, chunker, *, events: bool = False, **kw) -> CountingSource:  # type: ignore[no-untyped-def]
    """Publish the origin, sync the receiver, and check the whole contract of one sync.
    ``events``: record what the plan holds (for --hypothesis-show-statistics)."""
    m = s.publish()
    assert read_tree(s.origin) == origin_model
    assert m == manifest_of(origin_model, chunker=chunker)  # snapshot agrees with the bytes
    before = read_tree(s.dest)
    held = chunk_ids_in(before, chunker)  # computed from the bytes, not by the receiver's snapshot
    expected = m.chunk_ids() - held
    assert set(s.rws.fetch_plan(m, s.dest).missing) == expected

    if events:
        plan = plan_update(s.rws.local_manifest(s.dest), m)
        for action in sorted({step.action.value for step in plan.steps} | ({"remove"} if plan.removals else set())):
            event(f"plan has {action}")

    remote = CountingSource(s.store)
    result = s.rws.sync(m, s.dest, remote=remote, **kw)

    assert read_tree(s.dest) == origin_model  # paths, kinds, bytes, exec bits, link targets
    assert s.rws.snapshot(s.dest).id == m.id
    assert set(remote.delivered) == expected  # nothing held was fetched, everything else was
    assert len(remote.delivered) == len(expected)  # each once
    assert (result.chunks_fetched, result.bytes_fetched) == (len(expected), sum(m.chunk_sizes()[c] for c in expected))
    assert result.files == sum(1 for _ in m.files()) and result.bytes_total == m.total_size
    assert not os.path.lexists(s.txn)
    return remote


# -- the main properties ----------------------------------------------------------
def check_rounds(base: str | os.PathLike[str], chunker, origin: Model, rounds) -> None:  # type: ignore[no-untyped-def]
    """Sync the origin, then per round: edit the origin, edit the receiver, sync again."""
    with scene(base) as s:
        write_tree(s.origin, origin)
        model = origin
        sync_and_check(s, model, chunker, events=True)
        for origin_edits, receiver_edits in rounds:
            model = apply_edits(s.origin, model, origin_edits)
            apply_edits(s.dest, read_tree(s.dest), receiver_edits)  # local changes, overwritten by the sync
            sync_and_check(s, model, chunker, events=True)


rounds_of_edits = st.lists(st.tuples(edit_sequences(max_size=6), edit_sequences(max_size=4)), min_size=1, max_size=3)


@HEAVY
@given(origin=trees(), rounds=rounds_of_edits)
def test_sync_makes_the_receiver_equal_the_origin_and_fetches_exactly_the_chunks_it_did_not_hold(
    tmp_path_factory, chunker, origin, rounds
):
    check_rounds(tmp_path_factory.getbasetemp(), chunker, origin, rounds)


@pytest.mark.slow
@settings(HEAVY, max_examples=int(os.environ.get("CAS_SOAK_EXAMPLES", "40")))
@given(
    origin=trees(max_entries=40, max_depth=5),
    rounds=st.lists(st.tuples(edit_sequences(max_size=12), edit_sequences(max_size=6)), min_size=1, max_size=6),
)
def test_soak_sync_makes_the_receiver_equal_the_origin_over_long_edit_histories(
    tmp_path_factory, chunker, origin, rounds
):
    """Bigger trees, longer histories; ``CAS_SOAK_EXAMPLES`` examples (default 40)."""
    check_rounds(tmp_path_factory.getbasetemp(), chunker, origin, rounds)


@HEAVY
@given(
    origin=single_files(min_size=16 * KiB),
    rounds=st.lists(
        st.tuples(edit_sequences(BYTE_OPS + ("chmod",), max_size=4), edit_sequences(BYTE_OPS, max_size=2)),
        min_size=1,
        max_size=3,
    ),
)
def test_sync_of_a_single_file_makes_it_equal_and_fetches_only_chunks_it_did_not_hold(
    tmp_path_factory, chunker, origin, rounds
):
    with scene(tmp_path_factory.getbasetemp()) as s:
        write_tree(s.origin, origin)
        model = origin
        sync_and_check(s, model, chunker, events=True)
        for origin_edits, receiver_edits in rounds:
            model = apply_edits(s.origin, model, origin_edits)
            apply_edits(s.dest, read_tree(s.dest), receiver_edits)
            sync_and_check(s, model, chunker, events=True)


# -- examples -----------------------------------------------------------------------
def sample_tree(seed: int = 1) -> Model:
    rnd = random.Random(seed)
    return {
        "a.bin": File(rnd.randbytes(200 * KiB)),
        "run.sh": File(b"#!/bin/sh\necho hi\n", True),
        "empty": File(b""),
        "sub": Dir(),
        "sub/b.txt": File(make_bytes("pool", seed, 60 * KiB)),
        "sub/deeper": Dir(),
        "sub/deeper/ünïcødé 日本": File(rnd.randbytes(3000)),
        "sub/empty-dir": Dir(),
        "link-to-a": Link("a.bin"),
        "sub/up": Link("../run.sh"),
    }


def test_sync_twice_fetches_nothing_the_second_time(sc, chunker):
    write_tree(sc.origin, sample_tree())
    first = sync_and_check(sc, sample_tree(), chunker)
    assert first.delivered
    second = sync_and_check(sc, sample_tree(), chunker)
    assert second.delivered == []


@pytest.mark.parametrize("in_place", [False, True], ids=["new-inode", "in-place"])
def test_sync_of_a_little_changed_file_writes_only_the_changed_chunks_and_its_new_mode(sc, chunker, in_place):
    data = make_bytes("random", 5, 1 * MiB)
    write_tree(sc.origin, {"big": File(data), "other": File(b"x")})
    sync_and_check(sc, {"big": File(data), "other": File(b"x")}, chunker)
    old = open(os.path.join(sc.dest, "big"), "rb")  # a reader of the old file
    inode = os.fstat(old.fileno()).st_ino
    changed = data[:300_000] + b"patched!" + data[300_008:700_000] + b"shorter"
    os.unlink(os.path.join(sc.origin, "big"))
    with open(os.path.join(sc.origin, "big"), "wb") as f:
        f.write(changed)
    os.chmod(os.path.join(sc.origin, "big"), 0o755)
    tree = {"big": File(changed, True), "other": File(b"x")}
    remote = sync_and_check(sc, tree, chunker, in_place=in_place)
    sizes = manifest_of(tree, chunker=chunker).chunk_sizes()
    assert sum(sizes[c] for c in remote.delivered) < 200_000  # the changed chunks only
    with old:
        if in_place:  # patched where it is: the reader sees the new bytes
            assert os.lstat(os.path.join(sc.dest, "big")).st_ino == inode
        else:  # a new file renamed into place: the reader keeps the old bytes
            assert os.lstat(os.path.join(sc.dest, "big")).st_ino != inode
            assert old.read() == data
    m = manifest_of(tree, chunker=chunker)
    result = sc.rws.sync(m, sc.dest, remote=sc.store)  # nothing left to do
    assert (result.bytes_written, result.chunks_fetched) == (0, 0)


def test_sync_writes_no_more_than_the_changed_chunks_of_a_patched_file(sc, chunker):
    data = make_bytes("random", 6, 2 * MiB)
    write_tree(sc.origin, {"": File(data)})
    sync_and_check(sc, {"": File(data)}, chunker)
    changed = data[:1_000_000] + b"X" + data[1_000_001:]
    with open(sc.origin, "r+b") as f:
        f.seek(1_000_000)
        f.write(b"X")
    m = sc.publish()
    result = sc.rws.sync(m, sc.dest, remote=sc.store)
    assert read_tree(sc.dest) == {"": File(changed)}
    assert 0 < result.bytes_written <= 2 * SMALL_PARAMS.max_size
    assert result.chunks_fetched <= 2


def test_sync_reuses_chunks_of_files_moved_or_copied_locally(sc, chunker):
    tree = sample_tree()
    write_tree(sc.origin, tree)
    sync_and_check(sc, tree, chunker)
    os.rename(os.path.join(sc.origin, "a.bin"), os.path.join(sc.origin, "sub", "moved.bin"))
    shutil.copy(os.path.join(sc.origin, "sub", "b.txt"), os.path.join(sc.origin, "copy.txt"))
    new = {**{p: n for p, n in tree.items() if p != "a.bin"}, "sub/moved.bin": tree["a.bin"], "copy.txt": tree["sub/b.txt"]}
    remote = sync_and_check(sc, new, chunker)
    assert remote.delivered == []


def test_sync_takes_chunks_from_local_sources_before_the_remote(sc, chunker):
    tree = sample_tree()
    write_tree(sc.origin, tree)
    m = sc.publish()
    local_store = MemoryChunkStore()
    put_tree_chunks(local_store, sc.origin, manifest_of({"a.bin": tree["a.bin"]}, chunker=chunker))
    remote = CountingSource(sc.store)
    result = sc.rws.sync(m, sc.dest, remote=remote, sources=[local_store])
    assert read_tree(sc.dest) == tree
    assert set(remote.delivered) == m.chunk_ids() - set(local_store.iter_ids())
    assert result.chunks_reused == len(set(local_store.iter_ids()))


def test_sync_without_a_remote_works_when_every_chunk_is_held_locally(sc, chunker):
    tree = sample_tree()
    write_tree(sc.origin, tree)
    m = sc.publish()
    sc.rws.sync(m, sc.dest, sources=[sc.store])
    assert read_tree(sc.dest) == tree


def test_sync_fetches_chunks_whose_local_copy_changed_since_it_was_indexed(sc, chunker):
    tree = sample_tree()
    write_tree(sc.origin, tree)
    m = sc.publish()
    # a seed indexed from the same bytes, whose file has since been overwritten in place
    seed_dir = os.path.join(sc.base, "seed")
    write_tree(seed_dir, {"a.bin": tree["a.bin"]})
    seed = SeedSource(manifest_of({"a.bin": tree["a.bin"]}, chunker=chunker), seed_dir)
    with open(os.path.join(seed_dir, "a.bin"), "r+b") as f:
        f.seek(50 * KiB)
        f.write(b"\0" * 20 * KiB)
    changed = manifest_of({"a.bin": tree["a.bin"]}, chunker=chunker).chunk_ids() - chunk_ids_in(
        read_tree(seed_dir), chunker
    )
    assert changed
    remote = CountingSource(sc.store)
    sc.rws.sync(m, sc.dest, remote=remote, sources=[seed])
    assert read_tree(sc.dest) == tree
    assert seed.stale == changed
    assert set(remote.delivered) == m.chunk_ids() - (manifest_of({"a.bin": tree["a.bin"]}, chunker=chunker).chunk_ids() - changed)


@pytest.mark.parametrize("existing", ["dir", "file", "empty-dir", "dangling-link"])
def test_sync_without_overwrite_into_an_existing_dest_raises_file_exists_and_writes_nothing(sc, existing):
    write_tree(sc.origin, sample_tree())
    m = sc.publish()
    os.makedirs(os.path.dirname(sc.dest), exist_ok=True)
    if existing == "dir":
        write_tree(sc.dest, {"old": File(b"old bytes"), "d": Dir()})
    elif existing == "file":
        write_tree(sc.dest, {"": File(b"a file")})
    elif existing == "empty-dir":
        os.mkdir(sc.dest)
    else:
        os.symlink("nowhere", sc.dest)
    before = read_tree(sc.dest)
    remote = CountingSource(sc.store)
    with pytest.raises(FileExistsError):
        sc.rws.sync(m, sc.dest, remote=remote, overwrite=False)
    assert read_tree(sc.dest) == before
    assert remote.delivered == []
    assert not os.path.lexists(sc.txn)


def test_sync_without_overwrite_into_a_missing_dest_creates_it(sc, chunker):
    write_tree(sc.origin, sample_tree())
    sync_and_check(sc, sample_tree(), chunker, overwrite=False)


def _new_version_for(sc, chunker, receiver: str):  # type: ignore[no-untyped-def]
    """Publish sample tree 2; first sync sample tree 1 to the receiver if it is to hold an
    older version. Returns (manifest, tree)."""
    old, new = sample_tree(1), sample_tree(2)
    if receiver == "older-version":
        write_tree(sc.origin, old)
        sync_and_check(sc, old, chunker)
        shutil.rmtree(sc.origin)
    write_tree(sc.origin, new)
    return sc.publish(), new


@pytest.mark.parametrize("receiver", ["absent", "older-version"])
def test_sync_with_a_chunk_missing_from_the_remote_raises_and_leaves_the_tree_as_before(sc, chunker, receiver):
    m, _ = _new_version_for(sc, chunker, receiver)
    lost = sorted(m.chunk_ids() - chunk_ids_in(read_tree(sc.dest), chunker))[len(m.chunk_ids()) // 3]
    sc.store.delete_many([lost])
    before = read_tree(sc.dest)
    with pytest.raises(ChunkNotFoundError) as err:
        sc.rws.sync(m, sc.dest, remote=sc.store)
    assert err.value.chunk_id == lost.hex()
    assert read_tree(sc.dest) == before
    assert not os.path.lexists(sc.txn)


def test_sync_with_chunks_missing_and_no_remote_raises_chunk_not_found_naming_one(sc):
    write_tree(sc.origin, sample_tree())
    m = sc.publish()
    with pytest.raises(ChunkNotFoundError, match="held by no source"):
        sc.rws.sync(m, sc.dest)
    assert read_tree(sc.dest) is None
    assert not os.path.lexists(sc.txn)


@pytest.mark.parametrize("receiver", ["absent", "older-version"])
def test_sync_with_a_remote_yielding_corrupt_bytes_raises_and_leaves_the_tree_as_before(sc, chunker, receiver):
    m, new = _new_version_for(sc, chunker, receiver)
    needed = sorted(m.chunk_ids() - chunk_ids_in(read_tree(sc.dest), chunker))
    before = read_tree(sc.dest)
    with pytest.raises(ChunkCorruptError) as err:
        sc.rws.sync(m, sc.dest, remote=CorruptingSource(sc.store, {needed[-1]}))
    assert err.value.chunk_id == needed[-1].hex()
    assert read_tree(sc.dest) == before
    assert not os.path.lexists(sc.txn)
    # and the next sync from a sound remote completes, fetching only what the failed attempt
    # had not staged (its staging is kept to resume from; the corrupt chunk was never staged)
    remote = CountingSource(sc.store)
    sc.rws.sync(m, sc.dest, remote=remote)
    assert read_tree(sc.dest) == new
    assert needed[-1] in remote.delivered and set(remote.delivered) <= set(needed)
    assert len(remote.delivered) == len(set(remote.delivered))


def test_sync_of_a_manifest_cut_with_other_chunker_params_is_refused(sc):
    other = ChunkerParams(min_size=2 * KiB, avg_size=8 * KiB, max_size=32 * KiB)
    m = manifest_of({"f": File(b"x" * 10000)}, params=other)
    with pytest.raises(MaterializeError):
        sc.rws.sync(m, sc.dest, remote=sc.store)
    assert read_tree(sc.dest) is None


# -- paths that would leave the root ------------------------------------------------
def _crafted(entries: list[Entry], root: Kind = Kind.DIR) -> bytes:
    """The encoding (docs/format.md, "Manifest") of exactly these entries, unvalidated, as
    a hostile origin would send it."""
    p = SMALL_PARAMS
    out = [b"CASM", struct.pack("<HBIIIBI", 2, p.algorithm, p.min_size, p.avg_size, p.max_size, root, len(entries)),
           struct.pack("<H", 0o755 if root == Kind.DIR else 0xFFFF)]
    for e in entries:
        path = e.path.encode()
        mode = 0xFFFF if e.mode is None else e.mode
        out.append(struct.pack("<BBHH", e.kind, int(e.executable), len(path), mode) + path)
        if e.kind == Kind.FILE:
            out.append(struct.pack("<QI", e.size, len(e.chunks) // 36) + e.chunks)
        elif e.kind == Kind.SYMLINK:
            out.append(struct.pack("<H", len(e.target.encode())) + e.target.encode())
    return b"".join(out)


@pytest.mark.parametrize(
    "entries",
    [
        [Entry("../x", Kind.FILE)],
        [Entry("a", Kind.DIR), Entry("a/../../x", Kind.FILE)],
        [Entry("/etc/cron.d/x", Kind.FILE)],
        [Entry("..", Kind.DIR)],
        [Entry("a", Kind.DIR), Entry("a/./b", Kind.FILE)],
        [Entry("l", Kind.SYMLINK, target="../outside")],
        [Entry("l", Kind.SYMLINK, target="/etc")],
        [Entry("d", Kind.DIR), Entry("d/l", Kind.SYMLINK, target="../../outside")],
        [Entry("l", Kind.SYMLINK, target="m/../.."), Entry("m", Kind.DIR)],
        [Entry("hop", Kind.SYMLINK, target=".."), Entry("l", Kind.SYMLINK, target="hop/x")],
    ],
    ids=lambda es: " ".join(f"{e.path}->{e.target}" if e.target else e.path for e in es),
)
def test_manifest_with_a_path_leaving_the_root_cannot_be_decoded_so_nothing_is_written(sc, entries):
    data = _crafted(entries)
    with pytest.raises(UnsafePathError):
        Manifest.decode(data)
    assert read_tree(sc.dest) is None
    assert not os.path.lexists(os.path.join(os.path.dirname(sc.base), "x"))


def test_crafted_encoding_of_a_safe_manifest_decodes_to_the_same_manifest(chunker):
    # the crafting above is sound: with safe paths it gives exactly what a snapshot would
    tree = {"a": Dir(), "a/l": Link("../b"), "b": Dir(), "b/f": File(b"hello" * 1000, True)}
    m = manifest_of(tree, chunker=chunker)
    assert _crafted(list(m.entries)) == m.encode()


def test_sync_replaces_a_local_symlink_to_an_inside_folder_by_a_real_folder_without_writing_through_it(sc, chunker):
    tree = {"sub": Dir(), "sub/file": File(b"new content" * 1000), "other": Dir(), "other/keep": File(b"keep")}
    write_tree(sc.origin, tree)
    write_tree(sc.dest, {"sub": Link("other"), "other": Dir(), "other/keep": File(b"keep")})
    sync_and_check(sc, tree, chunker)
    assert not os.path.islink(os.path.join(sc.dest, "sub"))
    assert not os.path.exists(os.path.join(sc.dest, "other", "file"))


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_sync_never_writes_through_a_local_symlink_to_a_folder_outside_the_root(sc, how):
    outside = os.path.join(sc.base, "outside")
    write_tree(outside, {"precious": File(b"do not touch")})
    tree = {"sub": Dir(), "sub/file": File(b"new content" * 1000), "sub/precious": File(b"overwritten?")}
    write_tree(sc.origin, tree)
    m = sc.publish()
    write_tree(sc.dest, {})
    os.symlink(outside if how == "absolute" else os.path.relpath(outside, sc.dest), os.path.join(sc.dest, "sub"))
    try:
        sc.rws.sync(m, sc.dest, remote=sc.store)
    except UnsafePathError:
        pass  # refusing is safe too; that it should succeed is the next test
    assert read_tree(outside) == {"precious": File(b"do not touch")}


def _make_unsupported(dest: str, outside: str, what: str) -> None:
    if what == "link-leaving-the-root":
        os.symlink(outside, os.path.join(dest, "sub"))
    elif what == "non-utf8-name":
        with open(os.path.join(os.fsencode(dest), b"stray\xff"), "wb") as f:
            f.write(b"local only")
    else:
        os.mkfifo(os.path.join(dest, "stray-fifo"))


@pytest.mark.parametrize("what", ["link-leaving-the-root", "non-utf8-name", "fifo"])
def test_sync_with_overwrite_replaces_local_entries_that_no_manifest_can_describe(sc, chunker, what):
    outside = os.path.join(sc.base, "outside")
    write_tree(outside, {"precious": File(b"do not touch")})
    tree = {"sub": Dir(), "sub/file": File(b"new content" * 1000), "sub/precious": File(b"overwritten?")}
    write_tree(sc.origin, tree)
    m = sc.publish()
    write_tree(sc.dest, {})
    _make_unsupported(sc.dest, outside, what)
    sc.rws.sync(m, sc.dest, remote=sc.store)
    assert read_tree(sc.dest) == tree
    assert read_tree(outside) == {"precious": File(b"do not touch")}


@pytest.mark.parametrize("target", ["dir", "file"])
def test_sync_into_a_dest_that_is_a_symlink_replaces_the_link_and_leaves_its_target_alone(sc, chunker, target):
    outside = os.path.join(sc.base, "outside")
    write_tree(outside, {"precious": File(b"do not touch")})
    tree = sample_tree() if target == "dir" else {"": File(b"payload" * 5000)}
    write_tree(sc.origin, tree)
    os.makedirs(os.path.dirname(sc.dest), exist_ok=True)
    os.symlink(outside, sc.dest)
    sync_and_check(sc, tree, chunker)
    assert not os.path.islink(sc.dest)
    assert read_tree(outside) == {"precious": File(b"do not touch")}


# -- root kind changes --------------------------------------------------------------
def test_sync_turns_a_file_root_into_a_folder_and_back(sc, chunker):
    as_file = {"": File(make_bytes("random", 3, 300 * KiB), True)}
    as_dir = sample_tree()
    write_tree(sc.origin, as_file)
    sync_and_check(sc, as_file, chunker)
    os.unlink(sc.origin)
    write_tree(sc.origin, as_dir)
    sync_and_check(sc, as_dir, chunker)
    shutil.rmtree(sc.origin)
    write_tree(sc.origin, as_file)
    remote = sync_and_check(sc, as_file, chunker)
    # the file's chunks were not held by the folder: all of them crossed again
    assert set(remote.delivered) == manifest_of(as_file, chunker=chunker).chunk_ids() - chunk_ids_in(as_dir, chunker)


def test_sync_turns_a_file_root_into_a_folder_holding_that_file_reusing_its_chunks(sc, chunker):
    data = make_bytes("random", 4, 500 * KiB)
    write_tree(sc.origin, {"": File(data)})
    sync_and_check(sc, {"": File(data)}, chunker)
    os.unlink(sc.origin)
    tree = {"inner": Dir(), "inner/same.bin": File(data)}
    write_tree(sc.origin, tree)
    remote = sync_and_check(sc, tree, chunker)
    assert remote.delivered == []  # every chunk was read from the old root file


def test_sync_turns_an_empty_folder_into_an_empty_file_and_back(sc, chunker):
    for tree in ({}, {"": File(b"")}, {}):
        if os.path.lexists(sc.origin):
            (shutil.rmtree if os.path.isdir(sc.origin) else os.unlink)(sc.origin)
        write_tree(sc.origin, tree)
        sync_and_check(sc, tree, chunker)


# -- disk use -----------------------------------------------------------------------
def test_first_sync_of_a_4_mib_tree_uses_at_most_1_1_times_its_size_on_disk(sc, chunker):
    rnd = random.Random(11)
    tree: Model = {"big": File(rnd.randbytes(3 * MiB)), "d": Dir()}
    for i in range(32):
        tree[f"d/f{i:02d}"] = File(rnd.randbytes(32 * KiB))
    size = sum(len(n.data) for n in tree.values() if n.kind == "file")
    assert size == 4 * MiB
    write_tree(sc.origin, tree)
    sync_and_check(sc, tree, chunker)
    used = disk_usage(sc.dest, sc.rws.state_dir)
    assert used <= 1.1 * size, f"{used} bytes on disk for a {size}-byte tree"


def test_a_local_tree_deeper_than_the_recursion_limit_is_removed_by_a_sync(sc, chunker):
    write_tree(sc.origin, {"keep.txt": File(b"kept")})
    m = sync_and_check(sc, {"keep.txt": File(b"kept")}, chunker) and sc.publish()
    deep = sc.dest
    for _ in range(1100):  # 2,200 bytes of path: the kernel allows it, os.makedirs recurses
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    with open(os.path.join(deep, "bottom.txt"), "wb") as f:
        f.write(b"at the bottom")
    sc.rws.sync(m, sc.dest, remote=sc.store)  # the origin has no "d": removed
    assert read_tree(sc.dest) == {"keep.txt": File(b"kept")}
