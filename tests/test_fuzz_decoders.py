"""Hostile input for every decoder (issue 7): manifests, chunk frames and deltas on the wire,
local store index entries and pack records, ref files, the materialize journal and resume
files, stat cache records.

The property is the same everywhere: a decoder given random bytes, a truncation or bit flip
of a valid encoding, huge declared sizes or counts, deep nesting or hostile paths either
returns something valid or raises the project's own exception (:class:`cas.errors.CasError`
or :class:`pathapi.errors.PathapiError`); never IndexError, struct.error,
UnicodeDecodeError, OverflowError, RecursionError, MemoryError...; never a write outside the
root it was given; never an allocation sized by a declared length before that length was
checked (measured with tracemalloc).

What a manifest may name (decided here, documented in docs/format.md "Manifest"):

- Refused: ``..``, ``.``, empty components, absolute paths, drive letters at the start
  (``C:``, ``c:x``), backslashes, NUL, names over 255 bytes, paths over 4096 bytes, a path
  named twice, a path under a file or a link, bytes that are not UTF-8 (overlong forms of
  ``.`` and ``/`` included).
- Allowed: names that differ only in case (``A`` and ``a``) or in Unicode normalization
  (NFC ``é`` and NFD ``é``): on Linux they are different byte strings and so different
  files, and a manifest is compared by bytes. Look-alikes (fullwidth ``．．``, ``／``, one-dot
  leaders) are ordinary names. A ``:`` after the first component is an ordinary character.

Example counts are bounded for CI; ``PATHAPI_SOAK=1`` runs each property twenty times longer
(see tests/_hostile.py).
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import struct
import tempfile
import threading
import time
import tracemalloc
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
import pytest
import zstandard
from _hostile import FakeOrigin, fuzz, http_answer
from hypothesis import assume, given
from hypothesis import strategies as st
from trees import make_workspace

from cas import delta
from cas.chunking import RECORD_SIZE, ChunkerParams, KiB, MiB, pack_chunks
from cas.compress import CODEC_RAW, CODEC_ZSTD, decompress
from cas.errors import (
    CasError,
    ChunkCorruptError,
    ManifestError,
    MaterializeError,
    StoreError,
    UnsupportedVersionError,
)
from cas.hashing import ID_SIZE, chunk_id
from cas.manifest import Entry, Kind, Manifest, file_entry
from cas.materialize import locked, recover
from cas.store.local import INDEX, RECORD, LocalChunkStore
from cas.store.memory import MemoryChunkStore
from cas.store.refs import LocalRefStore
from cas.store.refs import encode as encode_ref
from pathapi.aio import io_loop
from pathapi.wire.client import OriginClient, OriginSource, close_sessions
from pathapi.errors import OriginError, PathapiError
from pathapi.wire.protocol import FRAME, HEADER_MANIFEST_ID, STATUS_DELTA, STATUS_OK

PARAMS = ChunkerParams(min_size=256, avg_size=1 * KiB, max_size=4 * KiB)
OWN_ERRORS = (CasError, PathapiError)


def refused_or(call: Callable[[], object]) -> object | None:
    """``call()``'s result, or None if it raised one of the project's own errors. Any other
    exception (IndexError, struct.error, ...) propagates and fails the test."""
    try:
        return call()
    except OWN_ERRORS:
        return None


#: tracemalloc counts every thread, and threads left by earlier tests of the session (servers,
#: pools) allocate while a measured call runs (2 MB seen): bounds sit above that noise and far
#: below what honouring a declared size would cost (the strategies declare up to GiBs-TiBs).
ALLOC_BOUND = 32 * MiB


def peak_bytes(call: Callable[[], object]) -> int:
    """Peak bytes Python allocated (all threads) while ``call`` ran."""
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def damaged(valid: bytes) -> st.SearchStrategy[bytes]:
    """Truncations, bit flips, byte sets and extensions of ``valid``."""
    edit = st.tuples(st.integers(0, max(len(valid) - 1, 0)), st.integers(0, 7), st.integers(0, 255), st.booleans())

    def apply(edits: list[tuple[int, int, int, bool]], cut: int | None, tail: bytes) -> bytes:
        b = bytearray(valid)
        for pos, bit, value, set_byte in edits:
            if b:
                if set_byte:
                    b[pos % len(b)] = value
                else:
                    b[pos % len(b)] ^= 1 << bit
        return bytes(b[:cut] if cut is not None else b) + tail

    return st.builds(apply, st.lists(edit, max_size=4), st.one_of(st.none(), st.integers(0, len(valid))), st.binary(max_size=8))


def fingerprint(top: Path, skip: tuple[Path, ...]) -> dict[str, tuple[object, ...]]:
    """Everything under ``top`` except ``skip`` (links not followed): kind, mode, bytes or target."""
    out: dict[str, tuple[object, ...]] = {}
    for d, dirs, files in os.walk(top):
        dirs[:] = [x for x in dirs if Path(d, x) not in skip]
        for name in dirs + files:
            p = Path(d, name)
            if p in skip:
                continue
            st_ = os.lstat(p)
            rel = str(p.relative_to(top))
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st_.st_mode), p.read_bytes())
    return out


def inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    got = os.path.realpath(path)
    return got == real_root or got.startswith(real_root + os.sep)


# == manifests =====================================================================================
# A second encoder, written from docs/format.md ("Manifest (version 1)"), not from cas.manifest.
def encode_manifest(entries: list[tuple[int, int, bytes, object]], *, root: int = 0, count: int | None = None,
                    sizes: tuple[int, int, int] = (PARAMS.min_size, PARAMS.avg_size, PARAMS.max_size)) -> bytes:
    """``entries``: (kind, flags, path bytes, extra); a file's extra is (size, [(id, length)]),
    a link's its target bytes."""
    out = [struct.pack("<4sHBIIIBI", b"CASM", 1, 1, *sizes, root, len(entries) if count is None else count)]
    for kind, flags, path, extra in entries:
        out.append(struct.pack("<BBH", kind, flags, len(path)) + path)
        if kind == 1:
            size, chunks = extra  # type: ignore[misc]
            out.append(struct.pack("<QI", size, len(chunks)))
            out += [cid + struct.pack("<I", n) for cid, n in chunks]
        elif kind == 2:
            out.append(struct.pack("<H", len(extra)) + extra)  # type: ignore[arg-type]
    return b"".join(out)


def documented_path_ok(path: str) -> bool:
    """docs/format.md's rules for a path of a directory manifest, checked independently."""
    raw = path.encode("utf-8", "surrogatepass")
    if not path or len(raw) > 4096 or "\x00" in path or "\\" in path or path.startswith("/"):
        return False
    if len(path) >= 2 and path[1] == ":" and path[0].isascii() and path[0].isalpha():
        return False
    return all(c not in ("", ".", "..") and len(c.encode("utf-8", "surrogatepass")) <= 255 for c in path.split("/"))


NFC_E = unicodedata.normalize("NFC", "é")
NFD_E = unicodedata.normalize("NFD", "é")
assert NFC_E != NFD_E

# Components a hostile manifest would use, and ordinary ones to build real trees from.
HOSTILE_COMPONENTS = [
    "..", ".", "", "C:", "c:", "Z:x", "a:b", "\\", "a\\b", "\x00", "a\x00b", " ", "...", "con", "NUL",
    "A", "a", NFC_E, NFD_E, "ß", "SS", "ss", "\ufb00", "．．", "\u2024\u2024", "／", "\u202e",
    "x" * 255, "x" * 256, NFC_E * 128, NFC_E * 127,
]
components = st.one_of(
    st.sampled_from(HOSTILE_COMPONENTS),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6),
)
hostile_paths = st.builds(
    lambda prefix, parts: prefix + "/".join(parts),
    st.sampled_from(["", "", "", "/", "//", "C:", "c:/", "\\\\?\\C:\\", "../"]),
    st.lists(components, min_size=1, max_size=4),
)

# Names a manifest accepts although they look like trouble (see the module docstring).
TRICKY_VALID = ["A", "a", NFC_E, NFD_E, "ß", "SS", "ss", "\ufb00", "．．", "\u2024\u2024", "／", "\u202e", "a:b", "C:",
                " ", "...", "con", "NUL", "x" * 255, NFC_E * 127, "-", "~", "$HOME", "%2e%2e", "..a", "a.."]
tricky_paths = st.builds(
    lambda parts: "/".join(parts), st.lists(st.sampled_from(TRICKY_VALID), min_size=1, max_size=3)
).filter(lambda p: documented_path_ok(p))


@st.composite
def hostile_manifests(draw: st.DrawFn, paths: st.SearchStrategy[str] = hostile_paths) -> tuple[bytes, dict[bytes, bytes]]:
    """(encoding, chunk id -> bytes): a directory manifest of hostile paths and link targets.
    Parents are usually added as directory entries, so that the path rules themselves are
    what is tested; files hold real chunks, so an accepted manifest can be materialized."""
    chunks: dict[bytes, bytes] = {}
    entries: dict[bytes, tuple[int, int, bytes, object]] = {}
    add_parents = draw(st.booleans()) or draw(st.booleans())
    for _ in range(draw(st.integers(1, 6))):
        path = draw(paths)
        kind = draw(st.sampled_from([0, 1, 1, 2]))
        raw = path.encode("utf-8", "surrogatepass")
        if add_parents:
            parts = path.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i]).encode("utf-8", "surrogatepass")
                entries.setdefault(parent, (0, 0, parent, None))
        if kind == 1:
            data = draw(st.binary(max_size=2 * PARAMS.max_size))
            refs = []
            for off in range(0, len(data), PARAMS.max_size):
                piece = data[off : off + PARAMS.max_size]
                chunks[chunk_id(piece)] = piece
                refs.append((chunk_id(piece), len(piece)))
            entries[raw] = (1, draw(st.sampled_from([0, 0, 1])), raw, (len(data), refs))
        elif kind == 2:
            target = draw(st.one_of(paths, st.sampled_from([".", "..", "a", "../..", "a/../..", "x/../../y"])))
            entries[raw] = (2, 0, raw, target.encode("utf-8", "surrogatepass"))
        else:
            entries[raw] = (0, 0, raw, None)
    ordered = [entries[k] for k in sorted(entries)]
    if draw(st.integers(0, 9)) == 0:
        ordered.reverse()
    return encode_manifest(ordered), chunks


@fuzz(200)
@given(case=hostile_manifests())
def test_hostile_paths_are_refused_exactly_as_documented(case: tuple[bytes, dict[str, bytes]]) -> None:
    data, _ = case
    try:
        m = Manifest.decode(data)
    except ManifestError:
        return
    paths = [e.path for e in m.entries]
    kinds = {e.path: e.kind for e in m.entries}
    assert all(documented_path_ok(p) for p in paths), paths
    assert [p.encode() for p in paths] == sorted({p.encode() for p in paths}), "duplicates or disorder"
    for p in paths:
        parent = p.rpartition("/")[0]
        assert not parent or kinds.get(parent) == Kind.DIR, f"{p!r} is not under a directory entry"


@fuzz(150)
@given(case=hostile_manifests())
def test_a_manifest_without_links_that_keeps_every_documented_rule_is_accepted(
    case: tuple[bytes, dict[str, bytes]],
) -> None:
    data, _ = case
    # Re-derive the entries from the bytes with the documented layout.
    count = struct.unpack_from("<I", data, 20)[0]
    pos, paths, kinds = 24, [], {}
    for _ in range(count):
        kind, _, plen = struct.unpack_from("<BBH", data, pos)
        pos += 4
        path = data[pos : pos + plen]
        pos += plen
        if kind == 1:
            _, n = struct.unpack_from("<QI", data, pos)
            pos += 12 + n * RECORD_SIZE
        elif kind == 2:
            return  # links: resolution is checked against the kernel below, not here
        paths.append(path)
        kinds[path] = kind
    try:
        texts = [p.decode("utf-8") for p in paths]
    except UnicodeDecodeError:
        texts = [""]
    assume(all(documented_path_ok(p) for p in texts))
    assume(paths == sorted(set(paths)))
    assume(all(not p.rpartition(b"/")[0] or kinds.get(p.rpartition(b"/")[0]) == 0 for p in paths))
    Manifest.decode(data)


@pytest.mark.parametrize(
    "name",
    [
        b"\xc0\xae",  # overlong "."
        b"\xc0\xae\xc0\xae",  # overlong ".."
        b"\xe0\x80\xae\xe0\x80\xae",  # three-byte overlong ".."
        b"a\xc0\xafb",  # overlong "/": would split into "a" and "b" if decoded leniently
        b"\xc0\x80",  # overlong NUL (modified UTF-8)
        b"\xed\xa0\x80",  # an encoded surrogate
        b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    ],
)
def test_overlong_and_invalid_utf8_spellings_are_refused(name: bytes) -> None:
    for entry in ((0, 0, name, None), (2, 0, b"l", name + b"/x")):
        with pytest.raises(ManifestError):
            Manifest.decode(encode_manifest([entry]))


def test_names_differing_only_in_case_or_normalization_are_distinct_files(tmp_path: Path) -> None:
    """Allowed by decision (see the module docstring): distinct bytes are distinct files on
    Linux, and each gets its own content."""
    names = ["A", "a", NFC_E, NFD_E, "ß", "SS", "ss"]
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "A").touch()
    if (probe / "a").exists():
        pytest.skip("case-insensitive filesystem")
    entries = []
    remote = MemoryChunkStore()
    for i, name in enumerate(names):
        data = f"file {i} {name}".encode()
        remote.put_many([(chunk_id(data), data)])
        entries.append(file_entry(name, [(chunk_id(data), len(data))]))
    m = Manifest.decode(Manifest.build(PARAMS, Kind.DIR, entries).encode())
    assert len(m.entries) == len(names)
    with make_workspace(tmp_path / "state", PARAMS) as ws:
        ws.sync(m, tmp_path / "dest", remote=remote)
    on_disk = {os.fsencode(n): (tmp_path / "dest" / n).read_bytes() for n in os.listdir(tmp_path / "dest")}
    assert on_disk == {n.encode(): f"file {i} {n}".encode() for i, n in enumerate(names)}


@fuzz(30)
@given(case=st.one_of(hostile_manifests(tricky_paths), hostile_manifests()), hostile_dest=st.lists(st.tuples(st.integers(0, 50), st.sampled_from(["dirlink", "filelink", "file", "dir"])), max_size=4))
def test_materializing_an_accepted_hostile_manifest_writes_only_inside_the_root(
    case: tuple[bytes, dict[str, bytes]], hostile_dest: list[tuple[int, str]],
) -> None:
    """Whatever the receiver's folder held before (links to the outside at the very names the
    manifest uses, files where it wants folders), a sync writes nothing outside it, and
    leaves it equal to the manifest with every link resolving inside."""
    data, chunks = case
    m = refused_or(lambda: Manifest.decode(data))
    assume(isinstance(m, Manifest))
    assert isinstance(m, Manifest)
    # Materialized only if the rules hold by an independent check too: were the decoder ever
    # to accept an unsafe path, the properties above fail, and this one must not act on it.
    kinds = {e.path: e.kind for e in m.entries}
    assume(all(documented_path_ok(e.path) and kinds.get(e.path.rpartition("/")[0], Kind.DIR) == Kind.DIR for e in m.entries))
    with tempfile.TemporaryDirectory() as tmp:
        box = Path(tmp)
        top = box.joinpath(*(f"l{i}" for i in range(SANDBOX_DEPTH)))
        outside = top / "outside"
        (outside / "sub").mkdir(parents=True)
        (outside / "victim.txt").write_bytes(b"must not change")
        dest = top / "dest"
        dest.mkdir()
        state = top / "state"
        paths = [e.path for e in m.entries]
        for i, how in hostile_dest:
            if not paths:
                break
            p = dest / paths[i % len(paths)]
            try:
                if os.path.lexists(p) or not inside(dest, p.parent):
                    continue
                p.parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if how == "dirlink":
                os.symlink(outside, p)
            elif how == "filelink":
                os.symlink(outside / "victim.txt", p)
            elif how == "file":
                p.write_bytes(b"old")
            else:
                p.mkdir()
        before = fingerprint(box, (dest, state))
        remote = MemoryChunkStore()
        remote.put_many(chunks.items())
        with make_workspace(state, PARAMS) as ws:
            ws.sync(m, dest, remote=remote)
        assert fingerprint(box, (dest, state)) == before
        for e in m.entries:
            p = dest / e.path
            st_ = os.lstat(p)
            if e.kind == Kind.DIR:
                assert stat.S_ISDIR(st_.st_mode)
            elif e.kind == Kind.FILE:
                assert stat.S_ISREG(st_.st_mode)
                assert p.read_bytes() == b"".join(chunks[cid] for cid, _ in e.chunk_refs())
            else:
                assert os.readlink(p) == e.target
                assert inside(dest, p), f"{e.path} -> {e.target} leaves the root"
        assert len(fingerprint(dest, ())) == len(m.entries)


def test_a_deep_accepted_path_longer_than_path_max_under_the_root_fails_before_commit(tmp_path: Path) -> None:
    """A path of 4096 bytes is valid in a manifest, but with the receiver's folder in front it
    exceeds the kernel's PATH_MAX: the sync must fail with MaterializeError and leave the
    receiver (and its next sync) untouched, not commit a journal that can never be applied."""
    name = "d" * 200
    depth = 20  # 20 x 201 bytes: a valid path, that no folder other than "/" could hold
    entries = [Entry("/".join([name] * i), Kind.DIR) for i in range(1, depth + 1)]
    data = b"deep"
    leaf = "/".join([name] * depth) + "/" + "f" * 70  # 4090 bytes: over PATH_MAX under any folder
    entries.append(file_entry(leaf, [(chunk_id(data), len(data))]))
    m = Manifest.build(PARAMS, Kind.DIR, entries)
    remote = MemoryChunkStore()
    remote.put_many([(chunk_id(data), data)])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_bytes(b"keep")
    with make_workspace(tmp_path / "state", PARAMS) as ws:
        with pytest.raises(MaterializeError, match="too long") as e:
            ws.sync(m, dest, remote=remote)
        assert e.value.errno == errno.ENAMETOOLONG
        assert fingerprint(dest, ()) == {"keep.txt": ("file", 0o644, b"keep")}
        ws.recover()  # nothing committed that cannot be applied


@fuzz(60)
@given(raw_count=st.integers(0, 2**32 - 1), nchunks=st.integers(0, 2**32 - 1), plen=st.integers(0, 2**16 - 1),
       tlen=st.integers(0, 2**16 - 1), size=st.integers(0, 2**64 - 1))
def test_huge_declared_counts_and_lengths_are_refused_without_allocating(
    raw_count: int, nchunks: int, plen: int, tlen: int, size: int,
) -> None:
    body = (
        struct.pack("<BBH", 1, 0, 1) + b"f" + struct.pack("<QI", size, nchunks) + bytes(RECORD_SIZE)
        + struct.pack("<BBH", 2, 0, plen) + b"l" + struct.pack("<H", tlen) + b"t"
    )
    data = struct.pack("<4sHBIIIBI", b"CASM", 1, 1, PARAMS.min_size, PARAMS.avg_size, PARAMS.max_size, 0, raw_count) + body
    assert peak_bytes(lambda: refused_or(lambda: Manifest.decode(data))) < ALLOC_BOUND



# == chunk payloads, frames and deltas =============================================================
def forged_zstd(declared: int, plain: bytes = b"a" * 100) -> bytes:
    """A zstd frame whose header declares ``declared`` plain bytes but holds ``plain``."""
    w = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=declared)
    return w.compress(plain) + w.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


@pytest.mark.parametrize("declared", [2**34, 2**40, 2**63])
def test_a_zstd_frame_declaring_a_huge_size_is_refused_without_allocating_it(declared: int) -> None:
    frame = forged_zstd(declared)

    def decode() -> None:
        with pytest.raises(ChunkCorruptError):
            decompress(CODEC_ZSTD, frame, 100, "ab" * 32)

    assert peak_bytes(decode) < ALLOC_BOUND


@fuzz(300)
@given(codec=st.integers(0, 255), payload=st.binary(max_size=600), raw=st.integers(0, 4 * KiB))
def test_decompress_yields_exactly_raw_bytes_or_chunk_corrupt(codec: int, payload: bytes, raw: int) -> None:
    got = refused_or(lambda: decompress(codec, payload, raw, "00"))
    assert got is None or len(got) == raw  # type: ignore[arg-type]


@fuzz(300)
@given(payload=st.binary(max_size=3 * 4096), base=st.binary(max_size=4 * 4096), length=st.integers(0, 5 * 4096),
       block=st.sampled_from([4096, 8192]))
def test_delta_apply_yields_length_bytes_or_a_project_error(payload: bytes, base: bytes, length: int, block: int) -> None:
    got = refused_or(lambda: delta.apply(payload, base, length, block))
    assert got is None or len(got) == length  # type: ignore[arg-type]


@fuzz(100)
@given(size=st.integers(16 * KiB, 40 * KiB), edit=st.integers(0, 40 * KiB), seed=st.integers(0, 2**16), data=st.data())
def test_a_damaged_delta_never_rebuilds_bytes_of_the_wrong_length(size: int, edit: int, seed: int, data: st.DataObject) -> None:
    base = random.Random(seed).randbytes(size)
    new = bytearray(base)
    new[edit % size] ^= 0xFF  # one changed block: the delta pays
    new = bytes(new)
    enc = delta.encode(new, delta.block_digests(base, 4096), 4096)
    assume(enc is not None)
    assert enc is not None and delta.apply(enc, base, size, 4096) == new
    bad = data.draw(damaged(enc))
    got = refused_or(lambda: delta.apply(bad, base, size, 4096))
    assert got is None or len(got) == size  # type: ignore[arg-type]


# -- OriginSource._decode: what a consumer makes of an origin's answer bytes ---------------------------
@pytest.fixture(scope="module")
def wire() -> Iterator[tuple[OriginSource, list[bytes], dict[bytes, bytes], dict[bytes, tuple[str, int]]]]:
    """An OriginSource over a manifest of a few real chunks, some with a base file for deltas.
    ``_decode`` is called directly with answer bodies: no socket is needed to decode."""
    with tempfile.TemporaryDirectory() as tmp:
        datas = [os.urandom(3000), b"z" * 4000, os.urandom(17), (b"abc" * 1400)[:4096]]
        refs = [(chunk_id(d), len(d)) for d in datas]
        m = Manifest.build(PARAMS, Kind.DIR, [file_entry("f", refs)])
        base_path = os.path.join(tmp, "base")
        with open(base_path, "wb") as f:
            f.write(b"".join(datas[:2]))
        bases = {refs[0][0]: (base_path, 0), refs[1][0]: (base_path, 3000)}
        client = OriginClient("root.origin", "http://127.0.0.1:9", "secret", 5)
        yield OriginSource(client, m), [c for c, _ in refs], dict(zip([c for c, _ in refs], datas)), bases


def frame(status: int, cid: bytes, plain: bytes, zstd: bool = False) -> bytes:
    payload = zstandard.ZstdCompressor(level=1).compress(plain) if zstd else plain
    return FRAME.pack(status, CODEC_ZSTD if zstd else CODEC_RAW, cid, len(plain), len(payload)) + payload


def decode_answer(src: OriginSource, ids: list[bytes], body: bytes, bases: dict[bytes, tuple[str, int]]) -> list[tuple[bytes, bytes]] | None:
    retry: list[bytes] = []
    got = refused_or(lambda: [(c, bytes(d)) for c, d in src._decode(ids, body, bases, retry)])
    for cid, d in got or []:  # type: ignore[union-attr]
        assert chunk_id(d) == cid, "a chunk was delivered that does not verify"
    return got  # type: ignore[return-value]


@fuzz(200)
@given(body=st.binary(max_size=400), with_bases=st.booleans())
def test_random_answer_bytes_decode_to_verified_chunks_or_a_project_error(wire, body: bytes, with_bases: bool) -> None:  # type: ignore[no-untyped-def]
    src, ids, _, bases = wire
    decode_answer(src, ids, body, bases if with_bases else {})


@fuzz(200)
@given(data=st.data(), zstd=st.booleans())
def test_a_damaged_valid_answer_decodes_to_verified_chunks_or_a_project_error(wire, data: st.DataObject, zstd: bool) -> None:  # type: ignore[no-untyped-def]
    src, ids, datas, bases = wire
    valid = b"".join(frame(STATUS_OK, cid, datas[cid], zstd) for cid in ids)
    assert decode_answer(src, ids, valid, bases) is not None
    decode_answer(src, ids, data.draw(damaged(valid)), bases)


@fuzz(150)
@given(status=st.integers(0, 255), codec=st.integers(0, 3), which=st.integers(0, 3),
       raw=st.one_of(st.integers(0, 9000), st.just(2**32 - 1)), stored=st.one_of(st.integers(0, 600), st.just(2**32 - 1)),
       payload=st.binary(max_size=600))
def test_frames_with_forged_fields_decode_to_verified_chunks_or_a_project_error(  # type: ignore[no-untyped-def]
    wire, status: int, codec: int, which: int, raw: int, stored: int, payload: bytes,
) -> None:
    src, ids, _, bases = wire
    body = FRAME.pack(status, codec, ids[which], raw, stored) + payload
    decode_answer(src, [ids[which]], body, bases)


def test_a_frame_with_a_zstd_bomb_header_is_refused_without_allocating(wire) -> None:  # type: ignore[no-untyped-def]
    src, ids, datas, bases = wire
    cid = ids[1]
    bomb = forged_zstd(2**40, datas[cid])
    body = FRAME.pack(STATUS_OK, CODEC_ZSTD, cid, len(datas[cid]), len(bomb)) + bomb
    assert peak_bytes(lambda: decode_answer(src, [cid], body, bases)) < ALLOC_BOUND
    assert decode_answer(src, [cid], body, bases) is None


def test_a_delta_frame_shorter_than_its_bitmap_is_fetched_whole_not_a_crash(wire) -> None:  # type: ignore[no-untyped-def]
    src, ids, _, bases = wire
    cid = ids[0]
    retry: list[bytes] = []
    body = FRAME.pack(STATUS_DELTA, CODEC_RAW, cid, 0, 0)  # an empty delta of a 3000-byte chunk
    assert list(src._decode([cid], body, bases, retry)) == []
    assert retry == [cid]


def test_a_delta_declaring_a_huge_chunk_is_refused_without_allocating() -> None:
    def apply() -> None:
        with pytest.raises(ChunkCorruptError):
            delta.apply(b"\xff" * 64, b"base", 2**40)

    assert peak_bytes(apply) < ALLOC_BOUND


# -- a consumer against a hostile origin, over a real socket ---------------------------------------------
@pytest.fixture(scope="module")
def hostile_origin() -> Iterator[tuple[FakeOrigin, list[Callable[[str, str, bytes], Iterator[bytes]]]]]:
    """A fake origin whose answer the test sets: ``answers[0]`` is called per request."""
    answers: list[Callable[[str, str, bytes], Iterator[bytes]]] = [lambda m, t, b: iter([http_answer(404, b"")])]
    server = FakeOrigin(lambda method, target, body: answers[0](method, target, body))
    yield server, answers
    server.close()
    io_loop().run(close_sessions(), timeout=10)


def test_an_answer_longer_than_what_was_asked_is_refused_before_it_is_held(hostile_origin) -> None:  # type: ignore[no-untyped-def]
    """An origin that streams a 1 GiB answer to a request for 100 KiB of chunks: the consumer
    stops reading at what the frames could hold, and raises OriginError."""
    server, answers = hostile_origin
    datas = [os.urandom(4 * KiB) for _ in range(25)]
    m = Manifest.build(PARAMS, Kind.DIR, [file_entry("f", [(chunk_id(d), len(d)) for d in datas])])

    def endless(method: str, target: str, body: bytes) -> Iterator[bytes]:
        yield b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n"
        for _ in range(1024):
            yield bytes(1 * MiB)

    answers[0] = endless
    src = OriginSource(OriginClient("root.evil", server.url, "s", 10), m)
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            list(src.get_many(sorted(m.chunk_ids())))
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    assert peak_bytes(fetch) < ALLOC_BOUND
    assert len(errors) == 1 and isinstance(errors[0], OriginError), errors


@fuzz(80)
@given(status=st.sampled_from([200, 200, 200, 404, 409, 500, 401]), body=st.one_of(
    st.binary(max_size=64),
    st.just(b"[" * 100_000),
    st.sampled_from([b'{"exists": true}', b'{"exists": 1}', b'{"exists": "yes"}', b"[]", b'{"nope": 1}', b"null", b"\xff\xfe"]),
))
def test_any_exists_answer_is_a_bool_or_a_pathapi_error(hostile_origin, status: int, body: bytes) -> None:  # type: ignore[no-untyped-def]
    server, answers = hostile_origin
    answers[0] = lambda m, t, b: iter([http_answer(status, body)])
    got = refused_or(lambda: OriginClient("root.evil", server.url, "s", 10).exists("x"))
    assert got is None or (status == 200 and got is (body == b'{"exists": true}'))


@fuzz(80)
@given(data=st.data(), header=st.sampled_from(["right", "wrong", "none"]))
def test_any_manifest_answer_is_the_manifest_it_names_or_a_project_error(hostile_origin, data: st.DataObject, header: str) -> None:  # type: ignore[no-untyped-def]
    server, answers = hostile_origin
    valid = Manifest.build(PARAMS, Kind.DIR, [Entry("d", Kind.DIR), file_entry("d/f", [(bytes(32), 10)])]).encode()
    body = data.draw(st.one_of(st.binary(max_size=100), damaged(valid)))
    headers = {"right": {HEADER_MANIFEST_ID: blake3_hex(body)}, "wrong": {HEADER_MANIFEST_ID: "00" * 32}, "none": {}}[header]
    answers[0] = lambda m, t, b: iter([http_answer(200, body, headers)])
    got = refused_or(lambda: OriginClient("root.evil", server.url, "s", 10).manifest("x"))
    if got is not None:
        assert isinstance(got, Manifest) and got.encode() == body and header == "right"


def blake3_hex(data: bytes) -> str:
    import blake3

    return blake3.blake3(data).hexdigest()


# == local chunk store: index entries, pack records, FORMAT ========================================
def _index_env(root: Path) -> lmdb.Environment:
    return lmdb.open(str(root / "index"), subdir=True, max_dbs=1, map_size=1 << 30)


@pytest.fixture(scope="module")
def stored_chunk() -> Iterator[tuple[Path, bytes, bytes, bytes]]:
    """A closed local store holding one chunk: (root, id, data, its index entry)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        data = os.urandom(1000) + b"q" * 3000
        cid = chunk_id(data)
        s = LocalChunkStore(root)
        s.put_many([(cid, data)])
        s.close()
        env = _index_env(root)
        with env.begin(db=env.open_db(b"chunks")) as txn:
            loc = bytes(txn.get(cid))
        env.close()
        yield root, cid, data, loc


def _with_index_entry(root: Path, cid: bytes, value: bytes) -> None:
    env = _index_env(root)
    with env.begin(write=True, db=env.open_db(b"chunks")) as txn:
        txn.put(cid, value)
    env.close()


def _read_one(root: Path, cid: bytes) -> bytes | None:
    s = LocalChunkStore(root)
    try:
        return refused_or(lambda: b"".join(bytes(d) for _, d in s.get_many([cid])))  # type: ignore[return-value]
    finally:
        s.close()


@fuzz(60)
@given(value=st.one_of(
    st.binary(max_size=40),
    st.builds(INDEX.pack, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1), st.integers(0, 255)),
))
def test_any_index_entry_reads_as_the_verified_chunk_or_a_project_error(stored_chunk, value: bytes) -> None:  # type: ignore[no-untyped-def]
    root, cid, data, loc = stored_chunk
    try:
        _with_index_entry(root, cid, value)
        got = _read_one(root, cid)
        assert got is None or got == data
    finally:
        _with_index_entry(root, cid, loc)


@pytest.mark.parametrize("field", ["offset", "stored", "raw"])
def test_an_index_entry_declaring_huge_lengths_is_refused_without_allocating(stored_chunk, field: str) -> None:  # type: ignore[no-untyped-def]
    root, cid, _, loc = stored_chunk
    pack_id, offset, stored, raw, codec = INDEX.unpack(loc)
    forged = {"offset": (2**63 + 5, stored, raw), "stored": (offset, 2**32 - 1, raw), "raw": (offset, stored, 2**32 - 1)}[field]
    try:
        _with_index_entry(root, cid, INDEX.pack(pack_id, *forged, codec))
        assert peak_bytes(lambda: _read_one(root, cid)) < ALLOC_BOUND
        assert _read_one(root, cid) is None
    finally:
        _with_index_entry(root, cid, loc)


@fuzz(40)
@given(data=st.data())
def test_a_damaged_pack_record_reads_as_the_chunk_or_a_project_error(stored_chunk, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    root, cid, chunk, loc = stored_chunk
    pack_id, offset, stored, _, _ = INDEX.unpack(loc)
    pack = root / "packs" / f"{pack_id:016x}.pack"
    original = pack.read_bytes()
    record = original[offset : offset + RECORD.size + stored]
    bad = data.draw(damaged(record))
    try:
        pack.write_bytes(original[:offset] + bad + original[offset + len(record) :])
        got = _read_one(root, cid)
        assert got is None or got == chunk
    finally:
        pack.write_bytes(original)


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8\n", b"cas-chunkstore 1\n\x00", b"", b"cas-chunkstore 2\n"])
def test_a_format_file_that_is_not_ours_is_refused_with_a_store_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "FORMAT").write_bytes(content)
    with pytest.raises((StoreError, UnsupportedVersionError)):
        LocalChunkStore(tmp_path / "s")


# == ref files =====================================================================================
@fuzz(80)
@given(data=st.data())
def test_a_damaged_ref_file_reads_as_its_value_or_a_store_error(tmp_path: Path, data: st.DataObject) -> None:
    refs = LocalRefStore(tmp_path / "refs")
    name, value = "root.train/ckpt", b"manifest bytes"
    valid = encode_ref(name, value)
    raw = data.draw(st.one_of(st.binary(max_size=80), damaged(valid)))
    refs._file(name).write_bytes(raw)
    # A ref carries a checksum: any change is refused, never a silently different value.
    assert refused_or(lambda: refs.get(name)) == (value if raw == valid else None)
    assert refused_or(lambda: list(refs.names())) == ([name] if raw == valid else None)


@fuzz(60)
@given(n=st.integers(0, 2**32 - 1), value=st.binary(max_size=16))
def test_a_ref_file_declaring_a_huge_name_length_is_refused_without_allocating(tmp_path: Path, n: int, value: bytes) -> None:
    refs = LocalRefStore(tmp_path / "refs")
    raw = bytearray(encode_ref("x", value))
    raw[6:10] = struct.pack("<I", n)
    refs._file("x").write_bytes(bytes(raw))
    assert peak_bytes(lambda: refused_or(lambda: refs.get("x"))) < ALLOC_BOUND
    assert refused_or(lambda: refs.get("x")) == (value if n == 1 else None)


def test_a_folder_in_place_of_a_ref_file_is_a_store_error(tmp_path: Path) -> None:
    refs = LocalRefStore(tmp_path / "refs")
    refs.put("a", b"1")
    refs._file("b").mkdir()
    with pytest.raises(StoreError):
        refs.get("b")
    with pytest.raises(StoreError):  # listing never skips what it cannot read
        list(refs.names())


# == materialize journal and resume files ============================================================
# Journal operations are replayed for real. A regression that let one act outside its
# destination must reach nothing but this test's own folder (an earlier draft of these tests,
# run against the unfixed code, emptied /tmp): the destination sits SANDBOX_DEPTH folders deep
# in a temporary folder, deeper than any ".." the strategies make (5 at most), and every
# absolute path they make is moved under that folder before it is written into a journal.
SANDBOX_DEPTH = 8

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
    | st.sampled_from(["", "..", "/etc", "../x", "a/../../x", "00000000"]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
OP_NAMES = st.sampled_from(["rm", "mkdir", "place", "patch", "link", "chmod", "dirmode", "x"])
hostile_ops = st.lists(
    st.one_of(
        st.tuples(OP_NAMES).map(list),
        st.builds(lambda op, rest: [op, *rest], OP_NAMES, st.lists(st.one_of(hostile_paths, JSON), max_size=5)),
        JSON,
    ),
    max_size=6,
)


@contextmanager
def journal_rig() -> Iterator[tuple[Path, Path, Path]]:
    """(sandbox, destination, state folder): a destination holding ``d/f`` and ``out``, a
    link to a folder outside it; a transaction with one staged file and a data file."""
    with tempfile.TemporaryDirectory() as tmp:
        box = Path(tmp)
        top = box.joinpath(*(f"l{i}" for i in range(SANDBOX_DEPTH)))
        dest, state, outside = top / "dest", top / "state", top / "outside"
        (dest / "d").mkdir(parents=True)
        (dest / "d" / "f").write_bytes(b"0123456789")
        outside.mkdir()
        (outside / "victim.txt").write_bytes(b"must not change")
        os.symlink(outside, dest / "out")
        (state / "txn" / "stage").mkdir(parents=True)
        (state / "txn" / "stage" / "00000000").write_bytes(b"staged")
        (state / "txn" / "data").write_bytes(b"patchdata" * 10)
        yield box, dest, state


def confined(value: object, box: Path) -> object:
    """``value`` with every string that starts with "/" moved under ``box``."""
    if isinstance(value, str):
        return f"{box}{value}" if value.startswith("/") else value
    if isinstance(value, list):
        return [confined(v, box) for v in value]
    if isinstance(value, dict):
        return {k: confined(v, box) for k, v in value.items()}
    return value


def write_journal(state: Path, box: Path, journal: object) -> None:
    """Write ``journal`` with its operations (not its destination) confined to ``box``."""
    if isinstance(journal, dict) and "dest" in journal:
        journal = {**confined(journal, box), "dest": journal["dest"]}  # type: ignore[dict-item]
    else:
        journal = confined(journal, box)
    (state / "txn" / "ops").write_text(json.dumps(journal))


def _recover_refused_or_done(state: Path) -> None:
    with locked(state):
        refused_or(lambda: recover(state))


@fuzz(40)
@given(body=st.one_of(
    st.binary(max_size=200).filter(lambda b: b"/" not in b),
    st.just(b"[" * 100_000),
    st.just(b'{"a":' * 100_000),
    JSON,
    st.builds(lambda j: {"format": "cas-journal", "version": 2, "dest": "DEST", "ops": j}, JSON),
))
def test_a_garbage_journal_is_refused_with_a_project_error(body: bytes | object) -> None:
    with journal_rig() as (box, dest, state):
        if isinstance(body, bytes):
            (state / "txn" / "ops").write_bytes(body)
        else:
            write_journal(state, box, body)
            (state / "txn" / "ops").write_text((state / "txn" / "ops").read_text().replace('"DEST"', json.dumps(str(dest))))
        before = fingerprint(box, (dest, state))
        _recover_refused_or_done(state)
        assert fingerprint(box, (dest, state)) == before


@fuzz(50)
@given(ops=hostile_ops)
def test_journal_operations_never_touch_anything_outside_the_destination(ops: list[object]) -> None:
    with journal_rig() as (box, dest, state):
        write_journal(state, box, {"format": "cas-journal", "version": 2, "dest": str(dest), "ops": ops})
        before = fingerprint(box, (dest, state))
        _recover_refused_or_done(state)
        assert fingerprint(box, (dest, state)) == before


@pytest.mark.parametrize("ops", [
    [["rm", "../outside/victim.txt"]],
    [["mkdir", "../escaped"]],
    [["place", "../../../outside/victim.txt", "x"]],  # a stage name that climbs out of txn/stage
    [["place", "/victim.txt", "x"]],  # an absolute stage name (moved under the sandbox)
    [["place", "00000000", "../outside/new"]],
    [["link", "../outside/l", "x"]],
    [["link", "l", "/victim.txt"]],
    [["rm", "/victim.txt"]],
    [["rm", "a//b"]],
    [["rm", "./d"]],
    [["rm", "d/\x00"]],
    [["patch", "d/f", 5, False, [[0, 0, 2**62]]]],  # a range that would size a 4 EiB read
    [["patch", "d/f", 2**70, False, []]],
    [["patch", "d/f", -1, False, []]],
    [["patch", "d/f", True, False, []]],
    [["chmod", "d/f", "yes"]],
    [["chmod", "d/f", 0o4755]],  # setuid: never granted
    [["dirmode", "d", 0o1777]],  # sticky
    [["dirmode", "../outside", 0o755]],
    [["patch", "d/f", 5, 0o2644, []]],  # setgid
    [["rm", ["d"]]],
    [[]],
    [["rm"]],
    [["unknown", "d"]],
    [{"rm": "d"}],
])
def test_invalid_journal_operations_are_refused_before_any_is_applied(ops: list[object]) -> None:
    with journal_rig() as (box, dest, state):
        (box / "victim.txt").write_bytes(b"must not change")
        write_journal(state, box, {"format": "cas-journal", "version": 2, "dest": str(dest), "ops": [["rm", "d/f"], *ops]})
        before = fingerprint(box, (state,))
        with locked(state):
            assert recover(state) is False  # abandoned, not replayed: it blocks no later sync
        assert fingerprint(box, (state,)) == before  # not even the valid first operation ran
        assert not (state / "txn" / "ops").exists()


def test_a_journal_removing_names_no_manifest_holds_is_replayed() -> None:
    """A sync removes what the receiver held that a manifest cannot name (``C:x``, ``a\\b``
    are plain names on Linux): a journal doing so after a crash is valid, and replayed."""
    with journal_rig() as (box, dest, state):
        for name in ("C:x", "a\\b", "..\\x"):
            (dest / name).write_bytes(b"foreign")
        write_journal(state, box, {"format": "cas-journal", "version": 2, "dest": str(dest),
                                   "ops": [["rm", "C:x"], ["rm", "a\\b"], ["rm", "..\\x"]]})
        with locked(state):
            assert recover(state) is True
        assert sorted(os.listdir(dest)) == ["d", "out"]


@pytest.mark.parametrize("ops", [
    [["rm", "out/victim.txt"]],
    [["chmod", "out/victim.txt", 0o755]],
    [["patch", "out/victim.txt", 1, False, [[0, 0, 1]]]],
    [["place", "00000000", "out/victim.txt"]],
    [["link", "out/l", "x"]],
    [["mkdir", "out/sub"]],
])
def test_journal_operations_through_a_link_to_the_outside_never_reach_it(ops: list[object]) -> None:
    """``out`` is a link inside the destination to a folder outside: an operation under it
    replaces the link by a real folder (or does nothing), never acts through it."""
    with journal_rig() as (box, dest, state):
        write_journal(state, box, {"format": "cas-journal", "version": 2, "dest": str(dest), "ops": ops})
        before = fingerprint(box, (dest, state))
        _recover_refused_or_done(state)
        assert fingerprint(box, (dest, state)) == before


@pytest.mark.parametrize("dest", ["relative/dest", "/a/../b", "", "/x\x00y", None, 7])
def test_a_journal_whose_destination_is_not_a_normal_absolute_path_is_refused(dest: object) -> None:
    with journal_rig() as (box, _, state):
        dest = confined(dest, box)
        write_journal(state, box, {"format": "cas-journal", "version": 2, "dest": dest, "ops": [["rm", "no-such-entry-7f3a"]]})
        before = fingerprint(box, (state,))
        with locked(state):
            assert recover(state) is False  # abandoned, not replayed
        assert fingerprint(box, (state,)) == before
        assert not (state / "txn" / "ops").exists()


@pytest.fixture(scope="module")
def resume_rig() -> Iterator[tuple[Manifest, MemoryChunkStore]]:
    datas = [os.urandom(3000), os.urandom(PARAMS.max_size)]
    refs = [(chunk_id(d), len(d)) for d in datas]
    remote = MemoryChunkStore()
    remote.put_many([(chunk_id(d), d) for d in datas])
    yield Manifest.build(PARAMS, Kind.DIR, [file_entry("a", refs[:1]), file_entry("b", refs[1:])]), remote


def sync_despite_resume(m: Manifest, remote: MemoryChunkStore, index: bytes, target: bytes | None, stage_kind: str,
                        stage: str = "00000000") -> None:
    """A sync with ``resume/`` left as given must finish (not hang, not fail), exactly."""
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        resume = top / "state" / "resume"
        (resume / "stage").mkdir(parents=True)
        (resume / "resume.json").write_bytes(index)
        (resume / "target").write_bytes(m.encode() if target is None else target)
        staged = resume / "stage" / stage
        if stage_kind == "file":
            staged.write_bytes(os.urandom(3000))
        elif stage_kind == "dir":
            staged.mkdir()
        elif stage_kind == "fifo":
            os.mkfifo(staged)  # opening it for reading would block until a writer comes
        elif stage_kind == "link":
            os.symlink("/dev/zero", staged)
        done: list[object] = []

        def sync() -> None:
            with make_workspace(top / "state", PARAMS) as ws:
                done.append(ws.sync(m, top / "dest", remote=remote))

        t = threading.Thread(target=sync, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "the sync hung on the resume folder"
        assert done, "the sync failed because of the resume folder"
        assert (top / "dest" / "a").read_bytes() + (top / "dest" / "b").read_bytes() == b"".join(
            d for _, d in remote.get_many([cid for e in m.files() for cid, _ in e.chunk_refs()])
        )


@fuzz(25)
@given(index=st.one_of(
    st.binary(max_size=100),
    st.just(b"[" * 100_000),
    JSON.map(lambda j: json.dumps(j).encode()),
    st.builds(lambda s: json.dumps({"format": "cas-resume", "version": 2, "stages": s}).encode(), JSON),
    st.builds(lambda k, v: json.dumps({"format": "cas-resume", "version": 2, "stages": {k: v}}).encode(),
              st.sampled_from(["..", ".", "", "00000000", "../../outside", "/etc/passwd"]), st.sampled_from(["a", "b", "", ".."])),
), target=st.one_of(st.binary(max_size=64), st.just(None)), stage_kind=st.sampled_from(["file", "dir", "fifo", "link", "none"]))
def test_a_resume_folder_of_any_content_never_stops_a_sync(  # type: ignore[no-untyped-def]
    resume_rig, index: bytes, target: bytes | None, stage_kind: str,
) -> None:
    sync_despite_resume(*resume_rig, index, target, stage_kind)


@pytest.mark.parametrize("stage,kind", [("00000000", "fifo"), ("00000000", "dir"), ("..", "file"), (".", "file")])
def test_a_resume_entry_that_is_not_a_staged_file_is_never_opened(resume_rig, stage: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    index = json.dumps({"format": "cas-resume", "version": 2, "stages": {stage: "a"}}).encode()
    sync_despite_resume(*resume_rig, index, None, kind, stage="00000000" if stage in ("..", ".") else stage)


# == stat cache records ================================================================================
@pytest.fixture(scope="module")
def cached_tree() -> Iterator[tuple[Path, Manifest, bytes, bytes]]:
    """A tree of one file whose stat signature is in the workspace's stat cache:
    (top, its manifest, the cache key, the cached value)."""
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        f = top / "tree" / "f.bin"
        f.parent.mkdir()
        f.write_bytes(os.urandom(20 * KiB))
        old = 1_000_000_000_000_012_345  # long ago, and not a whole second (a fine-grained clock)
        os.utime(f, ns=(old, old))
        deadline = time.monotonic() + 30
        while True:  # ctime moved with utime: wait until it is no longer "racy"
            time.sleep(0.15)
            with make_workspace(top / "state", PARAMS) as ws:
                fresh = ws.snapshot(top / "tree")
            env = _statcache_env(top)
            with env.begin() as txn:
                entries = [(bytes(k), bytes(v)) for k, v in txn.cursor() if not bytes(k).startswith(b"\x00")]
            env.close()
            if entries or time.monotonic() > deadline:
                break
        assert len(entries) == 1, "the file was not cached"
        yield top, fresh, *entries[0]


def _statcache_env(top: Path) -> lmdb.Environment:
    return lmdb.open(str(top / "state" / "statcache"), subdir=True, max_dbs=0, map_size=1 << 30)


@fuzz(40)
@given(how=st.sampled_from(["random", "truncate", "extend", "length", "zero_length", "empty"]), data=st.data())
def test_a_corrupt_stat_cache_record_is_a_miss_never_a_wrong_or_failed_snapshot(  # type: ignore[no-untyped-def]
    cached_tree, how: str, data: st.DataObject,
) -> None:
    top, fresh, key, value = cached_tree
    sig, chunks = value[:40], value[40:]
    if how == "random":
        chunks = data.draw(st.binary(max_size=200))
    elif how == "truncate":
        chunks = chunks[: data.draw(st.integers(0, len(chunks) - 1))]
    elif how == "extend":
        chunks += data.draw(st.binary(min_size=1, max_size=RECORD_SIZE * 2))
    elif how in ("length", "zero_length"):
        i = data.draw(st.integers(0, len(chunks) // RECORD_SIZE - 1)) * RECORD_SIZE + ID_SIZE
        n = 0 if how == "zero_length" else data.draw(st.integers(0, 2**32 - 1))
        assume(chunks[i : i + 4] != struct.pack("<I", n))
        chunks = chunks[:i] + struct.pack("<I", n) + chunks[i + 4 :]
    else:
        chunks = b""
    env = _statcache_env(top)
    with env.begin(write=True) as txn:
        txn.put(key, sig + chunks)
    env.close()
    try:
        with make_workspace(top / "state", PARAMS) as ws:
            assert ws.snapshot(top / "tree") == fresh
    finally:
        env = _statcache_env(top)
        with env.begin(write=True) as txn:
            txn.put(key, value)
        env.close()


@pytest.mark.parametrize("lengths,hit", [([], False), ([100], True), ([33, 33, 33], False), ([50, 60], False),
                                         ([0, 100], False), ([100, 0], False), ([PARAMS.max_size + 1], False)])
def test_stat_cache_lookup_checks_the_record_against_the_file(tmp_path: Path, lengths: list[int], hit: bool) -> None:
    from cas.statcache import StatCache

    f = tmp_path / "f"
    f.write_bytes(b"x" * (PARAMS.max_size + 1 if lengths == [PARAMS.max_size + 1] else 100))
    old = os.stat(f).st_mtime_ns - 10**10 + 1
    os.utime(f, ns=(old, old))
    st_ = os.stat(f)
    with StatCache(tmp_path / "cache") as cache:
        cache.put(PARAMS, str(f), st_, pack_chunks([(bytes([i]) * 32, n) for i, n in enumerate(lengths)]), renamed=True)
        cache.flush()
        assert (cache.get(PARAMS, str(f), st_) is not None) == hit
        cache.put(PARAMS, str(f), st_, pack_chunks([(bytes(32), 100)]) + b"\x01", renamed=True)  # not whole records
        cache.flush()
        assert cache.get(PARAMS, str(f), st_) is None
