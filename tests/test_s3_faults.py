"""SPEC "What bad input and faults get", for the S3 artifact store, with real signals.

Each test that hurts the server gets a ``weed mini`` of its own (tests/s3server.py) and
SIGKILLs or SIGSTOPs its process group while a persist or a get is in flight, then brings it
back (same folder and ports) and checks what is in the bucket:

- killed mid-persist: the persist fails with a StoreError naming endpoint and bucket; no
  manifest points at a missing chunk; every chunk the store lists reads back and verifies;
  the same persist run again completes and its tree gets back whole;
- killed (or frozen) mid-get: the get fails with a StoreError, the local tree is as before;
  a get after the restart completes;
- wrong credentials: a clear error naming the bucket, no botocore stack, no secret.
"""

from __future__ import annotations

import os
import random
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path as FsPath
from typing import Any

import pytest
from s3server import SeaweedServer, aws_env
from trees import File, Model, listing, write_tree

from cas import Manifest
from cas.errors import StoreError
from cas.hashing import ChunkId, chunk_id
from cas.repository import PUSH_BATCH as PERSIST_BATCH
from cas.store.base import Payload
from cas.store.s3 import S3Bucket, S3ChunkStore
from cas.workspace import Workspace
from pathapi import App, Flow, Work, WorkError
from pathapi.artifacts import ArtifactStore, decode_ref
from pathapi.version import Version

BUCKET = "pathapi-test"
MiB = 1 << 20
#: A dead server must fail requests in bounded time: few attempts, short timeouts.
FAST_FAIL = {"AWS_MAX_ATTEMPTS": "2"}


@pytest.fixture
def server(tmp_path: FsPath) -> Iterator[SeaweedServer]:
    """A server of this test's own: the test kills it."""
    s = SeaweedServer(tmp_path / "weed")
    s.start()
    yield s
    s.close()


def parts(sizes: list[int], seed: int) -> Model:
    """A checkpoint folder: one file of random bytes per size, and a small text file."""
    rng = random.Random(seed)
    model = {f"part-{i:02d}.bin": File(rng.randbytes(size)) for i, size in enumerate(sizes)}
    return {**model, "meta.txt": File(f"seed {seed}\n".encode())}


def objects(server: SeaweedServer, prefix: str) -> list[str]:
    client: Any = server.client(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def assert_consistent(store: ArtifactStore) -> set[ChunkId]:
    """Every ref's manifest names only chunks the store holds; every listed chunk verifies."""
    ids = list(store.chunks.iter_ids())
    for cid, data in store.chunks.get_many(ids):
        assert chunk_id(data) == cid
    for name in store.refs.names():
        raw = store.refs.get(name)
        assert raw is not None
        needed = decode_ref(raw)[0].chunk_ids()
        assert store.chunks.has_many(needed) == needed, f"ref {name} points at missing chunks"
    return set(ids)


def test_server_killed_mid_persist_leaves_no_manifest_pointing_at_a_missing_chunk_and_a_retry_completes(
    server: SeaweedServer, tmp_path: FsPath
) -> None:
    src = tmp_path / "work" / "ckpt"
    write_tree(src, parts([40 * MiB, 40 * MiB, 40 * MiB, 3 * MiB], seed=1))  # two persist batches and more
    url = f"s3://{BUCKET}/faults"
    with aws_env({**server.env(), **FAST_FAIL}):
        store = ArtifactStore.open(url, tmp_path)
        workspace = Workspace(tmp_path / "state")
        outcome: list[BaseException | Manifest | None] = []

        def persist() -> None:
            try:
                outcome.append(store.persist("root.trainer", "ckpt", str(src), workspace, version=Version(1, 1, Version.ENDED)))
            except BaseException as e:  # noqa: BLE001 - examined below
                outcome.append(e)

        t = threading.Thread(target=persist)
        t.start()
        # Kill once the first batch is in (an index object exists): the kill lands in a later batch.
        while t.is_alive() and not objects(server, "faults/chunks/index/"):
            time.sleep(0.01)
        assert t.is_alive(), f"the persist finished before the kill: {outcome}"
        server.kill()
        t.join(300)
        assert not t.is_alive()
        err = outcome[0]
        assert isinstance(err, StoreError), err
        assert server.endpoint in str(err) and repr(BUCKET) in str(err)
        store.close()

        server.start()
        store = ArtifactStore.open(url, tmp_path)
        assert store.manifest("root.trainer", "ckpt") is None
        held = assert_consistent(store)
        assert 0 < len(held)  # the first batch is there, complete

        m = store.persist("root.trainer", "ckpt", str(src), workspace, version=Version(1, 1, Version.ENDED))
        assert m is not None
        assert store.manifest("root.trainer", "ckpt") == m
        assert held <= m.chunk_ids() and assert_consistent(store) == m.chunk_ids()
        with Workspace(tmp_path / "other-state") as other:
            other.sync(m, tmp_path / "copy", remote=store.chunks)
        assert listing(tmp_path / "copy") == listing(src)
        store.close()
        workspace.close()
    assert PERSIST_BATCH < 120 * MiB  # what makes "a later batch" exist


class KillAfterFirstChunk:
    """A chunk source that passes on what the store yields and, after the first chunk,
    does something to the server (SIGKILL or SIGSTOP) before handing over the rest."""

    def __init__(self, inner: S3ChunkStore, action: Any) -> None:
        self.inner = inner
        self.action = action
        self.location = inner.location
        self.delivered = 0

    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        return self.inner.has_many(ids)

    def get_many(self, ids: Iterable[ChunkId]) -> Iterator[tuple[ChunkId, Payload]]:
        for cid, data in self.inner.get_many(ids):
            self.delivered += 1
            if self.delivered == 1:
                self.action()
            yield cid, data


@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
def test_server_dying_or_freezing_mid_get_raises_store_error_and_leaves_the_local_tree_as_it_was(
    server: SeaweedServer, tmp_path: FsPath, fault: str
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_tree(src, parts([24 * MiB, 24 * MiB], seed=2))
    write_tree(dest, parts([3 * MiB, 5 * MiB, 1 * MiB], seed=3))  # an older version is here
    before = listing(dest)
    prefix = f"get-{fault}/"
    with aws_env(server.env()):
        # Short timeouts and read-ahead, so that a frozen server fails the get quickly and
        # most of the tree is still to be read when the fault hits.
        bucket = S3Bucket(BUCKET, connect_timeout=2, read_timeout=3, max_attempts=2)
        store = S3ChunkStore(bucket, prefix, pack_size=2 * MiB, inflight=4 * MiB)
        bucket.release()
        with Workspace(tmp_path / "src-state") as ws:
            m = ws.snapshot(src)
        from cas import SeedSource

        store.put_many(SeedSource(m, src).get_many(sorted(m.chunk_ids())))
        action = server.kill if fault == "sigkill" else server.pause
        source = KillAfterFirstChunk(store, action)
        with Workspace(tmp_path / "dest-state") as ws:
            with pytest.raises(StoreError) as info:
                ws.sync(m, dest, remote=source, overwrite=True)
            assert server.endpoint in str(info.value) and repr(BUCKET) in str(info.value)
            assert source.delivered >= 1
            assert listing(dest) == before
            if fault == "sigkill":
                server.start()
            else:
                server.resume()
            ws.sync(m, dest, remote=store, overwrite=True)
        assert listing(dest) == listing(src)
        store.close()


# -- wrong credentials through a real app ----------------------------------------------------


class Idle(Work):
    def run(self) -> None:
        self.ran = True


class OneWork(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.w = Idle()

    def run(self) -> None:
        self.w.run()


def test_app_with_wrong_credentials_fails_with_a_clear_error_naming_the_bucket(s3_server: SeaweedServer, tmp_path: FsPath) -> None:
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-" + os.urandom(6).hex()}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with pytest.raises(WorkError) as info:
            App(OneWork(), root=tmp_path / "app", store=f"s3://{BUCKET}/creds").run()
    err = info.value
    assert err.work_name == "root.w"
    message = str(err).split("\n--- traceback")[0]
    assert f"access denied to bucket '{BUCKET}'" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert env["AWS_SECRET_ACCESS_KEY"] not in str(err)
    assert env["AWS_ACCESS_KEY_ID"] not in str(err)
    assert "/botocore/" not in err.remote_traceback  # our error, not a stack of botocore internals


def test_wrong_credentials_error_has_no_botocore_frames(s3_server: SeaweedServer) -> None:
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "nope"}
    with aws_env(env), pytest.raises(StoreError) as info:
        ArtifactStore.open(f"s3://{BUCKET}/x", "/nonexistent-app-root")
    shown = "".join(traceback.format_exception(info.value))
    assert "/botocore/" not in shown  # no frame of botocore's code
    assert f"access denied to bucket '{BUCKET}'" in shown
