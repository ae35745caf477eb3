"""Garbage collection on an S3 artifact store (the session's SeaweedFS server): the same
promises as tests/test_gc.py, through ``ArtifactStore.open("s3://...")``, with the leases in
the bucket and a real process persisting while this one collects."""

from __future__ import annotations

import random
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3server import SeaweedServer, aws_env
from test_gc import Child, all_readable, random_files
from test_store_s3 import BUCKET
from trees import write_tree

from cas.errors import StoreBusyError
from cas.workspace import Workspace
from pathapi.artifacts import ArtifactStore, decode_ref
from pathapi.version import Version


@pytest.fixture
def url(s3_server: SeaweedServer) -> Iterator[str]:
    with aws_env(s3_server.env()):
        yield f"s3://{BUCKET}/gc-{secrets.token_hex(4)}"


def test_gc_on_s3_deletes_the_chunks_of_replaced_versions_only(url: str, tmp_path: Path) -> None:
    store = ArtifactStore.open(url, tmp_path)
    tree = tmp_path / "tree"
    with Workspace(tmp_path / "ws") as ws:
        versions = []
        for seed in range(3):
            shutil.rmtree(tree, ignore_errors=True)
            write_tree(tree, random_files(random.Random(seed)))
            versions.append(store.persist("w", "ckpt", str(tree), ws, version=Version(1, 1, Version.ENDED)))
        write_tree(tmp_path / "other", random_files(random.Random(99)))
        other = store.persist("w", "other", str(tmp_path / "other"), ws, version=Version(1, 1, Version.ENDED))
    assert other is not None and all(versions)
    live = versions[-1].chunk_ids() | other.chunk_ids()  # type: ignore[union-attr]
    stored = set(store.chunks.iter_ids())
    assert stored > live
    report = store.gc(min_garbage=0.0)
    assert report.deleted_chunks == len(stored - live)
    assert set(store.chunks.iter_ids()) == live
    assert all_readable(store, versions[-1]) and all_readable(store, other)  # type: ignore[arg-type]
    store.close()
    # A new store object (another machine) sees the same thing.
    again = ArtifactStore.open(url, tmp_path)
    assert set(again.chunks.iter_ids()) == live
    again.close()


def test_gc_on_s3_is_refused_while_a_process_holds_a_persist_lease(url: str, tmp_path: Path) -> None:
    store = ArtifactStore.open(url, tmp_path)
    write_tree(tmp_path / "t", random_files(random.Random(5)))
    with Workspace(tmp_path / "ws") as ws:
        store.persist("w", "t", str(tmp_path / "t"), ws, version=Version(1, 1, Version.ENDED))
    store.refs.delete("w/t")  # its chunks are garbage now
    child = Child("s3lease", url, "shared")
    try:
        child.wait_for("held")
        with pytest.raises(StoreBusyError, match="test holder"):
            store.gc()
        assert list(store.chunks.iter_ids())
    finally:
        child.release()
    assert store.gc().deleted_chunks > 0 and not list(store.chunks.iter_ids())
    store.close()


def test_gc_on_s3_racing_a_persisting_process_never_leaves_a_ref_without_its_chunks(url: str, tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    child = Child("persist", str(tmp_path / "app"), str(tmp_path / "tree"), "15", "11", url)
    store = ArtifactStore.open(url, tmp_path)
    runs = deleted = 0
    try:
        while child.proc.poll() is None or runs == 0:
            try:
                report = store.gc(min_garbage=0.0)
            except StoreBusyError:
                time.sleep(random.uniform(0, 0.05))
                continue
            runs += 1
            deleted += report.deleted_chunks
            raw = store.refs.get("writer/tree")
            if raw is not None:
                assert all_readable(store, decode_ref(raw)[0]), f"after gc run {runs}: the ref names deleted chunks"
        child.wait_for("done")
    finally:
        if child.proc.poll() is None:
            child.kill()
    assert child.proc.wait(60) == 0, child.proc.stderr.read()  # type: ignore[union-attr]
    final = decode_ref(store.refs.get("writer/tree"))[0]  # type: ignore[arg-type]
    store.gc(min_garbage=0.0)
    assert set(store.chunks.iter_ids()) == final.chunk_ids() and all_readable(store, final)
    assert runs >= 1 and deleted > 0, (runs, deleted)
    store.close()
