"""Permission bits are never widened (issue 11, item 12).

A receiver gives every file and folder the mode it had at the origin (rwx for user, group and
other): a 0600 file stays 0600, a 0700 folder 0700, a read-only 0500 folder is still filled;
a chmod alone moves no byte; setuid, setgid and sticky bits are never granted. The random
trees of tests/test_materialize.py carry random modes too; these are the named cases, and one
through real work processes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path as FsPath

import pytest

from pathapi import App, Flow, Path, Work
from test_materialize import chunker, sc, sync_and_check  # noqa: F401  (fixtures)
from trees import Dir, File, read_tree, write_tree

NAMED = {
    "private.key": File(b"secret", mode=0o600),
    "group.txt": File(b"group", mode=0o640),
    "tool": File(b"#!/bin/sh\n", mode=0o750),
    "mine": Dir(0o700),
    "mine/notes": File(b"notes", mode=0o600),
    "shared": Dir(0o750),
    "drop": Dir(0o711),
    "drop/box": File(b"box", mode=0o644),
    "locked": Dir(0o500),
    "locked/a": File(b"a", mode=0o400),
    "locked/sub": Dir(0o500),
    "locked/sub/b": File(b"b", mode=0o444),
}


def modes(root: str) -> dict[str, int]:
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def test_files_and_folders_arrive_with_the_modes_they_had_at_the_origin(sc, chunker) -> None:  # noqa: F811
    write_tree(sc.origin, NAMED)
    sync_and_check(sc, NAMED, chunker)  # the model's modes, the snapshot's, the receiver's
    assert modes(sc.dest) == modes(sc.origin)
    os.chmod(sc.origin, 0o710)
    m = sc.publish()
    assert m.root_mode == 0o710
    assert sc.rws.sync(m, sc.dest, remote=sc.store).chunks_fetched == 0
    assert stat.S_IMODE(os.stat(sc.dest).st_mode) == 0o710  # the root folder too


def test_a_chmod_alone_moves_no_byte_and_narrows_or_widens_exactly(sc, chunker) -> None:  # noqa: F811
    write_tree(sc.origin, NAMED)
    sync_and_check(sc, NAMED, chunker)
    os.chmod(os.path.join(sc.origin, "group.txt"), 0o600)
    os.chmod(os.path.join(sc.origin, "tool"), 0o700)
    os.chmod(os.path.join(sc.origin, "shared"), 0o700)
    changed = {**NAMED, "group.txt": File(b"group", mode=0o600), "tool": File(b"#!/bin/sh\n", mode=0o700),
               "shared": Dir(0o700)}
    remote = sync_and_check(sc, changed, chunker)
    assert remote.delivered == []
    assert modes(sc.dest) == modes(sc.origin)


@pytest.mark.parametrize("special", [stat.S_ISUID, stat.S_ISGID, stat.S_ISVTX])
def test_setuid_setgid_and_sticky_bits_are_never_granted(sc, chunker, special: int) -> None:  # noqa: F811
    write_tree(sc.origin, {"run": File(b"x", mode=0o755), "d": Dir(0o755)})
    os.chmod(os.path.join(sc.origin, "run"), 0o755 | special)
    os.chmod(os.path.join(sc.origin, "d"), 0o755 | special)
    m = sc.publish()
    sc.rws.sync(m, sc.dest, remote=sc.store)
    for name in ("run", "d"):
        mode = os.lstat(os.path.join(sc.dest, name)).st_mode
        assert mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) == 0
        assert stat.S_IMODE(mode) == 0o755
    assert read_tree(sc.dest) == {"run": File(b"x", mode=0o755), "d": Dir(0o755)}


# -- through real work processes -------------------------------------------------------
class Owner(Work):
    def __init__(self) -> None:
        super().__init__()
        self.keys = "lit://keys"

    def run(self) -> None:
        os.makedirs(self.keys, mode=0o700, exist_ok=True)
        os.chmod(self.keys, 0o700)
        key = os.path.join(self.keys, "id")
        with open(key, "wb") as f:
            f.write(b"private key")
        os.chmod(key, 0o600)


class Holder(Work):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    def run(self, keys: Path) -> None:
        self.seen = {"keys": stat.S_IMODE(os.stat(keys).st_mode),
                     "keys/id": stat.S_IMODE(os.stat(os.path.join(keys, "id")).st_mode)}


class KeysFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.owner = Owner()
        self.holder = Holder()

    def run(self) -> None:
        self.owner.run()
        self.holder.run(self.owner.keys)


def test_a_private_file_stays_private_at_the_receiver(tmp_path: FsPath) -> None:
    flow = KeysFlow()
    App(flow, root=tmp_path / "app").run()
    assert flow.holder.seen == {"keys": 0o700, "keys/id": 0o600}
