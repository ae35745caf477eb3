"""The store conformance suites: the executable specification of :class:`ChunkStore` and
:class:`RefStore`.

Every backend's test module subclasses :class:`ChunkStoreTests` and supplies only how to
build a store (a pytest fixture named ``store``), and, where the backend can, how to reopen
it on the same backing data and how to flip one stored byte. A new backend gets the whole
suite for free, and a behaviour the suite does not check is not part of the contract.

:class:`RefStoreTests` does the same for ref stores: one rule for names (a non-empty string,
anything else BadRefNameError), atomic replacement, prefix listing, durability across reopen.

:class:`ChunkStoreStateMachine` drives a store and a plain ``dict`` side by side through
random puts, deletes, gets, membership tests and reopens, and compares them after every step.

This module imports pytest and hypothesis (the ``test`` extra); nothing in ``cas`` imports it.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, multiple, precondition, rule

from .errors import BadRefNameError, ChunkCorruptError, ChunkNotFoundError, StoreError
from .hashing import ChunkId, chunk_id
from .store.base import ChunkStore
from .store.refs import RefStore

__all__ = [
    "ChunkStoreStateMachine",
    "ChunkStoreTests",
    "REF_NAMES",
    "RefStoreTests",
    "chunk",
    "compressible_bytes",
    "flip_one_byte",
    "random_bytes",
    "read_all",
    "store_settings",
]

MiB = 1 << 20

# Example counts stay moderate so the suite runs in seconds; a soak run picks the other
# profile with CAS_STORE_PROFILE=cas-stores-soak. Deadlines are off: fsync times vary.
settings.register_profile(
    "cas-stores",
    max_examples=50,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "cas-stores-soak",
    parent=settings.get_profile("cas-stores"),
    max_examples=1000,
    stateful_step_count=60,
)


def store_settings() -> settings:
    """Hypothesis settings for store tests, from the profile ``CAS_STORE_PROFILE`` names.

    Returned rather than loaded, so that importing this module does not change the settings
    of unrelated tests in the same session.
    """
    return settings.get_profile(os.environ.get("CAS_STORE_PROFILE", "cas-stores"))


# -- data helpers ------------------------------------------------------------------


def chunk(data: bytes) -> tuple[ChunkId, bytes]:
    """``(id, data)``: the item ``put_many`` takes for ``data``."""
    return chunk_id(data), data


def random_bytes(n: int, seed: int = 0) -> bytes:
    """``n`` incompressible bytes, the same for the same seed (so failures reproduce)."""
    return random.Random(seed).randbytes(n)


def compressible_bytes(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that zstd shrinks a lot, so stores that compress take that path."""
    words = [random.Random(seed + i).randbytes(8) for i in range(16)]
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) * rng.randint(1, 64)
    return bytes(out[:n])


def flip_one_byte(data: bytes | bytearray, at: int | None = None) -> bytes:
    """``data`` with one byte inverted (the middle one unless ``at`` says), or one byte if empty."""
    if not data:
        return b"\x00"
    i = len(data) // 2 if at is None else at
    out = bytearray(data)
    out[i] ^= 0xFF
    return bytes(out)


def read_all(store: ChunkStore, ids: Iterable[ChunkId]) -> dict[ChunkId, bytes]:
    """``get_many`` into a dict of copies: yielded buffers may be reused once the iterator moves."""
    return {cid: bytes(data) for cid, data in store.get_many(ids)}


#: Payloads of every shape a store treats differently: empty, tiny, compressed, raw, large.
SAMPLES: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "one_byte": lambda: b"\x7f",
    "small_text": lambda: b"hello, chunk store\n",
    "compressible_64k": lambda: compressible_bytes(64 << 10, seed=1),
    "random_64k": lambda: random_bytes(64 << 10, seed=2),
    "compressible_1mib": lambda: compressible_bytes(MiB, seed=3),
    "random_1mib": lambda: random_bytes(MiB, seed=4),
}


class ChunkStoreTests:
    """Tests every :class:`ChunkStore` passes. Subclass it in a backend's test module.

    A subclass supplies a pytest fixture ``store`` yielding a fresh, empty store (and closing
    it afterwards). Where the backend can, it also sets the capability flags and overrides:

    - ``can_reopen`` and :meth:`reopen`: a new store object on the same backing data (the
      old object may be closed by it);
    - ``can_corrupt`` and :meth:`corrupt_one_byte`: flip one byte of a chunk's stored
      payload in the backing data, behind the store's back.

    Tests that need a capability the subclass lacks are skipped, saying which.
    """

    #: Whether :meth:`reopen` is implemented.
    can_reopen: ClassVar[bool] = False
    #: Whether :meth:`corrupt_one_byte` is implemented.
    can_corrupt: ClassVar[bool] = False
    #: Threads used by the concurrency tests.
    threads: ClassVar[int] = 4

    @pytest.fixture
    def store(self) -> Iterator[ChunkStore]:
        """A fresh, empty store; every backend module overrides this fixture."""
        raise NotImplementedError(f"{type(self).__name__} must define a `store` fixture")
        yield  # pragma: no cover

    def reopen(self, store: ChunkStore) -> ChunkStore:
        """A new store object on ``store``'s backing data (``store`` may be closed)."""
        raise NotImplementedError

    def corrupt_one_byte(self, store: ChunkStore, cid: ChunkId) -> None:
        """Flip one byte of the stored payload of ``cid`` in the backing data."""
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------

    def _reopened(self, store: ChunkStore) -> ChunkStore:
        """:meth:`reopen`, or skip the test when the backend cannot reopen."""
        if not self.can_reopen:
            pytest.skip(f"{type(self).__name__} cannot reopen its store (can_reopen is False)")
        return self.reopen(store)

    def _require_deletes(self, store: ChunkStore) -> None:
        """Skip tests of ``delete_many`` for stores that do not support it."""
        if not store.supports_deletes:
            pytest.skip(f"{store!r} does not support deletes")

    # -- put / has / get -----------------------------------------------------------

    @pytest.mark.parametrize("sample", list(SAMPLES))
    def test_put_then_get_returns_the_same_bytes(self, store: ChunkStore, sample: str) -> None:
        cid, data = chunk(SAMPLES[sample]())
        assert store.put_many([(cid, data)]) == 1
        assert store.has_many([cid]) == {cid}
        assert read_all(store, [cid]) == {cid: data}

    def test_put_accepts_bytearray_and_memoryview_payloads(self, store: ChunkStore) -> None:
        a = compressible_bytes(10_000, seed=10)
        b = random_bytes(3_000, seed=11)
        buf_a, buf_b = bytearray(a), bytearray(b)
        assert store.put_many([(chunk_id(a), buf_a), (chunk_id(b), memoryview(buf_b))]) == 2
        buf_a[:] = b"\x00" * len(buf_a)  # the caller reuses its buffers after put returns
        buf_b[:] = b"\x00" * len(buf_b)
        assert read_all(store, [chunk_id(a), chunk_id(b)]) == {chunk_id(a): a, chunk_id(b): b}

    def test_put_of_a_multibyte_memoryview_stores_its_bytes(self, store: ChunkStore) -> None:
        import array

        floats = array.array("f", [float(i) * 0.5 for i in range(2_000)])  # 4-byte items
        raw = floats.tobytes()
        assert store.put_many([(chunk_id(raw), memoryview(floats))]) == 1
        assert read_all(store, [chunk_id(raw)]) == {chunk_id(raw): raw}

    def test_put_accepts_a_one_shot_iterator(self, store: ChunkStore) -> None:
        items = [chunk(random_bytes(100 + i, seed=i)) for i in range(20)]
        assert store.put_many(iter(items)) == 20
        assert read_all(store, (cid for cid, _ in items)) == dict(items)

    def test_empty_batches_do_nothing(self, store: ChunkStore) -> None:
        assert store.put_many([]) == 0
        assert store.has_many([]) == set()
        assert list(store.get_many([])) == []
        if store.supports_deletes:
            assert store.delete_many([]) == 0
        assert list(store.iter_ids()) == []

    def test_get_many_returns_every_requested_chunk(self, store: ChunkStore) -> None:
        items = dict(chunk(compressible_bytes(1 + 97 * i, seed=i)) for i in range(40))
        store.put_many(items.items())
        wanted = list(items)[::3]
        assert read_all(store, wanted) == {cid: items[cid] for cid in wanted}
        assert read_all(store, reversed(list(items))) == items

    def test_has_many_returns_only_present_ids(self, store: ChunkStore) -> None:
        present = [chunk(random_bytes(50, seed=i)) for i in range(5)]
        absent = [chunk(random_bytes(50, seed=100 + i))[0] for i in range(5)]
        store.put_many(present)
        ids = [cid for cid, _ in present]
        assert store.has_many(ids + absent + ids[:2]) == set(ids)
        assert store.has_many(absent) == set()

    # -- counts and idempotence ----------------------------------------------------

    def test_put_returns_the_number_of_chunks_not_present_before(self, store: ChunkStore) -> None:
        a, b, c = (chunk(random_bytes(200, seed=i)) for i in range(3))
        assert store.put_many([a, b]) == 2
        assert store.put_many([a, b, c]) == 1
        assert store.put_many([c]) == 0
        assert store.put_many([b, a, c]) == 0

    def test_repeated_put_is_idempotent(self, store: ChunkStore) -> None:
        items = [chunk(compressible_bytes(5_000, seed=i)) for i in range(10)]
        store.put_many(items)
        for _ in range(3):
            assert store.put_many(items) == 0
        ids = list(store.iter_ids())
        assert sorted(ids) == sorted(cid for cid, _ in items)
        assert read_all(store, ids) == dict(items)

    def test_duplicates_inside_one_batch_are_stored_and_counted_once(self, store: ChunkStore) -> None:
        a, b = chunk(b"aaaa"), chunk(compressible_bytes(70_000, seed=5))
        assert store.put_many([a, b, a, a, b]) == 2
        ids = list(store.iter_ids())
        assert sorted(ids) == sorted([a[0], b[0]])
        assert read_all(store, [a[0], b[0]]) == dict([a, b])

    # -- corrupt puts ----------------------------------------------------------------

    def test_put_of_bytes_that_do_not_hash_to_the_id_raises_chunk_corrupt(self, store: ChunkStore) -> None:
        data = random_bytes(1000, seed=7)
        cid = chunk_id(data)
        with pytest.raises(ChunkCorruptError) as info:
            store.put_many([(cid, flip_one_byte(data))])
        assert isinstance(info.value, ValueError)
        assert info.value.chunk_id == cid.hex()
        assert cid.hex() in str(info.value)
        assert store.has_many([cid]) == set()

    def test_failed_put_adds_nothing_of_its_batch(self, store: ChunkStore) -> None:
        before = chunk(b"stored before")
        store.put_many([before])
        good1, good2 = chunk(random_bytes(4000, seed=8)), chunk(compressible_bytes(9000, seed=9))
        bad_data = random_bytes(3000, seed=10)
        bad = (chunk_id(bad_data), flip_one_byte(bad_data, at=0))
        with pytest.raises(ChunkCorruptError) as info:
            store.put_many([good1, bad, good2])
        assert info.value.chunk_id == bad[0].hex()
        assert store.has_many([good1[0], good2[0], bad[0]]) == set()
        assert list(store.iter_ids()) == [before[0]]
        assert read_all(store, [before[0]]) == dict([before])
        # The store is still usable and counts the good chunks as new.
        assert store.put_many([good1, good2]) == 2
        assert read_all(store, [good1[0], good2[0]]) == dict([good1, good2])

    def test_failed_large_put_leaves_the_store_consistent_and_writable(self, store: ChunkStore) -> None:
        """A batch larger than any write buffer fails on its last chunk: nothing is added.

        Backends that stream a batch to disk have written part of it when the bad chunk is
        found; those bytes must stay unreachable, and later puts must not land after them
        in a way that breaks reads.
        """
        goods = [chunk(random_bytes(MiB, seed=20 + i)) for i in range(10)]
        bad_data = random_bytes(5000, seed=30)
        with pytest.raises(ChunkCorruptError):
            store.put_many([*goods, (chunk_id(bad_data), b"not it")])
        assert store.has_many(cid for cid, _ in goods) == set()
        assert list(store.iter_ids()) == []
        assert store.put_many(goods[:3]) == 3
        assert read_all(store, [cid for cid, _ in goods[:3]]) == dict(goods[:3])

    # -- absent ids ------------------------------------------------------------------

    def test_get_of_absent_id_raises_chunk_not_found(self, store: ChunkStore) -> None:
        cid = chunk_id(b"never stored")
        with pytest.raises(ChunkNotFoundError) as info:
            list(store.get_many([cid]))
        err = info.value
        assert isinstance(err, FileNotFoundError)
        assert err.chunk_id == cid.hex()
        assert cid.hex() in str(err)
        assert store.location and store.location in str(err)

    def test_get_of_a_batch_with_one_absent_id_raises_chunk_not_found_for_it(self, store: ChunkStore) -> None:
        present = [chunk(random_bytes(300, seed=i)) for i in range(4)]
        store.put_many(present)
        absent = chunk_id(b"absent")
        ids = [present[0][0], present[1][0], absent, present[2][0]]
        with pytest.raises(ChunkNotFoundError) as info:
            read_all(store, ids)
        assert info.value.chunk_id == absent.hex()

    # -- iter_ids and delete ---------------------------------------------------------

    def test_iter_ids_of_an_empty_store_is_empty(self, store: ChunkStore) -> None:
        assert list(store.iter_ids()) == []

    def test_iter_ids_lists_each_id_once(self, store: ChunkStore) -> None:
        items = [chunk(random_bytes(10 * i, seed=i)) for i in range(30)]
        store.put_many(items[:20])
        store.put_many(items[10:])
        store.put_many(items)
        if store.supports_deletes:
            store.delete_many(cid for cid, _ in items[:5])
            store.put_many(items[:5])
        ids = list(store.iter_ids())
        assert len(ids) == len(set(ids))
        assert set(ids) == {cid for cid, _ in items}

    def test_delete_many_returns_the_number_removed_and_removes_them(self, store: ChunkStore) -> None:
        self._require_deletes(store)
        items = [chunk(compressible_bytes(2000 + i, seed=i)) for i in range(6)]
        store.put_many(items)
        gone = [items[0][0], items[1][0], items[0][0], chunk_id(b"absent")]
        assert store.delete_many(gone) == 2
        assert store.delete_many(gone) == 0
        assert store.has_many(cid for cid, _ in items) == {cid for cid, _ in items[2:]}
        assert set(store.iter_ids()) == {cid for cid, _ in items[2:]}
        with pytest.raises(ChunkNotFoundError):
            list(store.get_many([items[0][0]]))
        assert read_all(store, [cid for cid, _ in items[2:]]) == dict(items[2:])

    def test_deleted_chunk_can_be_put_again(self, store: ChunkStore) -> None:
        self._require_deletes(store)
        item = chunk(random_bytes(12345, seed=12))
        store.put_many([item])
        assert store.delete_many([item[0]]) == 1
        assert store.put_many([item]) == 1
        assert read_all(store, [item[0]]) == dict([item])
        assert list(store.iter_ids()) == [item[0]]

    # -- reopen ----------------------------------------------------------------------

    def test_data_survives_reopen(self, store: ChunkStore) -> None:
        items = dict(chunk(make()) for make in SAMPLES.values())
        store.put_many(items.items())
        if store.supports_deletes:
            dropped = chunk_id(SAMPLES["one_byte"]())
            store.delete_many([dropped])
            del items[dropped]
        with self._reopened(store) as again:
            assert sorted(again.iter_ids()) == sorted(items)
            assert again.has_many(items) == set(items)
            assert read_all(again, items) == items

    def test_reopened_store_accepts_and_deduplicates_puts(self, store: ChunkStore) -> None:
        old = [chunk(random_bytes(500, seed=i)) for i in range(5)]
        store.put_many(old)
        with self._reopened(store) as again:
            new = [chunk(random_bytes(500, seed=50 + i)) for i in range(5)]
            assert again.put_many(old + new) == 5
            assert read_all(again, [cid for cid, _ in old + new]) == dict(old + new)

    # -- corruption at rest ------------------------------------------------------------

    @pytest.mark.parametrize("sample", ["small_text", "compressible_64k", "random_64k"])
    def test_corrupted_stored_byte_is_detected_on_read(self, store: ChunkStore, sample: str) -> None:
        if not self.can_corrupt:
            pytest.skip(f"{type(self).__name__} cannot corrupt its backing data (can_corrupt is False)")
        victim = chunk(SAMPLES[sample]())
        bystander = chunk(random_bytes(777, seed=13))
        store.put_many([victim, bystander])
        self.corrupt_one_byte(store, victim[0])
        with pytest.raises(ChunkCorruptError) as info:
            read_all(store, [victim[0]])
        assert info.value.chunk_id == victim[0].hex()
        assert victim[0].hex() in str(info.value)
        assert store.location in str(info.value)
        assert read_all(store, [bystander[0]]) == dict([bystander])

    # -- concurrency -------------------------------------------------------------------

    def test_concurrent_puts_of_overlapping_batches_add_each_chunk_once(self, store: ChunkStore) -> None:
        """Threads put overlapping batches at once; each chunk is counted new exactly once.

        Puts are linearizable: whichever put lands a chunk first reports it, the others see
        it as present. So the counts returned over all threads add up to the distinct chunks.
        """
        pool = [chunk(compressible_bytes(1 + 313 * i, seed=i) if i % 2 else random_bytes(1 + 211 * i, seed=i)) for i in range(120)]
        start = threading.Barrier(self.threads)
        counts: list[int] = []
        errors: list[BaseException] = []

        def writer(seed: int) -> None:
            rng = random.Random(seed)
            order = pool[:]
            rng.shuffle(order)
            try:
                start.wait()
                total = 0
                i = 0
                while i < len(order):
                    n = rng.randint(1, 12)
                    batch = order[i : i + n] + rng.sample(pool, 2)  # overlap with other threads
                    total += store.put_many(batch)
                    i += n
                counts.append(total)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        _run_threads(writer, range(self.threads))
        assert errors == []
        assert sum(counts) == len(pool)
        assert sorted(store.iter_ids()) == sorted(cid for cid, _ in pool)
        assert read_all(store, [cid for cid, _ in pool]) == dict(pool)

    def test_reads_during_concurrent_puts_see_whole_chunks(self, store: ChunkStore) -> None:
        """Readers only ever get chunks that verify, while writers keep adding more."""
        pool = [chunk(random_bytes(2000 + 37 * i, seed=i)) for i in range(150)]
        expected = dict(pool)
        done = threading.Event()
        errors: list[BaseException] = []

        def writer(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for i in range(0, len(pool), 10):
                    batch = pool[i : i + 10]
                    rng.shuffle(batch)
                    store.put_many(batch)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                while not done.is_set():
                    ids = list(store.has_many(rng.sample(list(expected), 20)))
                    got = read_all(store, ids)
                    assert got == {cid: expected[cid] for cid in ids}
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        readers = [threading.Thread(target=reader, args=(100 + i,)) for i in range(2)]
        for t in readers:
            t.start()
        try:
            _run_threads(writer, range(max(2, self.threads - 2)))
        finally:
            done.set()
            for t in readers:
                t.join()
        assert errors == []
        assert read_all(store, expected) == expected

    def test_repr_names_the_store_location(self, store: ChunkStore) -> None:
        assert store.location
        assert store.location in repr(store)

    def test_a_closed_store_refuses_every_call_and_closes_again_quietly(self, store: ChunkStore) -> None:
        c = chunk(b"before close")
        store.put_many([c])
        store.close()
        store.close()
        calls: list[Callable[[], object]] = [
            lambda: store.has_many([c[0]]),
            lambda: list(store.get_many([c[0]])),
            lambda: store.put_many([chunk(b"after close")]),
            lambda: list(store.iter_ids()),
            lambda: store.delete_many([c[0]]),
        ]
        for call in calls:
            with pytest.raises(StoreError, match="closed"):
                call()


#: Names a ref store must keep apart and list by prefix: path-like, dotted, escaped-looking,
#: non-ASCII, surrogate-escaped (bytes of a non-UTF-8 file name) and longer than a key.
REF_NAMES = [
    "root.source/outputs/ckpt",
    "root.source/outputs/ckpt/inner",
    "root.source/outputs/ckpt2",
    ".hidden",
    "..",
    "a//b/./c/../d/",
    "spaces and %41 percent",
    "\u00fcn\u00efc\u00f8d\u00e9/\u540d\u524d",
    "surrogate-\udcff-escaped",
    "x" * 1500,
    "shared/0123456789abcdef",
]


class RefStoreTests:
    """Tests every :class:`RefStore` passes. Subclass it in a backend's test module.

    A subclass supplies a pytest fixture ``refs`` yielding a fresh, empty ref store (and
    closing it afterwards), and :meth:`reopen`: a new store object on the same backing data.
    """

    @pytest.fixture
    def refs(self) -> Iterator[RefStore]:
        """A fresh, empty ref store; every backend module overrides this fixture."""
        raise NotImplementedError(f"{type(self).__name__} must define a `refs` fixture")
        yield  # pragma: no cover

    def reopen(self, refs: RefStore) -> RefStore:
        """A new ref store object on ``refs``' backing data."""
        raise NotImplementedError

    def test_an_empty_store_has_no_names_and_no_values(self, refs: RefStore) -> None:
        assert list(refs.names()) == []
        assert refs.get("never put") is None
        assert refs.delete("never put") is False

    def test_put_get_replace_and_delete(self, refs: RefStore) -> None:
        for i, name in enumerate(REF_NAMES):
            refs.put(name, f"value {i}".encode() + bytes(range(256)))
        for i, name in enumerate(REF_NAMES):
            assert refs.get(name) == f"value {i}".encode() + bytes(range(256))
        refs.put(REF_NAMES[0], b"")
        assert refs.get(REF_NAMES[0]) == b""
        assert refs.delete(REF_NAMES[1]) is True
        assert refs.delete(REF_NAMES[1]) is False
        assert refs.get(REF_NAMES[1]) is None
        assert refs.get(REF_NAMES[2]) == b"value 2" + bytes(range(256))

    def test_values_of_any_buffer_type_come_back_as_bytes(self, refs: RefStore) -> None:
        refs.put("a", bytearray(b"from a bytearray"))  # type: ignore[arg-type]  # any buffer, on purpose
        refs.put("b", memoryview(b"from a memoryview"))  # type: ignore[arg-type]
        refs.put("big", random_bytes(1 << 20))
        assert refs.get("a") == b"from a bytearray" and type(refs.get("a")) is bytes
        assert refs.get("b") == b"from a memoryview"
        assert refs.get("big") == random_bytes(1 << 20)

    def test_names_lists_exactly_the_names_with_a_prefix(self, refs: RefStore) -> None:
        for name in REF_NAMES:
            refs.put(name, b"v")
        assert sorted(refs.names()) == sorted(REF_NAMES)
        assert sorted(refs.names("root.source/outputs/ckpt")) == sorted(REF_NAMES[:3])
        assert sorted(refs.names("root.source/outputs/ckpt/")) == [REF_NAMES[1]]
        assert sorted(refs.names(".")) == sorted([".hidden", ".."])
        assert list(refs.names("xxx")) == ["x" * 1500]
        assert list(refs.names("shared/")) == ["shared/0123456789abcdef"]
        assert list(refs.names("nothing")) == []
        refs.delete("..")
        assert list(refs.names(".")) == [".hidden"]

    @pytest.mark.parametrize("name", ["", None, b"bytes", 7])
    def test_a_name_that_is_not_a_non_empty_str_raises_bad_ref_name(self, refs: RefStore, name: object) -> None:
        for call in (lambda: refs.put(name, b"x"), lambda: refs.get(name), lambda: refs.delete(name)):  # type: ignore[arg-type]
            with pytest.raises(BadRefNameError):
                call()
        with pytest.raises(BadRefNameError):
            list(refs.names(b"prefix"))  # type: ignore[arg-type]
        assert list(refs.names()) == []  # nothing was written under any spelling of it

    def test_refs_survive_reopen(self, refs: RefStore) -> None:
        for name in REF_NAMES:
            refs.put(name, name.encode("utf-8", "surrogateescape"))
        refs.delete(REF_NAMES[0])
        again = self.reopen(refs)
        try:
            assert sorted(again.names()) == sorted(REF_NAMES[1:])
            for name in REF_NAMES[1:]:
                assert again.get(name) == name.encode("utf-8", "surrogateescape")
        finally:
            again.close()

    def test_concurrent_replacements_are_seen_whole(self, refs: RefStore) -> None:
        values = [bytes([i]) * (64 << 10) for i in range(4)]
        refs.put("hot", values[0])
        errors: list[BaseException] = []
        done = threading.Event()

        def reader() -> None:
            while not done.is_set():
                try:
                    assert refs.get("hot") in values
                except BaseException as e:  # reported after join
                    errors.append(e)
                    return

        def writer(seed: int) -> None:
            try:
                for k in range(10):
                    refs.put("hot", values[(seed + k) % len(values)])
            except BaseException as e:
                errors.append(e)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        for t in readers:
            t.start()
        try:
            _run_threads(writer, range(3))
        finally:
            done.set()
            for t in readers:
                t.join()
        assert errors == []
        assert refs.get("hot") in values

    def test_a_closed_store_refuses_every_call_and_closes_again_quietly(self, refs: RefStore) -> None:
        refs.put("kept", b"v")
        refs.close()
        refs.close()
        calls: list[Callable[[], object]] = [
            lambda: refs.get("kept"),
            lambda: refs.put("kept", b"w"),
            lambda: refs.delete("kept"),
            lambda: list(refs.names()),
        ]
        for call in calls:
            with pytest.raises(StoreError, match="closed"):
                call()

    def test_repr_names_the_store_location(self, refs: RefStore) -> None:
        assert refs.location
        assert refs.location in repr(refs)


def _run_threads(target: Callable[[int], None], seeds: Iterable[int]) -> None:
    """Run ``target(seed)`` on one thread per seed and wait for all of them."""
    threads = [threading.Thread(target=target, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- stateful: the store against a dict --------------------------------------------------

_payloads = st.one_of(
    st.binary(max_size=64),  # tiny and empty chunks
    st.binary(min_size=600, max_size=4096),  # raw (incompressible-ish) chunks
    st.builds(lambda unit, n: (unit * n)[: 64 << 10], st.binary(min_size=1, max_size=8), st.integers(64, 4096)),
)


class ChunkStoreStateMachine(RuleBasedStateMachine):
    """A store and a ``dict`` of id -> bytes, driven by the same random operations.

    After every step the store must list exactly the model's ids (each once); every get,
    has, put count and delete count must match what the dict says. Each backend runs it::

        run_state_machine_as_test(lambda: ChunkStoreStateMachine(make_store(), reopen), settings=store_settings())

    ``store`` should be fresh for each example (the model starts from its contents anyway).
    ``reopen``, when given, returns a new store object on the same backing data; the
    machine then reopens at random points. The machine closes its store in ``teardown``.
    """

    chunks = Bundle("chunks")

    def __init__(self, store: ChunkStore, reopen: Callable[[ChunkStore], ChunkStore] | None = None) -> None:
        super().__init__()
        self.store = store
        self._reopen = reopen
        self.model: dict[ChunkId, bytes] = read_all(store, list(store.iter_ids()))

    @initialize(target=chunks, payloads=st.lists(_payloads, min_size=1, max_size=4))
    def some_chunks(self, payloads: list[bytes]) -> object:
        # Candidates only (not stored): every rule has ids to work with from the first step.
        return multiple(*(chunk(p) for p in payloads))

    @rule(target=chunks, data=_payloads)
    def new_chunk(self, data: bytes) -> tuple[ChunkId, bytes]:
        return chunk(data)

    @rule(batch=st.lists(chunks, max_size=8))
    def put(self, batch: list[tuple[ChunkId, bytes]]) -> None:
        new = {cid for cid, _ in batch} - self.model.keys()
        assert self.store.put_many(batch) == len(new)
        self.model.update(batch)

    @rule(batch=st.lists(chunks, max_size=6), bad_data=_payloads, at=st.integers(0, 6))
    def put_batch_with_a_corrupt_chunk(self, batch: list[tuple[ChunkId, bytes]], bad_data: bytes, at: int) -> None:
        bad = chunk(bad_data)
        # Only a chunk the store lacks is sure to be verified: a store may skip the bytes
        # of a chunk it already holds, or of a repeat of an id earlier in the batch.
        if bad[0] in self.model or any(cid == bad[0] for cid, _ in batch):
            return
        items = list(batch)
        items.insert(min(at, len(items)), (bad[0], flip_one_byte(bad[1])))
        try:
            self.store.put_many(items)
        except ChunkCorruptError as e:
            assert e.chunk_id == bad[0].hex()
        else:
            raise AssertionError(f"put_many accepted bytes that do not hash to {bad[0].hex()}")
        # The invariant checks that nothing of the batch was added.

    @precondition(lambda self: self.store.supports_deletes)
    @rule(ids=st.lists(chunks, max_size=8))
    def delete(self, ids: list[tuple[ChunkId, bytes]]) -> None:
        wanted = {cid for cid, _ in ids}
        present = wanted & self.model.keys()
        assert self.store.delete_many(cid for cid, _ in ids) == len(present)
        for cid in present:
            del self.model[cid]

    @rule(ids=st.lists(chunks, unique=True, max_size=8))
    def get(self, ids: list[tuple[ChunkId, bytes]]) -> None:
        wanted = [cid for cid, _ in ids]
        absent = [cid for cid in wanted if cid not in self.model]
        if absent:
            try:
                read_all(self.store, wanted)
            except ChunkNotFoundError as e:
                assert e.chunk_id in {cid.hex() for cid in absent}
            else:
                raise AssertionError(f"get_many found absent chunks {[c.hex() for c in absent]}")
        else:
            assert read_all(self.store, wanted) == {cid: self.model[cid] for cid in wanted}

    @rule(ids=st.lists(chunks, max_size=8))
    def has(self, ids: list[tuple[ChunkId, bytes]]) -> None:
        wanted = {cid for cid, _ in ids}
        assert self.store.has_many(cid for cid, _ in ids) == wanted & self.model.keys()

    @precondition(lambda self: self._reopen is not None)
    @rule()
    def reopen(self) -> None:
        assert self._reopen is not None
        self.store = self._reopen(self.store)

    @invariant()
    def lists_exactly_the_model(self) -> None:
        ids = list(self.store.iter_ids())
        assert len(ids) == len(set(ids)), "iter_ids listed an id twice"
        assert set(ids) == self.model.keys()

    def teardown(self) -> None:
        self.store.close()
