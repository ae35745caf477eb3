"""File trees for tests: a model, hypothesis strategies for trees and edits, and disk helpers.

A *tree model* is a dict ``path -> Node``. For a folder, the keys are the relative POSIX
paths of everything below it (the folder itself has no key; ``{}`` is an empty folder).
For a single file the model is ``{"": Node("file", ...)}``. A Node is
``(kind, data, executable)``: ``("file", bytes, bool)``, ``("dir", None, False)`` or
``("link", target, False)``; :func:`read_tree` returns the same shape, so a tree on disk
compares to a model with ``==``.

Edits (:class:`Edit`) are drawn without knowing the tree: each names an operation and
*choices* (integers) that :func:`edit_model` resolves against the model it is applied to,
so a sequence of edits is a plain strategy and shrinks well. An edit that does not apply
(no file to append to, a name that exists already, a link that would leave the tree) is a
no-op. :func:`apply_edit` performs the same edit on disk with the real operation (bytes
written in place, ``os.rename``, ``rmtree``...) and returns the new model.

The tests' one tree writer (:func:`write_tree`), tree readers (:func:`read_tree`, and
:func:`listing`, its digest form) and file digest (:func:`sha`, BLAKE3) live here: a test
says what it writes as a model and imports these, never a copy of its own.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple, TypeVar

import blake3
from hypothesis import strategies as st

from cas.chunking import Chunker, ChunkerParams, iter_chunk_spans, iter_chunks
from cas.errors import UnsafePathError
from cas.hashing import ChunkId
from cas.manifest import Entry, Kind, Manifest, resolve_link

KiB = 1024
MiB = 1024 * KiB

#: Small chunks, so that small files have many of them and tests stay fast.
SMALL_PARAMS = ChunkerParams(min_size=1 * KiB, avg_size=4 * KiB, max_size=16 * KiB)


# -- the model --------------------------------------------------------------------
def _short(data: bytes) -> str:
    if len(data) <= 16:
        return repr(data)
    return f"<{len(data)} bytes {blake3.blake3(data).hexdigest()[:10]}>"


class Node(NamedTuple):
    kind: str  # "file" | "dir" | "link"
    data: bytes | str | None = None  # a file's bytes, a link's target
    executable: bool = False
    mode: int | None = None  # permission bits of a file or folder (None for a link)

    def __repr__(self) -> str:  # keeps failure reports readable with MiB-sized files
        if self.kind == "file":
            assert isinstance(self.data, bytes)
            return f"File({_short(self.data)}, {self.mode:#o})"
        if self.kind == "link":
            return f"Link({self.data!r})"
        return f"Dir({self.mode:#o})"


def File(data: bytes, executable: bool = False, mode: int | None = None) -> Node:  # noqa: N802 (reads like a type)
    """A file; its mode defaults to 0644, or 0755 when ``executable``; ``executable`` is the
    owner's x bit of ``mode`` when that is given."""
    if mode is None:
        mode = 0o755 if executable else 0o644
    return Node("file", bytes(data), bool(mode & 0o100), mode)


def Dir(mode: int = 0o755) -> Node:  # noqa: N802
    return Node("dir", None, False, mode)


def Link(target: str) -> Node:  # noqa: N802
    return Node("link", target, False, None)


#: Modes the generated trees and edits use (root ignores them, so any can be read back).
FILE_MODES = (0o644, 0o600, 0o640, 0o755, 0o700, 0o750, 0o444, 0o400)
DIR_MODES = (0o755, 0o700, 0o750, 0o711, 0o555, 0o500)


Model = dict[str, Node]


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def abspath(root: str | os.PathLike[str], rel: str) -> str:
    return os.path.join(os.fspath(root), rel) if rel else os.fspath(root)


def dirs_of(model: Mapping[str, Node]) -> list[str]:
    """Folders new entries can go into ("" is the root); none for a single-file tree."""
    if "" in model:
        return []
    return ["", *sorted(p for p, n in model.items() if n.kind == "dir")]


def files_of(model: Mapping[str, Node]) -> list[str]:
    return sorted(p for p, n in model.items() if n.kind == "file")


def without(model: Mapping[str, Node], path: str) -> Model:
    """The model with ``path`` and everything below it removed."""
    return {p: n for p, n in model.items() if p != path and not p.startswith(path + "/")}


def is_valid(model: Mapping[str, Node]) -> bool:
    """Whether a manifest of this tree can exist: every link resolves inside the root."""
    by_path = {
        p: Entry(p, Kind.SYMLINK, target=n.data) if n.kind == "link" else Entry(p, Kind.DIR)  # type: ignore[arg-type]
        for p, n in model.items()
    }
    try:
        for p, n in model.items():
            if n.kind == "link":
                resolve_link(by_path, p, n.data)  # type: ignore[arg-type]
    except UnsafePathError:
        return False
    return True


def link_target(link_path: str, to: str) -> str:
    """A relative target that makes a link at ``link_path`` point at root-relative ``to``."""
    return os.path.relpath(to or ".", parent_of(link_path) or ".")


# -- contents ---------------------------------------------------------------------
_POOL_SIZE = 6 * MiB
_pool: bytes | None = None


def _shared_pool() -> bytes:
    """Bytes that many generated files take slices of, so trees share chunks."""
    global _pool
    if _pool is None:
        _pool = random.Random(20240601).randbytes(_POOL_SIZE)
    return _pool


STYLES = ("random", "pool", "repeat", "zeros")


def make_bytes(style: str, seed: int, size: int) -> bytes:
    """Deterministic content: fresh random bytes, a slice of a shared pool (chunks shared
    across files and versions), a short pattern repeated (one chunk id at many offsets), zeros."""
    if size <= 0:
        return b""
    if style == "random":
        return random.Random(seed).randbytes(size)
    if style == "pool":
        pool = _shared_pool()
        size = min(size, len(pool))
        off = seed % (len(pool) - size + 1)
        return pool[off : off + size]
    if style == "repeat":
        pattern = random.Random(seed).randbytes(1 + seed % 97)
        return (pattern * (size // len(pattern) + 1))[:size]
    return bytes(size)


@st.composite
def contents(draw: st.DrawFn, big: bool = True, max_small: int = 300 * KiB, min_size: int = 0) -> bytes:
    """File bytes: often under 2 KiB, mostly up to a few hundred KiB, rarely 1-3 MiB."""
    bucket = draw(st.integers(0, 99))
    if bucket < 40 and min_size < 2 * KiB:
        size = draw(st.integers(min_size, 2 * KiB))
    elif bucket < 97 or not big:
        size = draw(st.integers(min_size, max(min_size, max_small)))
    else:
        size = draw(st.integers(1 * MiB, 3 * MiB))
    style = draw(st.sampled_from(STYLES))
    seed = draw(st.integers(0, 2**31))
    return make_bytes(style, seed, size)


@st.composite
def small_contents(draw: st.DrawFn, max_size: int = 24 * KiB) -> bytes:
    """Payloads of byte edits (inserted, overwritten, appended runs): mostly a few bytes,
    sometimes up to ``max_size``."""
    bucket = draw(st.integers(0, 9))
    size = draw(st.integers(0, 64 if bucket < 6 else 2 * KiB if bucket < 9 else max_size))
    return make_bytes(draw(st.sampled_from(STYLES)), draw(st.integers(0, 2**31)), size)


# Any character a Linux file name may hold except: "/" and NUL (impossible), "\\" (manifests
# refuse it for portability) and ":" (manifests refuse a top-level name that starts with a
# letter and ":", as a drive letter).
_NAME_CHARS = st.one_of(
    st.sampled_from("abcxyz019_-. "),
    st.sampled_from("éßøñ日本語Ωж🙂"),
    st.characters(codec="utf-8", exclude_characters="/\\:\x00"),
)
names = st.text(_NAME_CHARS, min_size=1, max_size=10).filter(lambda s: s not in (".", ".."))


# -- trees ------------------------------------------------------------------------
@st.composite
def trees(
    draw: st.DrawFn,
    max_entries: int = 16,
    max_depth: int = 3,
    big: bool = True,
    links: bool = True,
    max_small: int = 300 * KiB,
) -> Model:
    """A folder: nested dirs (some empty), files (some empty, some executable), and
    symlinks that stay inside it (to files, to dirs, dangling)."""
    model: Model = {}
    for _ in range(draw(st.integers(0, max_entries))):
        parent = draw(st.sampled_from([d for d in dirs_of(model) if d.count("/") < max_depth - 1] or [""]))
        path = join(parent, draw(names))
        if path in model:
            continue
        if draw(st.integers(0, 3)) == 0:
            model[path] = Dir(draw(st.sampled_from(DIR_MODES)))
        else:
            model[path] = File(draw(contents(big=big, max_small=max_small)), mode=draw(st.sampled_from(FILE_MODES)))
    if links:
        for _ in range(draw(st.integers(0, 3))):
            parent = draw(st.sampled_from(dirs_of(model)))
            path = join(parent, draw(names))
            if path in model:
                continue
            pointees = ["", *sorted(p for p, n in model.items() if n.kind != "link")]
            to = draw(st.one_of(st.sampled_from(pointees), names))  # a name alone may dangle
            candidate = {**model, path: Link(link_target(path, to))}
            if is_valid(candidate):
                model = candidate
    return model


def single_files(big: bool = True, max_small: int = 300 * KiB, min_size: int = 0) -> st.SearchStrategy[Model]:
    """A tree whose root is one file."""
    return st.builds(
        lambda data, mode: {"": File(data, mode=mode)}, contents(big=big, max_small=max_small, min_size=min_size),
        st.sampled_from(FILE_MODES)
    )


# -- edits ------------------------------------------------------------------------
BYTE_OPS = ("insert", "delete", "overwrite", "append", "truncate")
TREE_OPS = (
    "rename", "add_file", "add_dir", "remove", "chmod", "file_to_dir", "dir_to_file",
    "dir_to_link", "add_link", "retarget",
)
OPS = BYTE_OPS + TREE_OPS


class Edit(NamedTuple):
    op: str
    pick: int  # which entry (index into the sorted candidates, modulo their number)
    pick2: int  # a second choice: a parent folder, what a link points at
    pos: int  # where in a file, per mille of its size
    length: int  # bytes to delete
    data: bytes  # what is inserted / written / appended / put in a new file
    name: str  # a new name
    executable: bool

    def __repr__(self) -> str:
        return (
            f"Edit({self.op!r}, pick={self.pick}, pick2={self.pick2}, pos={self.pos}, "
            f"length={self.length}, data={_short(self.data)}, name={self.name!r}, x={self.executable})"
        )


def edits(ops: Iterable[str] = OPS, max_data: int = 24 * KiB) -> st.SearchStrategy[Edit]:
    """One edit; changes of bytes inside files come three times as often as the others."""
    ops = tuple(ops)
    weighted = tuple(op for op in ops for _ in range(3 if op in BYTE_OPS else 1))
    return st.builds(
        Edit,
        op=st.sampled_from(weighted),
        pick=st.integers(0, 1000),
        pick2=st.integers(0, 1000),
        pos=st.integers(0, 1000),
        length=st.integers(0, 40 * KiB),
        data=small_contents(max_data),
        name=names,
        executable=st.booleans(),
    )


def edit_sequences(ops: Iterable[str] = OPS, max_size: int = 6, max_data: int = 24 * KiB) -> st.SearchStrategy[list[Edit]]:
    return st.lists(edits(ops, max_data), max_size=max_size)


DiskChange = Callable[[str], None]


def _write(path: str, data: bytes, executable: bool, mode: int | None = None) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode if mode is not None else 0o755 if executable else 0o644)


def _pick(items: list[str], i: int) -> str | None:
    return items[i % len(items)] if items else None


def _resolve(model: Model, e: Edit) -> tuple[Model, DiskChange] | None:
    """The model after ``e`` and the disk operation that does it; None if ``e`` does not apply."""
    files = files_of(model)
    dirs = dirs_of(model)
    entries = sorted(p for p in model if p)

    if e.op in BYTE_OPS:
        path = _pick(files, e.pick)
        if path is None:
            return None
        node = model[path]
        old = node.data
        assert isinstance(old, bytes)
        pos = len(old) * e.pos // 1000
        if e.op == "insert":
            new, at, write, trunc = old[:pos] + e.data + old[pos:], pos, e.data + old[pos:], None
        elif e.op == "delete":
            new = old[:pos] + old[pos + e.length :]
            at, write, trunc = pos, old[pos + e.length :], len(new)
        elif e.op == "overwrite":
            new = old[:pos] + e.data + old[pos + len(e.data) :]
            at, write, trunc = pos, e.data, None
        elif e.op == "append":
            new, at, write, trunc = old + e.data, len(old), e.data, None
        else:  # truncate
            new, at, write, trunc = old[:pos], 0, b"", pos

        def change(root: str) -> None:  # in place: same inode, as an editor appending would
            with open(abspath(root, path), "r+b") as f:
                f.seek(at)
                f.write(write)
                if trunc is not None:
                    f.truncate(trunc)

        return {**model, path: node._replace(data=new)}, change

    if e.op == "chmod":  # a file, or (one time in three) a folder, gets another mode
        folders = [d for d in dirs if d]
        if folders and e.pick2 % 3 == 0:
            path, modes = _pick(folders, e.pick), DIR_MODES
        else:
            path, modes = _pick(files, e.pick), FILE_MODES
        if path is None:
            return None
        node = model[path]
        mode = modes[e.pos % len(modes)]
        new = File(node.data, mode=mode) if node.kind == "file" else Dir(mode)  # type: ignore[arg-type]
        return {**model, path: new}, lambda root: os.chmod(abspath(root, path), mode)

    if not dirs:  # a single-file tree only takes byte edits
        return None

    if e.op == "rename":  # within its folder: links below keep their depth, so stay inside
        src = _pick(entries, e.pick)
        if src is None:
            return None
        dst = join(parent_of(src), e.name)
        if dst in model:
            return None
        moved = {
            (dst + p[len(src) :] if p == src or p.startswith(src + "/") else p): n for p, n in model.items()
        }
        return moved, lambda root: os.rename(abspath(root, src), abspath(root, dst))

    if e.op in ("add_file", "add_dir", "add_link"):
        path = join(_pick(dirs, e.pick2) or "", e.name)
        if path in model:
            return None
        if e.op == "add_file":
            return {**model, path: File(e.data, e.executable)}, lambda root: _write(abspath(root, path), e.data, e.executable)
        if e.op == "add_dir":
            return {**model, path: Dir()}, lambda root: os.mkdir(abspath(root, path), 0o755)
        target = link_target(path, _pick(["", *entries], e.pick) or "")
        return {**model, path: Link(target)}, lambda root: os.symlink(target, abspath(root, path))

    if e.op == "remove":
        path = _pick(entries, e.pick)
        if path is None:
            return None

        def remove(root: str) -> None:
            p = abspath(root, path)
            shutil.rmtree(p) if model[path].kind == "dir" else os.unlink(p)

        return without(model, path), remove

    if e.op == "file_to_dir":  # and sometimes something inside at once
        path = _pick(files, e.pick)
        if path is None:
            return None
        child = join(path, e.name)

        def to_dir(root: str) -> None:
            os.unlink(abspath(root, path))
            os.mkdir(abspath(root, path), 0o755)
            if e.data:
                _write(abspath(root, child), e.data, e.executable)

        new = {**model, path: Dir()}
        if e.data:
            new[child] = File(e.data, e.executable)
        return new, to_dir

    if e.op in ("dir_to_file", "dir_to_link"):
        path = _pick(dirs[1:], e.pick)
        if path is None:
            return None
        rest = without(model, path)
        if e.op == "dir_to_file":
            def to_file(root: str) -> None:
                shutil.rmtree(abspath(root, path))
                _write(abspath(root, path), e.data, e.executable)

            return {**rest, path: File(e.data, e.executable)}, to_file
        target = link_target(path, _pick(["", *sorted(p for p in rest if p)], e.pick2) or "")

        def to_link(root: str) -> None:
            shutil.rmtree(abspath(root, path))
            os.symlink(target, abspath(root, path))

        return {**rest, path: Link(target)}, to_link

    if e.op == "retarget":
        path = _pick(sorted(p for p, n in model.items() if n.kind == "link"), e.pick)
        if path is None:
            return None
        target = link_target(path, _pick(["", *entries], e.pick2) or "")

        def retarget(root: str) -> None:
            os.unlink(abspath(root, path))
            os.symlink(target, abspath(root, path))

        return {**model, path: Link(target)}, retarget

    raise AssertionError(f"unknown edit {e.op}")


def edit_model(model: Model, e: Edit) -> Model:
    """The model after ``e`` (unchanged if ``e`` does not apply or would make it invalid)."""
    r = _resolve(model, e)
    return r[0] if r is not None and is_valid(r[0]) else model


def apply_edit(root: str | os.PathLike[str], model: Model, e: Edit) -> Model:
    """Perform ``e`` on the tree at ``root`` (described by ``model``); the new model."""
    r = _resolve(model, e)
    if r is None or not is_valid(r[0]):
        return model
    r[1](os.fspath(root))
    return r[0]


def apply_edits(root: str | os.PathLike[str], model: Model, es: Iterable[Edit]) -> Model:
    for e in es:
        model = apply_edit(root, model, e)
    return model


# -- disk -------------------------------------------------------------------------
def write_tree(root: str | os.PathLike[str], model: Mapping[str, Node]) -> None:
    """Create the tree ``model`` at ``root``: a new folder (0755), or, if a folder is there
    already, the model's entries in it (none of which may exist yet). The one tree writer of
    the tests: a test says *what* it writes as a model.

    Folders above an entry that the model does not list are made as plain folders, so a flat
    ``{"ckpt/a.bin": File(...)}`` is enough to write (:func:`read_tree` then shows them too).
    """
    root = os.fspath(root)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    if "" in model:
        node = model[""]
        assert node.kind == "file", "a tree's root is a file or a folder"
        _write(root, node.data, node.executable, node.mode)  # type: ignore[arg-type]
        return
    if not os.path.isdir(root):
        os.mkdir(root)
        os.chmod(root, 0o755)
    folders = []
    for path in sorted(model, key=lambda p: p.split("/")):  # parents before children
        node = model[path]
        where = abspath(root, path)
        os.makedirs(os.path.dirname(where), exist_ok=True)
        if node.kind == "dir":
            os.mkdir(where)
            folders.append((where, node.mode))
        elif node.kind == "file":
            _write(where, node.data, node.executable, node.mode)  # type: ignore[arg-type]
        else:
            os.symlink(node.data, where)  # type: ignore[arg-type]
    for where, mode in reversed(folders):  # children first: a read-only folder is filled first
        os.chmod(where, 0o755 if mode is None else mode)


def _node(path: str, st_: os.stat_result) -> Node:
    if stat.S_ISLNK(st_.st_mode):
        return Link(os.readlink(path))
    if stat.S_ISDIR(st_.st_mode):
        return Dir(stat.S_IMODE(st_.st_mode) & 0o777)
    if stat.S_ISREG(st_.st_mode):
        with open(path, "rb") as f:
            return File(f.read(), mode=stat.S_IMODE(st_.st_mode) & 0o777)
    raise AssertionError(f"{path}: not a file, folder or link")


_T = TypeVar("_T")


def _walk(root: str | os.PathLike[str], describe: Callable[[str, os.stat_result], _T]) -> dict[str, _T] | None:
    """rel path -> ``describe(path, lstat)`` for everything below ``root``; a root that is
    not a folder is named "". None if nothing is at ``root``. Links are never followed; an
    unreadable folder raises (a tree is never read in part)."""
    root = os.fspath(root)
    try:
        st_ = os.lstat(root)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st_.st_mode):
        return {"": describe(root, st_)}
    out: dict[str, _T] = {}

    def fail(e: OSError) -> None:
        raise e

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[join("" if rel == "." else rel, name)] = describe(full, os.lstat(full))
    return out


def read_tree(root: str | os.PathLike[str]) -> Model | None:
    """The model of what is at ``root`` (None if nothing is). Links are never followed;
    a link at ``root`` itself reads as ``{"": Link(...)}``."""
    return _walk(root, _node)


def sha(path: str | os.PathLike[str]) -> str:
    """BLAKE3 of a file's bytes (hex), read in blocks: the one file digest of the tests."""
    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


Listing = dict[str, tuple[object, ...]]


def _listed(path: str, st_: os.stat_result) -> tuple[object, ...]:
    if stat.S_ISLNK(st_.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(st_.st_mode):
        return ("dir",)
    return ("file", bool(st_.st_mode & stat.S_IXUSR), sha(path))


def listing(root: str | os.PathLike[str]) -> Listing | None:
    """What a tree holds, small enough to compare and to send from a work process: rel path
    -> ``("file", executable, sha)`` | ``("link", target)`` | ``("dir",)``. A root that is not
    a folder (a file, a link) is named ""; None if nothing is at ``root``. Links are never
    followed. :func:`read_tree` is the same with the bytes and modes themselves."""
    return _walk(root, _listed)


def tree_files(root: str | os.PathLike[str]) -> list[str]:
    """Every non-directory path below ``root`` (links not followed), for "no leftovers" checks."""
    out = []
    for d, subdirs, fs in os.walk(root):
        out += [os.path.join(d, f) for f in fs]
        out += [os.path.join(d, s) for s in subdirs if os.path.islink(os.path.join(d, s))]
    return out


def disk_usage(*roots: str | os.PathLike[str]) -> int:
    """Bytes of disk blocks used by everything under ``roots`` (links not followed)."""
    total = 0
    for root in roots:
        total += os.lstat(root).st_blocks * 512
        for d, subdirs, fs in os.walk(root):
            for name in subdirs + fs:
                total += os.lstat(os.path.join(d, name)).st_blocks * 512
    return total


# -- manifests and chunks, computed independently of snapshot ---------------------
def manifest_of(model: Mapping[str, Node], params: ChunkerParams = SMALL_PARAMS, chunker: Chunker | None = None) -> Manifest:
    """The manifest of a model, from its bytes in memory (no disk, no stat cache)."""
    own = chunker is None
    chunker = chunker or Chunker(params)
    try:
        entries = []
        for p, n in model.items():
            if n.kind == "file":
                data = n.data
                assert isinstance(data, bytes)
                entries.append(Entry(p, Kind.FILE, n.executable, len(data), chunker.chunk_bytes(data), mode=n.mode))
            elif n.kind == "dir":
                entries.append(Entry(p, Kind.DIR, mode=n.mode))
            else:
                entries.append(Entry(p, Kind.SYMLINK, target=n.data))  # type: ignore[arg-type]
        kind = Kind.FILE if "" in model else Kind.DIR
        return Manifest.build(chunker.params, kind, entries, 0o755 if kind == Kind.DIR else None)
    finally:
        if own:
            chunker.close()


def chunk_ids_in(model: Mapping[str, Node] | None, chunker: Chunker) -> set[ChunkId]:
    """The ids of every chunk inside the files of ``model`` (what a receiver holds)."""
    if model is None:
        return set()
    return {
        cid
        for n in model.values()
        if n.kind == "file"
        for cid, _ in iter_chunks(chunker.chunk_bytes(n.data))  # type: ignore[arg-type]
    }


def chunks_of(model: Mapping[str, Node] | None, chunker: Chunker) -> dict[ChunkId, bytes]:
    """id -> bytes of every chunk in the files of ``model`` (none if it is None: nothing there)."""
    out: dict[ChunkId, bytes] = {}
    for n in (model or {}).values():
        if n.kind == "file":
            data = n.data
            assert isinstance(data, bytes)
            for cid, off, size in iter_chunk_spans(chunker.chunk_bytes(data)):
                out[cid] = data[off : off + size]
    return out


def put_tree_chunks(store, root: str | os.PathLike[str], manifest: Manifest) -> None:  # type: ignore[no-untyped-def]
    """Put every chunk of ``manifest`` into ``store``, read from the files under ``root``."""
    for e in manifest.files():
        with open(abspath(root, e.path), "rb") as f:
            data = f.read()
        store.put_many((cid, data[off : off + n]) for cid, off, n in iter_chunk_spans(e.chunks))


def fast_chunker(params: ChunkerParams = SMALL_PARAMS) -> Chunker:
    """A Chunker reading files in 256 KiB segments. The default 16 MiB segments make the
    chunker allocate its whole buffer ring (~48 MiB) for every file larger than min_size,
    ~40 ms a file; boundaries and ids do not depend on the segment size (multi-MiB files
    cross many segments here, which the cross-checks against :func:`manifest_of` cover)."""
    return Chunker(params, segment_size=256 * KiB)


def make_workspace(state_dir: str | os.PathLike[str], params: ChunkerParams = SMALL_PARAMS):  # type: ignore[no-untyped-def]
    """A :class:`cas.Workspace` with a :func:`fast_chunker`."""
    from cas.workspace import Workspace

    ws = Workspace(state_dir, params)
    ws.chunker.close()
    ws.chunker = fast_chunker(params)
    return ws


# -- chunk sources -------------------------------------------------------------------
class CountingSource:
    """A ChunkSource around another that records every chunk delivered through it."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.location = f"counting:{inner.location}"
        self.delivered: list[ChunkId] = []

    def has_many(self, ids: Iterable[ChunkId]) -> set[ChunkId]:
        return self.inner.has_many(ids)

    def get_many(self, ids: Iterable[ChunkId]) -> Iterator[tuple[ChunkId, bytes]]:
        for cid, data in self.inner.get_many(ids):
            self.delivered.append(cid)
            yield cid, data
