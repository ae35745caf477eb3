"""Manifests: canonical encoding, and refusal of every malformed or unsafe one.

Hand-made encodings are built by :func:`raw`, written from ``docs/format.md`` (not from
``cas.manifest``), so that the decoder is checked against the format as documented. Where a
test claims that a link leaves the root (or stays inside), the claim is first checked against
the kernel: the tree is laid out on disk and the link resolved with ``os.path.realpath``.
"""

from __future__ import annotations

import os
import random
import struct
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cas.chunking import RECORD_SIZE, ChunkerParams, KiB, MiB, pack_chunks
from cas.errors import ManifestError, UnsafePathError, UnsupportedVersionError
from cas.hashing import ID_SIZE, chunk_id
from cas.manifest import MAX_SYMLINK_HOPS, Entry, Kind, Manifest, file_entry
from cas.manifest import VERSION as MANIFEST_VERSION

PARAMS = ChunkerParams()
SMALL = ChunkerParams(min_size=256, avg_size=1 * KiB, max_size=4 * KiB)


# -- a second, independent encoder (docs/format.md, "Manifest (version 1)") ---------------
@dataclass(frozen=True)
class Raw:
    """One entry as the format lays it out; ``chunks`` are (id, length) records."""

    path: str | bytes
    kind: int = 0
    flags: int = 0
    size: int | None = None  # files: defaults to the sum of the chunk lengths
    chunks: tuple[tuple[bytes, int], ...] = ()
    nchunks: int | None = None  # files: a forged record count
    target: str | bytes = ""


def _b(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


def raw(
    entries: list[Raw],
    *,
    magic: bytes = b"CASM",
    version: int = 1,
    algorithm: int = 1,
    sizes: tuple[int, int, int] = (PARAMS.min_size, PARAMS.avg_size, PARAMS.max_size),
    root: int = 0,
    count: int | None = None,
) -> bytes:
    out = [
        struct.pack(
            "<4sHBIIIBI", magic, version, algorithm, *sizes, root, len(entries) if count is None else count
        )
    ]
    for e in entries:
        path = _b(e.path)
        out.append(struct.pack("<BBH", e.kind, e.flags, len(path)) + path)
        if e.kind == 1:
            size = sum(n for _, n in e.chunks) if e.size is None else e.size
            nchunks = len(e.chunks) if e.nchunks is None else e.nchunks
            out.append(struct.pack("<QI", size, nchunks))
            out.extend(cid + struct.pack("<I", n) for cid, n in e.chunks)
        elif e.kind == 2:
            target = _b(e.target)
            out.append(struct.pack("<H", len(target)) + target)
    return b"".join(out)


def D(path: str | bytes, flags: int = 0) -> Raw:
    return Raw(path, 0, flags)


def F(path: str | bytes, *lengths: int, flags: int = 0, size: int | None = None) -> Raw:
    chunks = tuple((chunk_id(f"{path!r}{i}".encode()), n) for i, n in enumerate(lengths))
    return Raw(path, 1, flags, size, chunks)


def L(path: str | bytes, target: str | bytes, flags: int = 0) -> Raw:
    return Raw(path, 2, flags, target=target)


def sample_entries() -> list[Raw]:
    return [
        D("a"),
        F("a/data.bin", 1000, 24),
        L("a/link", "data.bin"),
        D("b"),
        F("x", flags=1),
        L("y", "a"),
    ]


def refs(lengths: list[int], salt: str = "") -> list[tuple[bytes, int]]:
    return [(chunk_id(f"{salt}{i}".encode()), n) for i, n in enumerate(lengths)]


# -- laying entries out on disk, to ask the kernel where a link goes -----------------------
def lay_out(root: Path, entries: list[Entry] | list[Raw]) -> None:
    """Create directories, empty files and symlinks for ``entries`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for e in sorted(entries, key=lambda e: _b(e.path)):
        p = root / os.fsdecode(_b(e.path))
        if int(e.kind) == 0:
            p.mkdir(parents=True, exist_ok=True)
        elif int(e.kind) == 1:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.fsdecode(_b(e.target)), p)


def kernel_says_inside(root: Path, link: str) -> bool:
    """Whether the kernel resolves ``root/link`` to a place inside ``root``."""
    real_root = os.path.realpath(root)
    got = os.path.realpath(root / link)
    return got == real_root or got.startswith(real_root + os.sep)


# -- hypothesis trees --------------------------------------------------------------------------
NAME = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\\\x00:", exclude_categories=("Cs",)),
    min_size=1,
    max_size=8,
).filter(lambda s: s not in (".", "..") and len(s.encode()) <= 255)


@st.composite
def trees(draw: st.DrawFn, params: ChunkerParams = SMALL) -> list[Entry]:
    """A valid tree: nested and empty dirs, files (empty, exec), links that stay inside.

    A link points at the root, a file, a directory or an earlier link (so no cycles), by a
    path that climbs to the root with ``..`` and descends again, or from its own directory.
    """
    entries: list[Entry] = []
    dirs = [""]
    targets: list[str] = [""]
    for _ in range(draw(st.integers(0, 14))):
        parent = draw(st.sampled_from(dirs))
        name = draw(NAME)
        path = f"{parent}/{name}" if parent else name
        if any(e.path == path for e in entries):
            continue
        kind = draw(st.sampled_from(["dir", "file", "file", "link"]))
        if kind == "dir":
            entries.append(Entry(path, Kind.DIR))
            dirs.append(path)
            targets.append(path)
        elif kind == "file":
            lengths = draw(st.lists(st.integers(1, params.max_size), max_size=3))
            entries.append(file_entry(path, refs(lengths, path), draw(st.booleans())))
            targets.append(path)
        else:
            to = draw(st.sampled_from(targets))
            depth = parent.count("/") + 1 if parent else 0
            if to == parent:
                target = "."
            elif parent and to.startswith(parent + "/") and draw(st.booleans()):
                target = to[len(parent) + 1 :]
            else:
                target = "/".join([".."] * depth + ([to] if to else [])) or "."
            entries.append(Entry(path, Kind.SYMLINK, target=target))
            targets.append(path)
    return entries


# -- round trip and canonical form ---------------------------------------------------------
def test_sample_manifest_decodes_from_the_documented_layout() -> None:
    m = Manifest.decode(raw(sample_entries()))
    assert [e.path for e in m.entries] == ["a", "a/data.bin", "a/link", "b", "x", "y"]
    assert m.by_path["a/data.bin"].size == 1024
    assert m.by_path["x"].executable and m.by_path["x"].size == 0
    assert m.by_path["y"].target == "a"
    assert m.encode() == raw(sample_entries())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=trees(), order=st.randoms(use_true_random=False))
def test_manifest_round_trips_and_is_canonical_in_any_entry_order(
    entries: list[Entry], order: random.Random
) -> None:
    m = Manifest.build(SMALL, Kind.DIR, entries)
    shuffled = list(entries)
    order.shuffle(shuffled)
    again = Manifest.build(SMALL, Kind.DIR, shuffled)
    assert again.encode() == m.encode()
    assert again.id == m.id
    decoded = Manifest.decode(m.encode())
    assert decoded == m and decoded.id == m.id
    assert decoded.entries == m.entries
    assert {e.path: e for e in entries} == dict(decoded.by_path)
    assert decoded.root_kind == Kind.DIR and decoded.params == SMALL


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=trees())
def test_generated_links_really_stay_inside_according_to_the_kernel(
    tmp_path_factory: pytest.TempPathFactory, entries: list[Entry]
) -> None:
    """Guards the generator above: what the round-trip test calls safe, the kernel agrees is."""
    Manifest.build(SMALL, Kind.DIR, entries)
    root = tmp_path_factory.mktemp("tree")
    lay_out(root, entries)
    for e in entries:
        if e.kind == Kind.SYMLINK:
            assert kernel_says_inside(root, e.path), (e.path, e.target)


def test_single_file_manifest_round_trips() -> None:
    entry = file_entry("", refs([PARAMS.max_size, 5]), executable=True)
    m = Manifest.build(PARAMS, Kind.FILE, [entry])
    assert Manifest.decode(m.encode()) == m
    assert m.root_kind == Kind.FILE and m.entries == (entry,) and m.total_size == PARAMS.max_size + 5


def test_empty_directory_manifest_round_trips() -> None:
    m = Manifest.build(PARAMS, Kind.DIR, [])
    assert Manifest.decode(m.encode()) == m and m.entries == ()


def test_manifest_id_depends_on_content_exec_bit_and_parameters() -> None:
    base = [Entry("d", Kind.DIR), file_entry("d/f", refs([10]))]
    ids = {
        Manifest.build(PARAMS, Kind.DIR, base).id,
        Manifest.build(SMALL, Kind.DIR, base).id,
        Manifest.build(PARAMS, Kind.DIR, [base[0], file_entry("d/f", refs([10]), True)]).id,
        Manifest.build(PARAMS, Kind.DIR, [base[0], file_entry("d/f", refs([10], "other"))]).id,
        Manifest.build(PARAMS, Kind.DIR, [base[0], Entry("d/f", Kind.SYMLINK, target="..")]).id,
    }
    assert len(ids) == 5


def test_unicode_names_sort_by_their_utf8_bytes() -> None:
    names = ["é", "z", "ä/ö", "ä", "a-b", "a/b", "a", "日本", "\U0001f600"]
    entries = [Entry(n, Kind.DIR) for n in names]
    m = Manifest.build(PARAMS, Kind.DIR, entries)
    assert [e.path for e in m.entries] == sorted(names, key=lambda n: n.encode())


def test_manifest_queries_report_files_chunks_and_sizes() -> None:
    shared = (chunk_id(b"shared"), 7)
    m = Manifest.build(
        PARAMS,
        Kind.DIR,
        [file_entry("a", [shared, (chunk_id(b"x"), 3)]), file_entry("b", [shared]), Entry("c", Kind.DIR)],
    )
    assert [e.path for e in m.files()] == ["a", "b"]
    assert m.total_size == 17
    assert m.chunk_ids() == {shared[0], chunk_id(b"x")}
    assert m.chunk_sizes()[shared[0]] == 7


# -- malformed encodings ---------------------------------------------------------------------
def test_every_truncation_of_a_manifest_is_refused() -> None:
    data = raw(sample_entries())
    Manifest.decode(data)
    for n in range(len(data)):
        with pytest.raises(ManifestError):
            Manifest.decode(data[:n])


def test_trailing_bytes_are_refused() -> None:
    data = raw(sample_entries())
    for extra in (b"\x00", b"x" * 100, data):
        with pytest.raises(ManifestError, match="trailing"):
            Manifest.decode(data + extra)


def test_unknown_version_is_refused_as_unsupported() -> None:
    for version in (0, 3, 65535):
        with pytest.raises(UnsupportedVersionError):
            Manifest.decode(raw(sample_entries(), version=version))


def test_unknown_magic_is_refused_but_not_as_a_version_problem() -> None:
    for magic in (b"CASX", b"\x00\x00\x00\x00", b"casm"):
        with pytest.raises(ManifestError) as info:
            Manifest.decode(raw(sample_entries(), magic=magic))
        assert not isinstance(info.value, UnsupportedVersionError)


@pytest.mark.parametrize(
    "header",
    [
        {"algorithm": 0},
        {"algorithm": 7},
        {"sizes": (64 * KiB, 300 * KiB, 1 * MiB)},  # avg not a power of two
        {"sizes": (1 * MiB, 256 * KiB, 1 * MiB)},  # min > avg
        {"sizes": (0, 0, 0)},
        {"sizes": (2**32 - 1, 2**32 - 1, 2**32 - 1)},
        {"root": 2},  # a symlink root
        {"root": 9},
    ],
)
def test_bad_header_fields_are_refused(header: dict[str, object]) -> None:
    with pytest.raises(ManifestError):
        Manifest.decode(raw([], **header))  # type: ignore[arg-type]


def _peak_bytes_while(fn: object) -> int:
    tracemalloc.start()
    try:
        fn()  # type: ignore[operator]
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_huge_declared_entry_count_fails_fast_without_allocating() -> None:
    data = raw(sample_entries(), count=2**32 - 1)

    def decode() -> None:
        with pytest.raises(ManifestError):
            Manifest.decode(data)

    t0 = time.perf_counter()
    assert _peak_bytes_while(decode) < 1 * MiB
    assert time.perf_counter() - t0 < 1.0


def test_huge_declared_chunk_count_fails_fast_without_allocating() -> None:
    forged = Raw("f", 1, size=2**64 - 1, chunks=((b"\x01" * ID_SIZE, 5),), nchunks=2**32 - 1)
    data = raw([forged])

    def decode() -> None:
        with pytest.raises(ManifestError):
            Manifest.decode(data)

    t0 = time.perf_counter()
    assert _peak_bytes_while(decode) < 1 * MiB
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "entry",
    [
        Raw("x", kind=3),
        Raw("x", kind=255),
        D("x", flags=1),  # exec bit on a directory
        F("x", 5, flags=2),  # unknown flag
        F("x", 5, flags=0x81),
        L("x", "y", flags=1),
        D(b"\xff\xfe"),  # not UTF-8
        D(b"a\xc3"),  # truncated UTF-8 sequence
        L("x", b"\xff"),
        D("\udcff".encode("utf-8", "surrogatepass")),  # an encoded surrogate is not UTF-8
    ],
)
def test_malformed_entry_fields_are_refused(entry: Raw) -> None:
    with pytest.raises(ManifestError):
        Manifest.decode(raw([entry]))


def test_duplicate_entries_are_refused() -> None:
    with pytest.raises(ManifestError, match="duplicate"):
        Manifest.decode(raw([D("a"), D("a")]))
    with pytest.raises(ManifestError, match="duplicate"):
        Manifest.decode(raw([D("a"), F("a", 3)]))
    with pytest.raises(ManifestError, match="duplicate"):
        Manifest.build(PARAMS, Kind.DIR, [Entry("a", Kind.DIR), file_entry("a", refs([1]))])


def test_out_of_order_entries_are_refused() -> None:
    with pytest.raises(ManifestError, match="out-of-order"):
        Manifest.decode(raw([D("b"), D("a")]))
    with pytest.raises(ManifestError):  # the child before its parent
        Manifest.decode(raw([F("a/f", 1), D("a")]))
    with pytest.raises(ManifestError, match="out-of-order"):  # by bytes ("-" < "/"), not tree order
        Manifest.decode(raw([D("a"), D("a/b"), D("a-b")]))


@pytest.mark.parametrize(
    "path",
    [
        "..",
        "../x",
        "a/..",
        "a/../b",
        ".",
        "./a",
        "a/./b",
        "a//b",
        "a/",
        "/a",
        "/etc/passwd",
        "//a",
        "C:\\x",
        "C:x",
        "c:/x",
        "a\\b",
        "..\\x",
        "a\x00b",
        "\x00",
        "x" * 256,
        "/".join(["d"] * 2049),  # 4097 bytes
    ],
)
def test_manifest_with_unsafe_path_is_refused(path: str) -> None:
    # Parents that exist, so that only the path itself can be the problem.
    parts = path.split("/")
    parents = [D("/".join(parts[:i])) for i in range(1, len(parts)) if "/".join(parts[:i])]
    with pytest.raises(UnsafePathError):
        Manifest.decode(raw(sorted({p.path: p for p in parents}.values(), key=lambda e: _b(e.path)) + [F(path, 3)]))
    with pytest.raises(UnsafePathError):
        Manifest.build(PARAMS, Kind.DIR, [file_entry(path, refs([3]))])


def test_empty_path_in_a_directory_manifest_is_refused() -> None:
    with pytest.raises(UnsafePathError):
        Manifest.decode(raw([F("", 3)]))


def test_a_path_of_exactly_the_limits_is_accepted() -> None:
    name = "n" * 255
    deep = "/".join(["d"] * 2047) + "/ab"  # 4096 bytes
    entries = [Entry("/".join(["d"] * i), Kind.DIR) for i in range(1, 2048)]
    m = Manifest.build(PARAMS, Kind.DIR, [Entry(name, Kind.DIR), file_entry(deep, refs([1])), *entries])
    assert len(m.entries) == 2049


def test_missing_parent_directory_entry_is_refused() -> None:
    with pytest.raises(ManifestError, match="parent"):
        Manifest.decode(raw([F("a/f", 1)]))
    with pytest.raises(ManifestError, match="parent"):
        Manifest.decode(raw([D("a"), F("a/b/f", 1)]))


def test_entry_under_a_file_or_a_symlink_is_refused() -> None:
    with pytest.raises(ManifestError, match="parent"):
        Manifest.decode(raw([F("a", 1), F("a/f", 1)]))
    # Writing "l/f" would write through the link: refused even though l points inside.
    with pytest.raises(ManifestError, match="parent"):
        Manifest.decode(raw([D("d"), L("l", "d"), F("l/f", 1)]))


def test_file_whose_size_disagrees_with_its_chunks_is_refused() -> None:
    for size in (0, 9, 11, 2**64 - 1):
        with pytest.raises(ManifestError, match="size"):
            Manifest.decode(raw([F("f", 4, 6, size=size)]))
    with pytest.raises(ManifestError):
        Manifest.build(PARAMS, Kind.DIR, [Entry("f", Kind.FILE, size=11, chunks=pack_chunks(refs([4, 6])))])


def test_chunk_lengths_outside_one_to_max_size_are_refused() -> None:
    with pytest.raises(ManifestError):
        Manifest.decode(raw([F("f", 0)]))
    with pytest.raises(ManifestError):
        Manifest.decode(raw([F("f", PARAMS.max_size + 1)]))
    Manifest.decode(raw([F("f", 1, PARAMS.max_size)]))


def test_file_root_must_hold_exactly_one_file_named_empty() -> None:
    for entries in ([], [F("x", 1)], [F("", 1), F("x", 1)], [D("")], [L("", "x")]):
        with pytest.raises(ManifestError):
            Manifest.decode(raw(entries, root=1))
    Manifest.decode(raw([F("", 1)], root=1))


def test_build_refuses_entries_it_cannot_encode_with_a_manifest_error() -> None:
    for entry in (
        Entry("x" * 70_000, Kind.DIR),
        Entry("f", Kind.FILE, size=-1),
        Entry("f", Kind.FILE, size=2**64),
        Entry("l", Kind.SYMLINK, target="t" * 70_000),
        Entry("f", Kind.FILE, chunks=b"\x00" * (RECORD_SIZE - 1)),
        Entry("\udcff", Kind.DIR),  # a name that was not UTF-8 on disk
    ):
        with pytest.raises(ManifestError):
            Manifest.build(PARAMS, Kind.DIR, [entry])


# -- symlinks ---------------------------------------------------------------------------------
ESCAPES: list[tuple[str, list[Raw], str]] = [
    ("parent of root", [L("x", "..")], "x"),
    ("dotdot then name", [L("x", "../x")], "x"),
    ("from a subdirectory", [D("sub"), L("sub/l", "../..")], "sub/l"),
    ("down and too far up", [D("sub"), L("x", "sub/../../etc")], "x"),
    ("trailing dotdots with dots", [L("x", "./.././x")], "x"),
    # sub/L is the root; one more ".." after it leaves.
    ("through a link to the root", [D("sub"), L("sub/L", ".."), L("M", "sub/L/..")], "M"),
    ("through a link to its own dir", [D("d"), L("d/L", "."), L("M", "d/L/../..")], "M"),
    ("through a deep link", [D("a"), D("a/b"), L("a/b/up", "../.."), L("M", "a/b/up/../x")], "M"),
    # The kernel resolves ".." physically: a/l is "d/e", so "a/l/../.." is the root, then one more.
    ("dotdot after a link is physical", [D("a"), D("d"), D("d/e"), L("a/l", "../d/e"), L("M", "a/l/../../..")], "M"),
    ("a link to an escaping link", [L("a", "b"), L("b", "../x")], "a"),
    ("link chain ending outside", [D("s"), L("s/a", "../b"), L("b", "c/.."), D("c"), L("z", "s/a/..")], "z"),
]


@pytest.mark.parametrize("entries,link", [(e, link) for _, e, link in ESCAPES], ids=[n for n, _, _ in ESCAPES])
def test_symlink_that_leaves_the_root_is_refused(tmp_path: Path, entries: list[Raw], link: str) -> None:
    lay_out(tmp_path / "root", entries)
    assert not kernel_says_inside(tmp_path / "root", link)  # the case is a real escape
    ordered = sorted(entries, key=lambda e: _b(e.path))
    with pytest.raises(UnsafePathError):
        Manifest.decode(raw(ordered))


INSIDE: list[tuple[str, list[Raw]]] = [
    ("to the root from a subdirectory", [D("sub"), L("sub/L", "..")]),
    ("through a link to the root and down", [D("sub"), L("sub/L", ".."), L("M", "sub/L/sub")]),
    ("dot", [L("x", ".")]),
    ("dangling but inside", [L("x", "no/such/thing")]),
    ("up and down", [D("a"), D("a/b"), F("a/f", 1), L("a/b/l", "../../a/./f")]),
    ("chain of links", [F("f", 1), L("l1", "l2"), L("l2", "l3"), L("l3", "f")]),
    ("dotdot after a link is physical", [D("a"), D("d"), D("d/e"), L("a/l", "../d/e"), L("M", "a/l/../..")]),
    ("drive-like target is a plain relative name", [L("x", "C:/y")]),
]


@pytest.mark.parametrize("entries", [e for _, e in INSIDE], ids=[n for n, _ in INSIDE])
def test_symlink_that_stays_inside_is_accepted(tmp_path: Path, entries: list[Raw]) -> None:
    lay_out(tmp_path / "root", entries)
    for e in entries:
        if e.kind == 2:
            assert kernel_says_inside(tmp_path / "root", os.fsdecode(_b(e.path)))
    Manifest.decode(raw(sorted(entries, key=lambda e: _b(e.path))))


@pytest.mark.parametrize(
    "target",
    ["/etc/passwd", "/", "//x", "", "a\x00b", "a\\b", "..\\..\\x", "C:\\x", "t" * 4097],
)
def test_symlink_with_absolute_or_malformed_target_is_refused(target: str) -> None:
    with pytest.raises(UnsafePathError) as info:
        Manifest.decode(raw([L("link", target)]))
    assert info.value.path == "link"


@pytest.mark.parametrize(
    "entries",
    [
        [L("a", "a")],
        [L("a", "b"), L("b", "a")],
        [L("a", "a/x")],
        [D("d"), L("d/L", "../d/L")],
        [L("a", "b/x"), L("b", "c"), L("c", "a")],
    ],
)
def test_symlink_loop_is_refused(entries: list[Raw]) -> None:
    with pytest.raises(UnsafePathError, match="too many levels"):
        Manifest.decode(raw(sorted(entries, key=lambda e: _b(e.path))))


def test_symlink_chains_are_followed_up_to_the_hop_limit() -> None:
    def chain(hops: int) -> list[Entry]:
        links = [Entry(f"l{i:03d}", Kind.SYMLINK, target=f"l{i + 1:03d}") for i in range(hops)]
        return [*links, file_entry(f"l{hops:03d}", refs([1]))]

    # docs/format.md: "following other symlinks of the tree (at most 40 hops)".
    Manifest.build(PARAMS, Kind.DIR, chain(MAX_SYMLINK_HOPS + 1))  # l000 follows 40 other links
    with pytest.raises(UnsafePathError, match="too many levels"):
        Manifest.build(PARAMS, Kind.DIR, chain(MAX_SYMLINK_HOPS + 2))


def test_link_escape_is_reported_with_the_link_path() -> None:
    with pytest.raises(UnsafePathError) as info:
        Manifest.build(PARAMS, Kind.DIR, [Entry("sub", Kind.DIR), Entry("sub/up", Kind.SYMLINK, target="../..")])
    assert info.value.path == "sub/up"
    assert "sub/up" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_long_link_targets_that_ping_pong_fail_fast() -> None:
    """Resolution expands targets: a forged manifest must not make it slow (nor big)."""
    long_a = "./" * 30_000 + "b"
    long_b = "./" * 30_000 + "a"
    t0 = time.perf_counter()
    with pytest.raises(UnsafePathError):
        Manifest.decode(raw([L("a", long_a), L("b", long_b)]))
    with pytest.raises(UnsafePathError):  # targets at the limit: refused as a loop, quickly
        Manifest.decode(raw([L("a", "./" * 2040 + "b"), L("b", "./" * 2040 + "a")]))
    assert time.perf_counter() - t0 < 1.0


def test_many_links_at_the_length_limit_resolve_in_linear_time() -> None:
    entries = [L(f"l{i:04d}", "x/" * 2040 + "y") for i in range(200)]
    t0 = time.perf_counter()
    Manifest.decode(raw(entries))
    assert time.perf_counter() - t0 < 5.0


# -- fuzzing ------------------------------------------------------------------------------------
def decode_or_refuse(data: bytes) -> None:
    """The property: a valid manifest that re-encodes to the same bytes, or a ManifestError."""
    try:
        m = Manifest.decode(data)
    except ManifestError:
        return
    assert m.encode() == data
    assert Manifest.decode(m.encode()) == m
    # Its own build agrees (the canonical form is what was decoded); an older version's
    # manifest rebuilds, in the current version, to the same tree.
    rebuilt = Manifest.build(m.params, m.root_kind, list(m.entries), m.root_mode)
    if int.from_bytes(data[4:6], "little") == MANIFEST_VERSION:
        assert rebuilt == m
    else:
        assert rebuilt.entries == m.entries and rebuilt.root_mode == m.root_mode


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_decoding_random_bytes_yields_a_manifest_or_a_manifest_error(data: bytes) -> None:
    decode_or_refuse(data)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200), count=st.integers(0, 2**32 - 1), root=st.integers(0, 255))
def test_decoding_random_entries_after_a_valid_header_yields_a_manifest_or_a_manifest_error(
    body: bytes, count: int, root: int
) -> None:
    decode_or_refuse(raw([], count=count, root=root) + body)


VALID = raw(sample_entries())


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, len(VALID) - 1), st.integers(0, 7), st.sampled_from(["flip", "set"]), st.integers(0, 255)
        ),
        min_size=1,
        max_size=4,
    ),
    cut=st.one_of(st.none(), st.integers(0, len(VALID))),
    tail=st.binary(max_size=3),
)
def test_decoding_a_damaged_valid_manifest_yields_a_manifest_or_a_manifest_error(
    edits: list[tuple[int, int, str, int]], cut: int | None, tail: bytes
) -> None:
    data = bytearray(VALID)
    for pos, bit, how, value in edits:
        if how == "flip":
            data[pos] ^= 1 << bit
        else:
            data[pos] = value
    damaged = bytes(data[:cut] if cut is not None else data) + tail
    assume(damaged != VALID)
    decode_or_refuse(damaged)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=trees(), pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_decoding_a_bit_flipped_generated_manifest_yields_a_manifest_or_a_manifest_error(
    entries: list[Entry], pos: int, bit: int
) -> None:
    data = bytearray(Manifest.build(SMALL, Kind.DIR, entries).encode())
    data[pos % len(data)] ^= 1 << bit
    decode_or_refuse(bytes(data))


def test_build_refuses_an_unknown_entry_kind_and_an_executable_directory() -> None:
    from cas.chunking import DEFAULT_PARAMS
    from cas.manifest import Entry, Kind, Manifest

    with pytest.raises(ManifestError, match="unknown entry kind"):
        Manifest.build(DEFAULT_PARAMS, Kind.DIR, [Entry("a", 7)])  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match="only a file can be executable"):
        Manifest.build(DEFAULT_PARAMS, Kind.DIR, [Entry("a", Kind.DIR, executable=True)])
    with pytest.raises(ManifestError, match="root must be"):
        Manifest.build(DEFAULT_PARAMS, Kind.SYMLINK, [])


def test_build_gives_exactly_what_decoding_its_encoding_gives() -> None:
    from cas.chunking import DEFAULT_PARAMS
    from cas.manifest import Entry, Kind, Manifest, file_entry

    entries = [Entry("d", Kind.DIR), file_entry("d/f", [(b"\x01" * 32, 10)], True), Entry("l", Kind.SYMLINK, target="d/f")]
    built = Manifest.build(DEFAULT_PARAMS, Kind.DIR, entries[::-1])
    decoded = Manifest.decode(built.encode())
    assert decoded == built and decoded.entries == built.entries and decoded.id == built.id


# -- version 2: mode bits -------------------------------------------------------------
def test_modes_of_files_folders_and_the_root_folder_round_trip_and_name_the_tree() -> None:
    entries = [Entry("d", Kind.DIR, mode=0o700), Entry("d/f", Kind.FILE, False, 0, b"", mode=0o600),
               Entry("x", Kind.FILE, True, 0, b"", mode=0o750), Entry("l", Kind.SYMLINK, target="x")]
    m = Manifest.build(PARAMS, Kind.DIR, entries, root_mode=0o711)
    back = Manifest.decode(m.encode())
    assert back == m and back.root_mode == 0o711
    assert [(e.path, e.mode) for e in back.entries] == [("d", 0o700), ("d/f", 0o600), ("l", None), ("x", 0o750)]
    other = Manifest.build(PARAMS, Kind.DIR, [*entries[:1], Entry("d/f", Kind.FILE, False, 0, b"", mode=0o644),
                                              *entries[2:]], root_mode=0o711)
    assert other.id != m.id  # a chmod is a new version of the tree


def test_a_version_1_manifest_still_decodes_with_the_default_modes() -> None:
    m = Manifest.decode(raw(sample_entries(), version=1))
    assert m.root_mode is None and m.root_perm == 0o755
    perms = {e.path: e.perm for e in m.entries if e.kind != Kind.SYMLINK}
    assert perms == {"a": 0o755, "a/data.bin": 0o644, "b": 0o755, "x": 0o755}


@pytest.mark.parametrize("entry", [
    Entry("f", Kind.FILE, False, 0, b"", mode=0o4755 & 0o7777),  # setuid: never carried
    Entry("f", Kind.FILE, False, 0, b"", mode=0o1000),  # sticky
    Entry("f", Kind.FILE, True, 0, b"", mode=0o644),  # executable but no owner x bit
    Entry("l", Kind.SYMLINK, target="x", mode=0o777),  # a link has no mode
])
def test_modes_a_manifest_cannot_carry_are_refused(entry: Entry) -> None:
    with pytest.raises(ManifestError):
        Manifest.build(PARAMS, Kind.DIR, [entry, Entry("x", Kind.FILE)] if entry.kind == Kind.SYMLINK else [entry])


def test_mode_bits_beyond_0777_in_an_encoding_are_refused() -> None:
    m = Manifest.build(PARAMS, Kind.DIR, [Entry("f", Kind.FILE, False, 0, b"", mode=0o600)])
    data = bytearray(m.encode())
    at = data.index(b"f") - 2  # the entry's mode field precedes its path
    data[at : at + 2] = (0o4600).to_bytes(2, "little")
    with pytest.raises(ManifestError, match="mode"):
        Manifest.decode(bytes(data))
