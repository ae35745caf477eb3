"""Planning is pure: what must move and what must be written, as properties of manifests.

Manifests are built in memory from generated trees (:func:`trees.manifest_of`); a
target is usually the local tree after a random sequence of edits, so that plans mix
kept, patched, replaced, re-moded, re-linked and removed entries.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cas.chunking import iter_chunk_spans, iter_chunks
from cas.manifest import Kind, Manifest
from cas.plan import Action, UpdatePlan, plan_fetch, plan_update
from trees import (
    BYTE_OPS,
    KiB,
    Dir,
    File,
    Link,
    Model,
    Node,
    chunks_of,
    edit_model,
    edit_sequences,
    fast_chunker,
    manifest_of,
    parent_of,
    single_files,
    trees,
    without,
)

CHUNKER = fast_chunker()
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

small_trees = trees(big=False, max_entries=14, max_small=96 * KiB)
small_files = single_files(big=False, max_small=96 * KiB)


@st.composite
def local_and_target(draw: st.DrawFn) -> tuple[Model, Model]:
    """(local, target): mostly target = local after edits; sometimes two unrelated trees
    or single files (roots of either kind)."""
    shape = draw(st.sampled_from(["edited", "edited", "edited", "unrelated", "file", "mixed"]))
    if shape == "edited":
        local = draw(small_trees)
        target = local
        for e in draw(edit_sequences(max_size=8)):
            target = edit_model(target, e)
        return local, target
    if shape == "unrelated":
        return draw(small_trees), draw(small_trees)
    if shape == "file":
        local = draw(small_files)
        target = local
        for e in draw(edit_sequences(ops=BYTE_OPS + ("chmod",), max_size=4)):
            target = edit_model(target, e)
        return local, target
    a, b = draw(small_files), draw(small_trees)
    return (a, b) if draw(st.booleans()) else (b, a)


def first_use_order(m: Manifest) -> list[bytes]:
    seen: dict[bytes, None] = {}
    for e in m.entries:
        if e.kind == Kind.FILE:
            for cid, _ in iter_chunks(e.chunks):
                seen.setdefault(cid, None)
    return list(seen)


# -- plan_fetch -------------------------------------------------------------------
@FAST
@given(pair=local_and_target(), data=st.data())
def test_fetch_plan_is_exactly_the_target_chunks_not_held_each_once_in_order_of_first_use(pair, data):
    local, target = pair
    lm, tm = manifest_of(local, chunker=CHUNKER), manifest_of(target, chunker=CHUNKER)
    candidates = sorted(tm.chunk_ids() | lm.chunk_ids())
    held = set(data.draw(st.lists(st.sampled_from(candidates), unique=True))) if candidates else set()
    held |= set(data.draw(st.lists(st.binary(min_size=32, max_size=32), max_size=3)))  # ids of nothing here

    plan = plan_fetch(tm, held)

    assert set(plan.missing) == tm.chunk_ids() - held
    assert len(plan.missing) == len(set(plan.missing))
    assert not set(plan.missing) & held
    assert list(plan.missing) == [c for c in first_use_order(tm) if c not in held]
    sizes = tm.chunk_sizes()
    assert plan.missing_bytes == sum(sizes[c] for c in plan.missing)
    assert plan.held == len(tm.chunk_ids() & held)
    assert plan.held_bytes == sum(sizes[c] for c in tm.chunk_ids() & held)


@FAST
@given(tree=small_trees)
def test_fetch_plan_holding_nothing_fetches_every_chunk_and_holding_all_fetches_none(tree):
    m = manifest_of(tree, chunker=CHUNKER)
    everything = plan_fetch(m, set())
    assert set(everything.missing) == m.chunk_ids()
    assert everything.missing_bytes == sum(m.chunk_sizes().values())
    assert (everything.held, everything.held_bytes) == (0, 0)
    nothing = plan_fetch(m, m.chunk_ids())
    assert nothing.missing == () and nothing.missing_bytes == 0


def test_fetch_plan_asks_for_a_chunk_used_many_times_once():
    data = bytes(200 * KiB)  # zeros: one chunk id, many offsets, in two files
    m = manifest_of({"a": File(data), "b": File(data + b"x")}, chunker=CHUNKER)
    plan = plan_fetch(m, set())
    assert len(plan.missing) == len(m.chunk_ids()) < sum(e.chunk_count for e in m.files())
    assert plan.missing_bytes == sum(m.chunk_sizes().values())


# -- plan_update ------------------------------------------------------------------
@FAST
@given(tree=st.one_of(small_trees, small_files, st.just({}), st.just({"d": Dir()})))
def test_update_plan_between_identical_manifests_is_empty(tree):
    m = manifest_of(tree, chunker=CHUNKER)
    assert plan_update(m, m) == UpdatePlan((), ())


def _root_kind(model: Mapping[str, Node]) -> Kind:
    return Kind.FILE if "" in model else Kind.DIR


@FAST
@given(pair=local_and_target())
def test_update_plan_removes_exactly_the_local_only_paths_topmost_and_deepest_first(pair):
    local, target = pair
    plan = plan_update(manifest_of(local, chunker=CHUNKER), manifest_of(target, chunker=CHUNKER))
    if _root_kind(local) != _root_kind(target):
        assert plan.removals == ()  # the root step replaces the whole old root
        return
    local_only = {p for p in local if p not in target}
    topmost = {p for p in local_only if not any(a in local_only for a in _ancestors(p))}
    assert set(plan.removals) == topmost
    assert len(plan.removals) == len(topmost)
    depths = [p.count("/") for p in plan.removals]
    assert depths == sorted(depths, reverse=True)


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


@FAST
@given(pair=local_and_target())
def test_update_plan_patch_ranges_are_exactly_the_chunks_that_differ_at_the_same_offset(pair):
    local, target = pair
    lm, tm = manifest_of(local, chunker=CHUNKER), manifest_of(target, chunker=CHUNKER)
    plan = plan_update(lm, tm)
    for step in plan.steps:
        if step.action != Action.PATCH:
            assert step.ranges == ()
            continue
        old = lm.by_path[step.path]
        assert old.kind == Kind.FILE and step.entry == tm.by_path[step.path]
        old_spans = {(off, n, cid) for cid, off, n in iter_chunk_spans(old.chunks)}
        differ = tuple((off, n, cid) for cid, off, n in iter_chunk_spans(step.entry.chunks) if (off, n, cid) not in old_spans)
        assert step.ranges == differ
        assert sum(n for _, n, _ in step.ranges) <= 0.5 * step.entry.size


@FAST
@given(pair=local_and_target(), fraction=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
def test_update_plan_patches_a_changed_file_iff_at_most_the_fraction_of_it_must_be_written(pair, fraction):
    local, target = pair
    lm, tm = manifest_of(local, chunker=CHUNKER), manifest_of(target, chunker=CHUNKER)
    plan = plan_update(lm, tm, patch_fraction=fraction)
    same_root = lm.root_kind == tm.root_kind
    for step in plan.steps:
        if step.action not in (Action.PLACE, Action.PATCH):
            continue
        old = lm.by_path.get(step.path) if same_root else None
        if old is None or old.kind != Kind.FILE:
            assert step.action == Action.PLACE  # nothing to patch
            continue
        old_spans = {(off, n, cid) for cid, off, n in iter_chunk_spans(old.chunks)}
        written = sum(n for cid, off, n in iter_chunk_spans(step.entry.chunks) if (off, n, cid) not in old_spans)
        assert step.action == (Action.PATCH if written <= fraction * step.entry.size else Action.PLACE)


@FAST
@given(pair=local_and_target())
def test_update_plan_has_one_step_for_each_target_entry_that_differs_and_none_for_others(pair):
    local, target = pair
    lm, tm = manifest_of(local, chunker=CHUNKER), manifest_of(target, chunker=CHUNKER)
    plan = plan_update(lm, tm)
    paths = [s.path for s in plan.steps]
    assert len(paths) == len(set(paths))
    have = lm.by_path if lm.root_kind == tm.root_kind else {}
    for e in tm.entries:
        old = have.get(e.path)
        differs = old is None or old.kind != e.kind or (e.kind != Kind.DIR and not old.same_content(e))
        assert (e.path in paths) == differs, e.path
    root_step = [s for s in plan.steps if s.path == ""]
    if tm.root_kind == Kind.DIR:
        assert bool(root_step) == (lm.root_kind != Kind.DIR)
        assert all(s.action == Action.MKDIR for s in root_step)


@FAST
@given(pair=local_and_target())
def test_update_plan_lists_parents_before_children(pair):
    local, target = pair
    plan = plan_update(manifest_of(local, chunker=CHUNKER), manifest_of(target, chunker=CHUNKER))
    index = {s.path: i for i, s in enumerate(plan.steps)}
    for s in plan.steps:
        for a in ["", *_ancestors(s.path)] if s.path else []:
            assert index.get(a, -1) < index[s.path], (a, s.path)


# -- the plan, applied to a model of the tree, gives the target --------------------
def simulate(local: Model | None, plan: UpdatePlan, chunks: Mapping[bytes, bytes]) -> Model | None:
    """What a tree equal to ``local`` becomes when the plan's steps are applied as the
    journal operations are specified (docs/format.md, "Materialize journal")."""
    tree: Model | None = None if local is None else dict(local)
    for p in plan.removals:
        assert tree is not None and p in tree and p != ""
        tree = without(tree, p)
    for s in plan.steps:
        e = s.entry
        if s.path == "":
            if s.action == Action.MKDIR:
                tree = {} if tree is None or "" in tree else tree
                continue
            if s.action == Action.PLACE:
                tree = {}
        else:
            assert tree is not None and "" not in tree, "a child step before the root is a folder"
            assert parent_of(s.path) == "" or tree[parent_of(s.path)].kind == "dir", "parent must exist already"
        assert tree is not None
        if s.action == Action.MKDIR:
            if s.path not in tree or tree[s.path].kind != "dir":
                tree = without(tree, s.path)
                tree[s.path] = Dir(0o700)  # its mode is set by plan.modes, after everything else
        elif s.action == Action.PLACE:
            tree = without(tree, s.path)
            tree[s.path] = File(b"".join(chunks[cid] for cid, _ in iter_chunks(e.chunks)), mode=e.perm)
        elif s.action == Action.PATCH:
            old = tree[s.path]
            assert old.kind == "file"
            buf = bytearray(old.data)  # type: ignore[arg-type]
            for off, n, cid in s.ranges:
                if off > len(buf):
                    buf.extend(bytes(off - len(buf)))  # pwrite past the end leaves a hole
                buf[off : off + n] = chunks[cid]
            del buf[e.size :]
            tree[s.path] = File(bytes(buf), mode=e.perm)
        elif s.action == Action.CHMOD:
            assert tree[s.path].kind == "file"
            tree[s.path] = File(tree[s.path].data, mode=e.perm)  # type: ignore[arg-type]
        elif s.action == Action.LINK:
            tree = without(tree, s.path)
            tree[s.path] = Link(e.target)
        else:
            raise AssertionError(f"plans have no {s.action} steps")
    depths = [p.count("/") + bool(p) for p, _ in plan.modes]
    assert depths == sorted(depths, reverse=True), "folder modes are set deepest first"
    for p, mode in plan.modes:
        if p:
            assert tree is not None and tree[p].kind == "dir"
            tree[p] = Dir(mode)
    return tree


@FAST
@given(pair=local_and_target())
def test_update_plan_applied_to_the_local_tree_gives_the_target_tree(pair):
    local, target = pair
    plan = plan_update(manifest_of(local, chunker=CHUNKER), manifest_of(target, chunker=CHUNKER))
    assert simulate(local, plan, chunks_of(target, CHUNKER)) == target


@FAST
@given(target=st.one_of(small_trees, small_files))
def test_update_plan_from_nothing_creates_the_whole_target(target):
    tm = manifest_of(target, chunker=CHUNKER)
    plan = plan_update(None, tm)
    assert plan.removals == ()
    assert all(s.action in (Action.MKDIR, Action.PLACE, Action.LINK) for s in plan.steps)
    assert simulate(None, plan, chunks_of(target, CHUNKER)) == target


@pytest.mark.parametrize(
    ("local", "target"),
    [
        ({"": File(b"x" * 5000)}, {"a": File(b"y"), "d": Dir()}),
        ({"a": File(b"y"), "d": Dir(), "d/e": File(b"z")}, {"": File(b"x" * 5000)}),
        ({}, {"": File(b"")}),
        ({"": File(b"")}, {}),
    ],
    ids=["file-to-dir", "dir-to-file", "empty-dir-to-empty-file", "empty-file-to-empty-dir"],
)
def test_update_plan_replaces_a_root_of_the_other_kind_with_its_first_step(local, target):
    tm = manifest_of(target, chunker=CHUNKER)
    plan = plan_update(manifest_of(local, chunker=CHUNKER), tm)
    assert plan.removals == ()
    assert plan.steps[0].path == "" and plan.steps[0].action == (Action.MKDIR if tm.root_kind == Kind.DIR else Action.PLACE)
    assert simulate(local, plan, chunks_of(target, CHUNKER)) == target


def test_update_plan_patches_a_small_change_in_a_large_file_and_replaces_a_rewritten_one():
    rnd = random.Random(7).randbytes(256 * KiB)
    local = {"small-change": File(rnd), "rewritten": File(rnd[::-1]), "grown": File(rnd[: 100 * KiB]), "shrunk": File(rnd[::2])}
    target = {
        "small-change": File(rnd[:100_000] + b"CHANGED" + rnd[100_007:]),
        "rewritten": File(random.Random(8).randbytes(256 * KiB)),
        "grown": File(rnd[: 100 * KiB] + b"tail" * 100),
        "shrunk": File(rnd[::2][: 100 * KiB]),
    }
    plan = plan_update(manifest_of(local, chunker=CHUNKER), manifest_of(target, chunker=CHUNKER))
    actions = {s.path: s.action for s in plan.steps}
    assert actions == {
        "small-change": Action.PATCH,
        "rewritten": Action.PLACE,
        "grown": Action.PATCH,
        "shrunk": Action.PATCH,  # its last chunk, then a truncation
    }
    small = next(s for s in plan.steps if s.path == "small-change")
    assert 0 < sum(n for _, n, _ in small.ranges) <= 2 * 16 * KiB  # the chunks around the change
    shrunk = next(s for s in plan.steps if s.path == "shrunk")
    assert sum(n for _, n, _ in shrunk.ranges) <= 16 * KiB


def test_update_plan_changes_only_the_mode_of_a_file_whose_exec_bit_flipped():
    local = {"run.sh": File(b"#!/bin/sh\necho hi\n" * 100), "same": File(b"s", True)}
    target = {"run.sh": File(b"#!/bin/sh\necho hi\n" * 100, True), "same": File(b"s", True)}
    plan = plan_update(manifest_of(local, chunker=CHUNKER), manifest_of(target, chunker=CHUNKER))
    assert [(s.path, s.action) for s in plan.steps] == [("run.sh", Action.CHMOD)]
    assert plan.removals == ()
