"""cas.repository: the one push path and the stores it opens from a URL.

What is promised (cas/repository.py):
- a push stores every chunk of the tree, then sets the ref; the tree reads back exactly;
- a second push of an unchanged tree stores nothing and rewrites nothing;
- while a ref names a manifest, every chunk of it is in the store, even with a garbage
  collection running in another process as ``cas push`` runs (leases);
- ``open(url)`` takes a folder, ``file://`` and ``s3://bucket/prefix``, refuses any other
  scheme with a clear error, and with ``must_exist`` refuses a folder holding no store.
"""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from s3server import SeaweedServer, aws_env
from test_gc import collect_while_running, random_files
from test_store_s3 import BUCKET
from trees import Model, read_tree, write_tree

from cas.errors import StoreError
from cas.hashing import ChunkId, chunk_id
from cas.manifest import Manifest
from cas.repository import BadStoreUrlError, Repository
from cas.store import LocalRefStore, MemoryChunkStore, Payload
from cas.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


def readable(repo: Repository, m: Manifest) -> bool:
    """Every chunk ``m`` names is in the store and verifies."""
    ids = m.chunk_ids()
    return repo.chunks.has_many(ids) == ids and all(chunk_id(d) == cid for cid, d in repo.chunks.get_many(ids))


def restore(repo: Repository, m: Manifest, dest: Path, state: Path) -> Model | None:
    with Workspace(state) as ws:
        ws.sync(m, dest, remote=repo.chunks)
    return read_tree(dest)


# -- push -------------------------------------------------------------------------------
def test_a_pushed_tree_reads_back_exactly_and_its_ref_names_it(tmp_path: Path) -> None:
    write_tree(tmp_path / "tree", random_files(random.Random(1)))
    with Repository.open(tmp_path / "repo") as repo, Workspace(tmp_path / "ws") as ws:
        pushed = repo.push("t", tmp_path / "tree", ws)
        assert pushed is not None and pushed.added == len(pushed.manifest.chunk_ids())
        assert repo.refs.get("t") == pushed.manifest.encode()
        assert restore(repo, pushed.manifest, tmp_path / "out", tmp_path / "ws2") == read_tree(tmp_path / "tree")


class CountingChunks(MemoryChunkStore):
    """A memory store that counts the chunks handed to ``put_many``."""

    handed = 0

    def put_many(self, items: Iterable[tuple[ChunkId, Payload]]) -> int:
        items = list(items)
        self.handed += len(items)
        return super().put_many(items)


class CountingRefs(LocalRefStore):
    puts = 0

    def put(self, name: str, value: bytes) -> None:
        self.puts += 1
        super().put(name, value)


def test_a_second_push_of_an_unchanged_tree_moves_and_rewrites_nothing(tmp_path: Path) -> None:
    write_tree(tmp_path / "tree", random_files(random.Random(2), files=6))
    chunks, refs = CountingChunks(), CountingRefs(tmp_path / "refs")
    repo = Repository(chunks, refs, LocalRefStore(tmp_path / "leases"), "test")
    with Workspace(tmp_path / "ws") as ws:
        first = repo.push("t", tmp_path / "tree", ws)
        handed, puts, ids = chunks.handed, refs.puts, set(chunks.iter_ids())
        assert first is not None and handed > 0 and puts == 1
        second = repo.push("t", tmp_path / "tree", ws)
    assert second is not None and second.manifest.id == first.manifest.id and second.added == 0
    assert (chunks.handed, refs.puts, set(chunks.iter_ids())) == (handed, puts, ids)
    assert repo.leases.all() == []  # the push took its lease back
    repo.close()


def test_a_push_of_nothing_is_none_with_missing_ok_and_an_error_without(tmp_path: Path) -> None:
    with Repository.open(tmp_path / "repo") as repo, Workspace(tmp_path / "ws") as ws:
        assert repo.push("t", tmp_path / "absent", ws, missing_ok=True) is None
        with pytest.raises(OSError):
            repo.push("t", tmp_path / "absent", ws)
        assert repo.refs.get("t") is None and not list(repo.chunks.iter_ids())


def test_gc_deletes_what_no_ref_names_and_keeps_every_pushed_tree(tmp_path: Path) -> None:
    with Repository.open(tmp_path / "repo") as repo, Workspace(tmp_path / "ws") as ws:
        trees = []
        for i in range(3):
            write_tree(tmp_path / f"t{i}", random_files(random.Random(10 + i)))
            pushed = repo.push(f"t{i}", tmp_path / f"t{i}", ws)
            assert pushed is not None
            trees.append(pushed.manifest)
        assert repo.refs.delete("t0")
        repo.chunks.put_many([(chunk_id(b"orphan"), b"orphan")])
        live = trees[1].chunk_ids() | trees[2].chunk_ids()
        before = set(repo.chunks.iter_ids())
        report = repo.gc(min_garbage=0.0)
        assert report.deleted_chunks == len(before - live) > 1 and set(repo.chunks.iter_ids()) == live
        assert readable(repo, trees[1]) and readable(repo, trees[2])


# -- cas push racing a collection in another process -------------------------------------
PUSHER = """
import random, sys
from pathlib import Path
from _gc_child import write_version
from cas.cli import main
tree, store, manifest, state, versions = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
rng = random.Random(11)
for i in range(versions):
    write_version(tree, rng)
    code = main(["push", str(tree), store, manifest, "--ref", "tree", "--state", state])
    assert code == 0, code
    print(f"pushed {i}", flush=True)
print("done", flush=True)
"""


def test_gc_racing_cas_push_in_another_process_never_leaves_a_ref_without_its_chunks(tmp_path: Path) -> None:
    """A child runs ``cas push`` of 30 versions of a changing tree while this process
    collects in a loop; after every collection the ref names only stored chunks."""
    store = tmp_path / "repo"
    proc = subprocess.Popen(
        [sys.executable, "-c", PUSHER, str(tmp_path / "tree"), str(store), str(tmp_path / "tree.manifest"),
         str(tmp_path / "state"), "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")])),
    )
    repo = Repository.open(store)

    def whole() -> bool:
        raw = repo.refs.get("tree")
        return raw is None or readable(repo, Manifest.decode(raw))

    try:
        runs, busy, deleted = collect_while_running(proc, repo.gc, whole)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and out.splitlines()[-1] == "done", err
    final = Manifest.decode(repo.refs.get("tree") or b"")
    assert readable(repo, final) and Manifest.decode((tmp_path / "tree.manifest").read_bytes()).id == final.id
    repo.gc(min_garbage=0.0)
    assert set(repo.chunks.iter_ids()) == final.chunk_ids()
    assert runs >= 1 and deleted > 0, (runs, busy, deleted)
    repo.close()


def test_cas_push_names_its_tree_by_a_ref_so_gc_keeps_it(tmp_path: Path) -> None:
    write_tree(tmp_path / "tree", random_files(random.Random(4)))
    manifest = tmp_path / "tree.manifest"
    out = subprocess.run([sys.executable, "-m", "cas", "push", str(tmp_path / "tree"), str(tmp_path / "repo"),
                          str(manifest), "--state", str(tmp_path / "state")],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert out.returncode == 0, out.stderr
    m = Manifest.decode(manifest.read_bytes())
    with Repository.open(tmp_path / "repo", must_exist=True) as repo:
        assert repo.refs.get(f"cas:{manifest}") == m.encode()
        assert repo.gc(min_garbage=0.0).deleted_chunks == 0 and readable(repo, m)


# -- open(url) ---------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["path", "file-url", "relative"])
def test_open_takes_a_folder_in_each_spelling(tmp_path: Path, form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = {"path": str(tmp_path / "repo"), "file-url": f"file://{tmp_path / 'repo'}", "relative": "repo"}[form]
    write_tree(tmp_path / "tree", random_files(random.Random(5)))
    with Repository.open(url) as repo, Workspace(tmp_path / "ws") as ws:
        pushed = repo.push("t", tmp_path / "tree", ws)
        assert repo.location == str(tmp_path / "repo")
    assert pushed is not None
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["chunks", "leases", "refs"]
    with Repository.open(url, must_exist=True) as again:
        assert again.refs.get("t") == pushed.manifest.encode() and readable(again, pushed.manifest)


@pytest.fixture
def s3_url(s3_server: SeaweedServer) -> Iterator[str]:
    with aws_env(s3_server.env()):
        yield f"s3://{BUCKET}/repo-{secrets.token_hex(4)}"


def test_open_of_an_s3_url_pushes_and_reads_back_through_the_bucket(s3_url: str, tmp_path: Path) -> None:
    write_tree(tmp_path / "tree", random_files(random.Random(6)))
    with Repository.open(s3_url) as repo, Workspace(tmp_path / "ws") as ws:
        pushed = repo.push("t", tmp_path / "tree", ws)
        assert repo.location == s3_url
    assert pushed is not None
    with Repository.open(s3_url) as again:  # a new connection: only what the bucket holds
        assert again.refs.get("t") == pushed.manifest.encode()
        assert restore(again, pushed.manifest, tmp_path / "out", tmp_path / "ws2") == read_tree(tmp_path / "tree")
        assert again.gc(min_garbage=0.0).deleted_chunks == 0


@pytest.mark.parametrize("url, says", [
    ("ftp://host/store", "ftp://host/store: unsupported store scheme 'ftp'"),
    ("s3://", "not an S3 URL"),
    ("s3://bucket/p?x=1", "takes no query"),
])
def test_open_of_a_url_no_repository_reads_says_so(url: str, says: str) -> None:
    with pytest.raises(BadStoreUrlError) as e:
        Repository.open(url)
    assert says in str(e.value) and isinstance(e.value, ValueError)


def test_open_must_exist_refuses_a_missing_or_foreign_folder_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such folder"):
        Repository.open(tmp_path / "absent", must_exist=True)
    (tmp_path / "photos").mkdir()
    with pytest.raises(StoreError, match="is not a chunk store"):
        Repository.open(tmp_path / "photos", must_exist=True)
    assert not (tmp_path / "absent").exists() and list((tmp_path / "photos").iterdir()) == []


def test_a_store_of_the_layout_before_repositories_is_refused_with_how_to_move_it(tmp_path: Path) -> None:
    old = tmp_path / "store"
    old.mkdir()
    (old / "FORMAT").write_text("cas-chunkstore 1\n")
    for must_exist in (False, True):
        with pytest.raises(StoreError, match="before repositories") as e:
            Repository.open(old, must_exist=must_exist)
        assert str(old / "chunks") in str(e.value)
    assert sorted(p.name for p in old.iterdir()) == ["FORMAT"]
