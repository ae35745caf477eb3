"""The materialize journal (docs/format.md, "Materialize journal"): its bytes are a format
on disk, so a journal committed by an earlier release (the code before its operations were
typed, issue 12) is still recovered, and the typed operations encode to exactly those bytes.

The journal below is written as that code wrote it: compact JSON, keys in the order
format, version, dest, ops, names not escaped to ASCII; one operation of every kind.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cas.errors import MaterializeError
from cas.materialize import locked, recover
from cas.materialize.journal import (
    Chmod,
    DirMode,
    _InvalidOperation,
    Journal,
    Link,
    MakeDir,
    Patch,
    Place,
    Range,
    Remove,
    decode_operation,
)

NEW = "ünï/new 🙂.txt"
#: Every byte of it as journal v2 writes it, but the destination (JSON-encoded in its place).
OPS_V2 = (
    '{"format":"cas-journal","version":2,"dest":DEST,"ops":['
    '["rm","old.txt"],["mkdir","ünï"],["place","00000001","ünï/new 🙂.txt"],["chmod","ünï/new 🙂.txt",292],'
    '["patch","p.bin",8,420,[[2,0,3]]],["link","ln","ünï/new 🙂.txt"],["dirmode","ünï",493]]}'
)
TYPED = (
    Remove("old.txt"),
    MakeDir("ünï"),
    Place(NEW, "00000001"),
    Chmod(NEW, 0o444),
    Patch("p.bin", 8, 0o644, (Range(2, 0, 3),)),
    Link("ln", NEW),
    DirMode("ünï", 0o755),
)


def v2_bytes(dest: Path) -> bytes:
    return OPS_V2.replace("DEST", json.dumps(str(dest), ensure_ascii=False)).encode()


def test_a_journal_committed_in_the_v2_encoding_is_recovered(tmp_path: Path) -> None:
    dest, state = tmp_path / "dest", tmp_path / "state"
    dest.mkdir()
    (dest / "old.txt").write_bytes(b"goes")
    (dest / "p.bin").write_bytes(b"abcdefghij")
    (state / "txn" / "stage").mkdir(parents=True)
    (state / "txn" / "stage" / "00000001").write_bytes(b"new bytes")
    (state / "txn" / "data").write_bytes(b"XYZ")
    (state / "txn" / "ops").write_bytes(v2_bytes(dest))
    with locked(state):
        assert recover(state) is True
    assert sorted(os.listdir(dest)) == ["ln", "p.bin", "ünï"]
    assert (dest / NEW).read_bytes() == b"new bytes"
    assert stat.S_IMODE((dest / NEW).stat().st_mode) == 0o444
    assert (dest / "p.bin").read_bytes() == b"abXYZfgh"
    assert stat.S_IMODE((dest / "p.bin").stat().st_mode) == 0o644
    assert os.readlink(dest / "ln") == NEW
    assert stat.S_IMODE((dest / "ünï").stat().st_mode) == 0o755
    assert not (state / "txn").exists()


def test_typed_operations_encode_to_the_v2_bytes_and_decode_from_them(tmp_path: Path) -> None:
    raw = v2_bytes(tmp_path)
    assert Journal(str(tmp_path), TYPED).encode() == raw
    assert Journal.decode(raw, "here") == Journal(str(tmp_path), TYPED)


@pytest.mark.parametrize(("raw", "problem"), [
    (["rm"], "not a known operation with its fields"),
    (["place", "00000001"], "not a known operation with its fields"),
    (["mkdir", 3], "its path is not a string"),
    (["rm", "a/../b"], "its path is not inside the destination"),
    (["rm", "a" * 4097], "its path is too long"),
    (["place", "1", "a"], "not a staged file's name"),
    (["place", "00000001", "/a"], "its path is not inside the destination"),  # the path is checked first
    (["link", "l", "/etc"], "not a relative link target"),
    (["link", "l", "a" * 4097], "link target too long"),
    (["chmod", "f", 0o4755], "its mode is not permission bits"),
    (["dirmode", "d", True], "its mode is not permission bits"),
    (["patch", "f", -1, 0o644, []], "size, mode or ranges of the wrong type"),
    (["patch", "f", 1, 0o644, [[0, 0, (16 << 20) + 1]]], "is not [offset, data offset, length] within bounds"),
])
def test_an_invalid_operation_says_what_is_wrong_with_it(raw: list[object], problem: str) -> None:
    with pytest.raises(_InvalidOperation, match=problem.replace("[", r"\[")):
        decode_operation(raw)


def test_a_journal_with_one_invalid_operation_is_refused_naming_it(tmp_path: Path) -> None:
    raw = json.dumps({"format": "cas-journal", "version": 2, "dest": str(tmp_path),
                      "ops": [["rm", "a"], ["chmod", "f", "rw"]]}).encode()
    with pytest.raises(MaterializeError, match=r"operation 1 \['chmod', 'f', 'rw'\]: its mode is not permission bits"):
        Journal.decode(raw, "here")
