"""S3ChunkStore and S3RefStore against a real SeaweedFS server: the conformance suite, the
layout of docs/format.md, how requests are batched, errors, and writers killed mid-put.

Everything talks to the session's ``weed mini`` (tests/s3server.py); each test works under a
prefix of its own in the bucket. Request counts are read from botocore's own event hooks on
the real client, not from a mock.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis.stateful import run_state_machine_as_test
from s3server import SeaweedServer, aws_env

from cas.errors import ChunkCorruptError, ChunkNotFoundError, StoreError, UnsupportedVersionError
from cas.hashing import ChunkId, chunk_id
from cas.store.local import RECORD
from cas.store.s3 import (
    FORMAT_TEXT,
    S3AccessDeniedError,
    S3Bucket,
    S3ChunkStore,
    S3RefStore,
    decode_index,
    encode_ref_name,
    parse_url,
)
from cas.store.refs import RefStore
from cas.testing import (
    REF_NAMES,
    ChunkStoreStateMachine,
    ChunkStoreTests,
    RefStoreTests,
    chunk,
    random_bytes,
    read_all,
    store_settings,
)

BUCKET = "pathapi-test"
MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bucket(s3_server: SeaweedServer) -> Iterator[S3Bucket]:
    with aws_env(s3_server.env()):
        b = S3Bucket(BUCKET)
    yield b
    b.release()


@pytest.fixture
def prefix() -> str:
    return f"t/{uuid.uuid4().hex}/"


class Requests:
    """Counts the S3 operations a client sends, through botocore's event hooks."""

    def __init__(self, client: Any) -> None:
        self.counts: Counter[str] = Counter()
        self.body_bytes = 0
        self._client = client
        self._lock = threading.Lock()
        client.meta.events.register("provide-client-params.s3", self._count)

    def _count(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        with self._lock:
            self.counts[model.name] += 1
            if model.name == "PutObject":
                self.body_bytes += len(params.get("Body", b""))

    def close(self) -> None:
        self._client.meta.events.unregister("provide-client-params.s3", self._count)


@pytest.fixture
def requests(bucket: S3Bucket) -> Iterator[Requests]:
    r = Requests(bucket.client)
    yield r
    r.close()


def keys_under(server: SeaweedServer, prefix: str) -> list[str]:
    client: Any = server.client()
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


# -- the conformance suite ---------------------------------------------------------------


class TestS3ChunkStore(ChunkStoreTests):
    """The whole suite, with the default pack size."""

    can_reopen = True
    can_corrupt = True
    pack_size = 8 * MiB
    inflight = 128 * MiB

    @pytest.fixture
    def store(self, bucket: S3Bucket, prefix: str, s3_server: SeaweedServer) -> Iterator[S3ChunkStore]:
        self.server = s3_server
        with S3ChunkStore(bucket, prefix, pack_size=self.pack_size, inflight=self.inflight) as s:
            yield s

    def reopen(self, store: S3ChunkStore) -> S3ChunkStore:
        store.close()
        return S3ChunkStore(store.bucket, store.prefix, pack_size=self.pack_size, inflight=self.inflight)

    def corrupt_one_byte(self, store: S3ChunkStore, cid: ChunkId) -> None:
        pid = store._where[cid]
        offset, stored, _, _ = store._packs[pid].entries[cid]
        client: Any = self.server.client()
        key = store._pack_key(pid)
        body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        body[offset + RECORD.size + stored // 2] ^= 0xFF
        client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))


class TestS3ChunkStoreWithSmallPacks(TestS3ChunkStore):
    """The suite again with 64 KiB packs and room for two in flight, so that batches span
    many packs and put_many waits for uploads while it reads."""

    pack_size = 64 << 10
    inflight = 128 << 10


def test_s3_store_agrees_with_a_dict_model(bucket: S3Bucket) -> None:
    def make() -> ChunkStoreStateMachine:
        store = S3ChunkStore(bucket, f"sm/{uuid.uuid4().hex}/", pack_size=16 << 10, inflight=64 << 10)
        return ChunkStoreStateMachine(
            store, lambda s: (s.close(), S3ChunkStore(bucket, s.prefix, pack_size=16 << 10, inflight=64 << 10))[1]
        )

    run_state_machine_as_test(make, settings=store_settings())


# -- layout (docs/format.md, "S3 store layout") ------------------------------------------


def test_a_store_is_a_format_object_packs_and_their_index_objects(bucket: S3Bucket, prefix: str, s3_server: SeaweedServer) -> None:
    items = [chunk(random_bytes(100_000, seed=i)) for i in range(30)]
    with S3ChunkStore(bucket, prefix, pack_size=1 * MiB) as store:
        store.put_many(items)
    keys = keys_under(s3_server, prefix)
    packs = sorted(k.rsplit("/", 1)[1] for k in keys if k.startswith(prefix + "packs/"))
    indexes = sorted(k.rsplit("/", 1)[1] for k in keys if k.startswith(prefix + "index/"))
    assert sorted(keys) == sorted([prefix + "FORMAT"] + [prefix + "packs/" + p for p in packs] + [prefix + "index/" + p for p in indexes])
    assert packs == indexes and all(len(p) == 16 and int(p, 16) >= 0 for p in packs)
    assert len(packs) == 3  # 30 chunks of ~100 KB in packs of 1 MiB
    client: Any = s3_server.client()
    assert client.get_object(Bucket=BUCKET, Key=prefix + "FORMAT")["Body"].read() == FORMAT_TEXT.encode()
    named: set[ChunkId] = set()
    for p in packs:
        size, entries = decode_index(client.get_object(Bucket=BUCKET, Key=prefix + "index/" + p)["Body"].read(), p)
        assert size == client.head_object(Bucket=BUCKET, Key=prefix + "packs/" + p)["ContentLength"]
        named |= entries.keys()
    assert named == {cid for cid, _ in items}


def test_opening_a_store_of_another_format_version_raises_unsupported_version(bucket: S3Bucket, prefix: str, s3_server: SeaweedServer) -> None:
    S3ChunkStore(bucket, prefix).close()
    client: Any = s3_server.client()
    client.put_object(Bucket=BUCKET, Key=prefix + "FORMAT", Body=b"cas-s3store 99\n")
    with pytest.raises(UnsupportedVersionError) as info:
        S3ChunkStore(bucket, prefix)
    assert "cas-s3store 99" in str(info.value)
    assert f"s3://{BUCKET}/{prefix}".rstrip("/") in str(info.value)


def test_parse_url_splits_bucket_and_prefix() -> None:
    assert parse_url("s3://b/x/y") == ("b", "x/y/")
    assert parse_url("s3://b/x/y/") == ("b", "x/y/")
    assert parse_url("s3://b") == ("b", "")
    for bad in ("s3:///x", "http://b/x", "s3://b/x?versionId=1"):
        with pytest.raises(ValueError):
            parse_url(bad)


# -- requests: batching, concurrency, no re-uploads -------------------------------------


def test_put_packs_many_chunks_into_each_object(bucket: S3Bucket, prefix: str, requests: Requests) -> None:
    items = [chunk(random_bytes(50_000, seed=i)) for i in range(100)]  # ~5 MB
    with S3ChunkStore(bucket, prefix, pack_size=8 * MiB) as store:
        requests.counts.clear()
        assert store.put_many(items) == 100
    assert requests.counts["PutObject"] == 2  # one pack, its index object


def test_putting_chunks_the_store_holds_uploads_nothing(bucket: S3Bucket, prefix: str, requests: Requests) -> None:
    items = [chunk(random_bytes(300_000, seed=i)) for i in range(40)]
    with S3ChunkStore(bucket, prefix, pack_size=2 * MiB) as store:
        store.put_many(items)
    with S3ChunkStore(bucket, prefix, pack_size=2 * MiB) as again:
        requests.counts.clear()
        requests.body_bytes = 0
        assert again.put_many(items) == 0
    assert requests.counts["PutObject"] == 0 and requests.body_bytes == 0


def test_put_reads_its_input_while_uploading_and_at_most_inflight_bytes_ahead(bucket: S3Bucket, prefix: str, s3_server: SeaweedServer) -> None:
    """With room for two packs in flight, the producer cannot get further than two packs (and
    the one being filled) ahead of the uploads: when it is asked for the chunks of pack k,
    packs up to k - 3 are already in the bucket."""
    pack = 256 << 10
    size = 64 << 10  # four chunks per pack
    seen_uploaded: list[tuple[int, int]] = []

    def produce() -> Iterator[tuple[ChunkId, bytes]]:
        for i in range(4 * 12):
            if i % 4 == 0 and i >= 4 * 4:
                k = i // 4
                seen_uploaded.append((k, len([key for key in keys_under(s3_server, prefix + "packs/")])))
            yield chunk(random_bytes(size - RECORD.size, seed=1000 + i))

    with S3ChunkStore(bucket, prefix, pack_size=pack, inflight=2 * pack) as store:
        assert store.put_many(produce()) == 48
        assert len(list(store.iter_ids())) == 48
    assert seen_uploaded
    for k, uploaded in seen_uploaded:
        assert uploaded >= k - 3, f"asked for pack {k}'s chunks with only {uploaded} packs uploaded"


def test_get_reads_neighbouring_chunks_of_a_pack_with_one_request(bucket: S3Bucket, prefix: str, requests: Requests) -> None:
    items = [chunk(random_bytes(40_000, seed=i)) for i in range(50)]
    with S3ChunkStore(bucket, prefix, pack_size=8 * MiB) as store:
        store.put_many(items)
        requests.counts.clear()
        got = read_all(store, [cid for cid, _ in reversed(items)])
        assert got == dict(items)
        assert requests.counts["GetObject"] == 1
        # A few scattered chunks far apart in a pack are separate reads, not the whole pack.
        far = [chunk(random_bytes(700_000, seed=100 + i)) for i in range(8)]
        store.put_many(far)
        requests.counts.clear()
        assert read_all(store, [far[0][0], far[3][0], far[7][0]]) == {far[i][0]: far[i][1] for i in (0, 3, 7)}
        assert requests.counts["GetObject"] == 3


def test_get_many_yields_a_chunk_asked_for_twice_twice(bucket: S3Bucket, prefix: str) -> None:
    a, b = chunk(b"a" * 1000), chunk(b"b" * 2000)
    with S3ChunkStore(bucket, prefix) as store:
        store.put_many([a, b])
        got = [(cid, bytes(d)) for cid, d in store.get_many([a[0], b[0], a[0]])]
    assert sorted(got) == sorted([a, b, a])


# -- several store objects on one prefix (as several processes or machines) ---------------


def test_a_chunk_deleted_through_another_store_object_is_not_reported_present(bucket: S3Bucket, prefix: str) -> None:
    """The garbage collector's deletes must be seen by every other writer at its next
    membership check: a writer that skipped a deleted chunk would write a ref to nothing."""
    items = [chunk(random_bytes(1000 + i, seed=i)) for i in range(10)]
    with S3ChunkStore(bucket, prefix) as writer, S3ChunkStore(bucket, prefix) as collector:
        writer.put_many(items)
        assert collector.has_many(cid for cid, _ in items) == {cid for cid, _ in items}
        assert collector.delete_many([items[0][0], items[1][0]]) == 2
        assert writer.has_many(cid for cid, _ in items) == {cid for cid, _ in items[2:]}
        assert writer.put_many(items[:3]) == 2  # the deleted ones are uploaded again
        assert read_all(collector, [cid for cid, _ in items]) == dict(items)
        collector.delete_many([items[5][0]])
        assert writer.has_many([items[5][0]]) == set()
        with pytest.raises(ChunkNotFoundError) as info:
            read_all(writer, [items[5][0]])
        assert info.value.chunk_id == items[5][0].hex()


def test_chunks_put_through_another_store_object_are_found_and_read(bucket: S3Bucket, prefix: str) -> None:
    with S3ChunkStore(bucket, prefix) as a, S3ChunkStore(bucket, prefix) as b:
        first = [chunk(random_bytes(5000, seed=i)) for i in range(5)]
        a.put_many(first)
        assert read_all(b, [cid for cid, _ in first]) == dict(first)  # b never listed before
        assert b.put_many(first) == 0


def test_reader_whose_pack_was_compacted_away_finds_the_chunks_in_their_new_pack(bucket: S3Bucket, prefix: str) -> None:
    keep = [chunk(random_bytes(20_000, seed=i)) for i in range(5)]
    drop = [chunk(random_bytes(20_000, seed=50 + i)) for i in range(15)]
    with S3ChunkStore(bucket, prefix) as reader, S3ChunkStore(bucket, prefix) as collector:
        reader.put_many(keep + drop)
        assert reader.has_many(cid for cid, _ in keep) == {cid for cid, _ in keep}  # reader knows the old pack
        collector.delete_many(cid for cid, _ in drop)
        stats = collector.compact(min_garbage=0.2)
        assert stats.packs_rewritten == 1 and stats.chunks_moved == 5
        assert read_all(reader, [cid for cid, _ in keep]) == dict(keep)


# -- compaction ----------------------------------------------------------------------------


def test_compaction_rewrites_packs_that_are_mostly_garbage_and_keeps_every_live_chunk(bucket: S3Bucket, prefix: str, s3_server: SeaweedServer) -> None:
    items = [chunk(random_bytes(30_000, seed=i)) for i in range(60)]
    with S3ChunkStore(bucket, prefix, pack_size=600_000) as store:
        store.put_many(items)
        packs_before = len(keys_under(s3_server, prefix + "packs/"))
        assert packs_before == 3
        dead = [cid for i, (cid, _) in enumerate(items) if i % 4]  # three in four
        store.delete_many(dead)
        stats = store.compact(min_garbage=0.5)
        assert stats.packs_rewritten == 3
        assert stats.chunks_moved == 15
        assert stats.bytes_reclaimed > 0.7 * stats.bytes_before
        live = {cid: d for i, (cid, d) in enumerate(items) if i % 4 == 0}
        assert sorted(store.iter_ids()) == sorted(live)
        assert read_all(store, live) == live
        assert store.compact(min_garbage=0.5).packs_rewritten == 0
    with S3ChunkStore(bucket, prefix) as again:
        assert read_all(again, live) == live
    assert len(keys_under(s3_server, prefix + "packs/")) == len(keys_under(s3_server, prefix + "index/")) == 1


def test_deleting_every_chunk_of_a_pack_removes_the_pack_object(bucket: S3Bucket, prefix: str, s3_server: SeaweedServer) -> None:
    items = [chunk(random_bytes(10_000, seed=i)) for i in range(10)]
    with S3ChunkStore(bucket, prefix) as store:
        store.put_many(items)
        assert store.delete_many(cid for cid, _ in items) == 10
    assert keys_under(s3_server, prefix) == [prefix + "FORMAT"]


def test_compaction_removes_old_packs_no_index_names_and_spares_young_ones(bucket: S3Bucket, prefix: str, s3_server: SeaweedServer) -> None:
    client: Any = s3_server.client()
    with S3ChunkStore(bucket, prefix) as store:
        store.put_many([chunk(b"live chunk")])
        client.put_object(Bucket=BUCKET, Key=prefix + "packs/00000000000000aa", Body=b"x" * 1000)
        store.orphan_age = 3600
        assert store.compact().bytes_before == 0  # young: maybe a put in progress
        assert prefix + "packs/00000000000000aa" in keys_under(s3_server, prefix)
        store.orphan_age = 0
        stats = store.compact()
        assert stats.bytes_before == 1000
        assert prefix + "packs/00000000000000aa" not in keys_under(s3_server, prefix)
        assert read_all(store, [chunk_id(b"live chunk")]) == {chunk_id(b"live chunk"): b"live chunk"}


def test_compaction_leaves_a_corrupt_chunk_in_place_and_reports_it(bucket: S3Bucket, prefix: str, s3_server: SeaweedServer) -> None:
    items = [chunk(random_bytes(20_000, seed=i)) for i in range(10)]
    with S3ChunkStore(bucket, prefix) as store:
        store.put_many(items)
        victim = items[2][0]
        TestS3ChunkStore.server = s3_server
        TestS3ChunkStore().corrupt_one_byte(store, victim)
        store.delete_many(cid for cid, _ in items[5:])
        stats = store.compact(min_garbage=0.2)
        assert stats.corrupt == [victim.hex()]
        good = {cid: d for cid, d in items[:5] if cid != victim}
        assert read_all(store, good) == good
        with pytest.raises(ChunkCorruptError):
            read_all(store, [victim])


# -- errors ----------------------------------------------------------------------------------


def test_store_on_a_bucket_that_does_not_exist_raises_store_error_naming_it(s3_server: SeaweedServer) -> None:
    with aws_env(s3_server.env()), pytest.raises(StoreError) as info:
        S3ChunkStore.open("s3://no-such-bucket-here/x")
    assert "'no-such-bucket-here' does not exist" in str(info.value)
    assert s3_server.endpoint in str(info.value)


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_wrong_credentials_raise_access_denied_naming_the_bucket_and_no_secret(s3_server: SeaweedServer, wrong: str) -> None:
    env = s3_server.env()
    if wrong == "secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret-" + uuid.uuid4().hex
    else:
        env["AWS_ACCESS_KEY_ID"] = "NOSUCHKEY" + uuid.uuid4().hex[:8]
    with aws_env(env), pytest.raises(S3AccessDeniedError) as info:
        S3ChunkStore.open(f"s3://{BUCKET}/x")
    err = info.value
    assert isinstance(err, PermissionError) and isinstance(err, StoreError)
    text = str(err)
    assert f"access denied to bucket '{BUCKET}'" in text and "AWS_ACCESS_KEY_ID" in text
    assert env["AWS_SECRET_ACCESS_KEY"] not in text and env["AWS_ACCESS_KEY_ID"] not in text
    assert err.__cause__ is None and err.__suppress_context__  # no botocore stack under it


def test_missing_credentials_raise_access_denied_saying_what_to_set(s3_server: SeaweedServer) -> None:
    env = s3_server.env()
    saved = {k: os.environ.pop(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE") if k in os.environ}
    try:
        without = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        with aws_env(without), pytest.raises(S3AccessDeniedError, match="no AWS credentials for bucket 'pathapi-test'.*AWS_ACCESS_KEY_ID"):
            S3ChunkStore.open(f"s3://{BUCKET}/x")
    finally:
        os.environ.update(saved)


def test_unreachable_endpoint_raises_store_error_naming_endpoint_and_bucket(s3_server: SeaweedServer) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(s3_server.env(), AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_MAX_ATTEMPTS="2")
    with aws_env(env), pytest.raises(StoreError) as info:
        S3ChunkStore.open(f"s3://{BUCKET}/x")
    text = str(info.value)
    assert f"cannot reach S3 endpoint http://127.0.0.1:{port} for bucket '{BUCKET}'" in text
    assert "after 2 attempts" in text


def test_without_boto3_an_s3_store_says_to_install_the_s3_extra(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["boto3"] = None  # as if it were not installed
        from pathapi.artifacts import ArtifactStore
        try:
            ArtifactStore.open("s3://bucket/prefix", sys.argv[1])
        except ImportError as e:
            print("ImportError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "pip install 'pathapi[s3]'" in out.stdout


def test_closed_store_raises_store_error_naming_it(bucket: S3Bucket, prefix: str) -> None:
    store = S3ChunkStore(bucket, prefix)
    store.close()
    with pytest.raises(StoreError, match="closed") as info:
        store.has_many([chunk_id(b"x")])
    assert store.location in str(info.value)


# -- the ref store -----------------------------------------------------------------------------


class TestS3RefStore(RefStoreTests):
    @pytest.fixture
    def refs(self, bucket: S3Bucket, prefix: str) -> Iterator[S3RefStore]:
        store = S3RefStore(bucket, prefix + "refs/")
        yield store
        store.close()

    def reopen(self, refs: RefStore) -> RefStore:
        assert isinstance(refs, S3RefStore)
        return S3RefStore(refs.bucket, refs.prefix)


@pytest.fixture
def refs(bucket: S3Bucket, prefix: str) -> Iterator[S3RefStore]:
    store = S3RefStore(bucket, prefix + "refs/")
    yield store
    store.close()


def test_ref_keys_are_one_escaped_segment_that_keeps_prefixes() -> None:
    assert encode_ref_name("root.source/outputs/ckpt") == "root.source%2Foutputs%2Fckpt"
    assert encode_ref_name("..") == "%2E."
    for name in REF_NAMES:
        key = encode_ref_name(name)
        assert "/" not in key and key not in (".", "..")
        for cut in range(len(name)):
            assert key.startswith(encode_ref_name(name[:cut]))


def test_a_damaged_ref_object_raises_store_error(refs: S3RefStore, s3_server: SeaweedServer) -> None:
    refs.put("damaged", b"manifest bytes" * 100)
    client: Any = s3_server.client()
    key = refs.prefix + encode_ref_name("damaged")
    body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[20] ^= 0x01
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    with pytest.raises(StoreError):
        refs.get("damaged")


# -- a writer killed at random instants ---------------------------------------------------------

WRITER = textwrap.dedent("""
    import os, random, sys
    from cas.hashing import chunk_id
    from cas.store.s3 import S3ChunkStore
    url, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    store = S3ChunkStore.open(url, pack_size=256 << 10, inflight=1 << 20)
    print("ready", flush=True)
    while True:
        batch = [rng.randbytes(rng.randint(1, 64_000)) for _ in range(rng.randint(1, 30))]
        ids = [chunk_id(b).hex() for b in batch]
        print("put", flush=True)
        store.put_many((chunk_id(b), b) for b in batch)
        print("batch", *ids, "end", flush=True)
""")


def test_writer_killed_at_random_instants_leaves_a_consistent_store(bucket: S3Bucket, prefix: str, s3_server: SeaweedServer) -> None:
    """SIGKILL a writing process at random instants. After each kill: every listed chunk
    reads back and verifies, every batch whose put_many returned is there, and the store
    takes new chunks; at the end, compaction removes what the killed writers left. Most
    kills land inside a put_many (the writer does little else)."""
    url = f"s3://{BUCKET}/{prefix}"
    env = dict(os.environ, **s3_server.env(), PYTHONPATH=str(REPO))
    rng = random.Random(20261125)
    promised: set[ChunkId] = set()
    inside = 0
    kills = 8
    for i in range(kills):
        child = subprocess.Popen([sys.executable, "-c", WRITER, url, str(rng.randrange(1 << 30))],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n", child.stderr.read() if child.stderr else ""
        time.sleep(rng.uniform(0.05, 1.0))
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        lines = out.splitlines()
        batches = [line.split()[1:-1] for line in lines if line.startswith("batch ") and line.endswith(" end")]
        inside += bool(lines) and lines[-1] == "put"  # killed inside a put_many
        for batch in batches:
            promised.update(bytes.fromhex(h) for h in batch)
        with S3ChunkStore(bucket, prefix) as store:
            ids = list(store.iter_ids())
            assert len(ids) == len(set(ids))
            assert not promised - set(ids), f"kill {i}: chunks of returned puts are missing"
            for cid, data in store.get_many(ids):
                assert chunk_id(data) == cid
            extra = chunk(f"after kill {i}".encode())
            assert store.put_many([extra]) == 1
            promised.add(extra[0])
    assert inside >= kills // 2
    with S3ChunkStore(bucket, prefix) as store:
        before = set(store.iter_ids())
        store.orphan_age = 0
        store.compact()
        assert set(store.iter_ids()) == before
        assert read_all(store, before).keys() == before
    packs = {k.rsplit("/", 1)[1] for k in keys_under(s3_server, prefix + "packs/")}
    indexes = {k.rsplit("/", 1)[1] for k in keys_under(s3_server, prefix + "index/")}
    assert packs == indexes  # no pack left that no index names
