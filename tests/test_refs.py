"""LocalRefStore against the ref store conformance suite, plus what only files can suffer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cas.errors import StoreError
from cas.store.refs import LocalRefStore, RefStore
from cas.testing import RefStoreTests


class TestLocalRefStore(RefStoreTests):
    @pytest.fixture
    def refs(self, tmp_path: Path) -> Iterator[LocalRefStore]:
        store = LocalRefStore(tmp_path / "refs")
        yield store
        store.close()

    def reopen(self, refs: RefStore) -> RefStore:
        assert isinstance(refs, LocalRefStore)
        return LocalRefStore(refs.root)


def test_a_damaged_ref_file_raises_store_error_on_get_and_on_listing(tmp_path: Path) -> None:
    refs = LocalRefStore(tmp_path / "refs")
    refs.put("damaged", b"manifest bytes" * 100)
    (f,) = [p for p in refs.root.iterdir() if not p.name.startswith(".")]
    body = bytearray(f.read_bytes())
    body[20] ^= 0x01
    f.write_bytes(bytes(body))
    with pytest.raises(StoreError, match=str(f)):
        refs.get("damaged")
    # Listing must not skip it: garbage collection would then delete the chunks it names.
    with pytest.raises(StoreError):
        list(refs.names())


def test_a_ref_file_holding_another_name_is_an_error_not_a_wrong_value(tmp_path: Path) -> None:
    refs = LocalRefStore(tmp_path / "refs")
    refs.put("a", b"value of a")
    refs.put("b", b"value of b")
    fa, fb = refs._file("a"), refs._file("b")
    fa.write_bytes(fb.read_bytes())
    with pytest.raises(StoreError, match="holds 'b', not 'a'"):
        refs.get("a")


def test_a_failed_put_leaves_the_old_value_and_no_temporary_file(tmp_path: Path) -> None:
    refs = LocalRefStore(tmp_path / "refs")
    refs.put("kept", b"old")
    target = refs._file("kept")
    target.unlink()
    target.mkdir()  # a folder where the file goes: the rename fails for real
    (target / "x").write_bytes(b"")
    with pytest.raises(StoreError, match="cannot write ref 'kept'"):
        refs.put("kept", b"new")
    assert [p.name for p in refs.root.iterdir() if p.name.startswith(".tmp")] == []
