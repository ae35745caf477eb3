"""MemoryChunkStore against the chunk-store conformance suite and the dict model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis.stateful import run_state_machine_as_test

from cas.hashing import ChunkId, chunk_id
from cas.store import MemoryChunkStore
from cas.testing import ChunkStoreStateMachine, ChunkStoreTests, chunk, flip_one_byte, read_all, store_settings


class TestMemoryChunkStore(ChunkStoreTests):
    """The whole suite; a memory store cannot be reopened (its data lives in the object)."""

    can_corrupt = True

    @pytest.fixture
    def store(self) -> Iterator[MemoryChunkStore]:
        with MemoryChunkStore() as s:
            yield s

    def corrupt_one_byte(self, store: MemoryChunkStore, cid: ChunkId) -> None:
        """The backing data of a memory store is its dict; replace the value behind its back."""
        store._chunks[cid] = flip_one_byte(store._chunks[cid])


def test_memory_store_agrees_with_a_dict_model() -> None:
    run_state_machine_as_test(lambda: ChunkStoreStateMachine(MemoryChunkStore()), settings=store_settings())


def test_two_memory_stores_do_not_share_chunks() -> None:
    a, b = MemoryChunkStore(), MemoryChunkStore()
    item = chunk(b"only in a")
    a.put_many([item])
    assert b.has_many([item[0]]) == set()
    assert a.location != b.location
    assert read_all(a, [chunk_id(b"only in a")]) == dict([item])
