"""Content-defined chunking: the streaming pipeline agrees with the in-memory cut, sizes stay
within the parameters, an edit only touches the chunks around it, and parameters are checked.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cas.chunking import (
    DEFAULT_PARAMS,
    RECORD_SIZE,
    Chunker,
    ChunkerParams,
    KiB,
    MiB,
    iter_chunk_spans,
    iter_chunks,
    pack_chunks,
)
from cas.hashing import chunk_id

# Small parameters: many chunks and many segments from little data, so hypothesis stays fast.
SMALL = ChunkerParams(min_size=256, avg_size=1 * KiB, max_size=4 * KiB)
SMALL_SEGMENT = 4 * KiB  # pipeline buffer = segment + max_size = 8 KiB


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sizes_of(packed: bytes) -> list[int]:
    return [n for _, n in iter_chunks(packed)]


def boundary_sizes(params: ChunkerParams, segment: int) -> list[int]:
    """Sizes at which the small-input path, the pipeline and its carry-over change behaviour."""
    mn, mx = params.min_size, params.max_size
    cap = segment + mx
    points = [0, 1, mn - 1, mn, mn + 1, mn + 2, mx - 1, mx, mx + 1]
    for k in (1, 2, 3):
        points += [k * segment - 1, k * segment, k * segment + 1, k * cap - 1, k * cap, k * cap + 1]
    return sorted({p for p in points if p >= 0})


class ShortReads:
    """A stream over ``data`` whose ``readinto`` returns few bytes at a time (as pipes do)."""

    def __init__(self, data: bytes, seed: int, most: int) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.rng = random.Random(seed)
        self.most = most

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), len(self.data) - self.pos, self.rng.randint(1, self.most))
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def check_chunk_list(packed: bytes, data: bytes, params: ChunkerParams) -> None:
    """Every record names its bytes, the records tile ``data``, and sizes respect the params."""
    assert len(packed) % RECORD_SIZE == 0
    spans = list(iter_chunk_spans(packed))
    assert sum(n for _, _, n in spans) == len(data)
    for i, (cid, off, n) in enumerate(spans):
        assert cid == chunk_id(data[off : off + n])
        assert 0 < n <= params.max_size
        if i < len(spans) - 1:
            assert n >= params.min_size, f"chunk {i} of {len(spans)} has {n} bytes"


@pytest.fixture
def small_chunker() -> Iterator[Chunker]:
    with Chunker(SMALL, segment_size=SMALL_SEGMENT) as c:
        yield c


@pytest.fixture(scope="module")
def default_chunker() -> Iterator[Chunker]:
    with Chunker(DEFAULT_PARAMS, segment_size=1 * MiB) as c:
        yield c


# -- the pipeline equals the in-memory cut ----------------------------------------------
@pytest.mark.parametrize("size", boundary_sizes(SMALL, SMALL_SEGMENT))
def test_stream_equals_chunk_bytes_at_small_parameter_boundaries(small_chunker: Chunker, size: int) -> None:
    data = data_of(size, size)
    expected = small_chunker.chunk_bytes(data)
    check_chunk_list(expected, data, SMALL)
    for hint in (-1, size):
        assert small_chunker.chunk_stream(ShortReads(data, size, 1 << 20).readinto, hint) == (expected, size)


@pytest.mark.parametrize("size", boundary_sizes(DEFAULT_PARAMS, 1 * MiB) + [5 * MiB + 12345])
def test_chunk_file_equals_chunk_bytes_at_default_parameter_boundaries(
    default_chunker: Chunker, tmp_path: Path, size: int
) -> None:
    data = data_of(size, size)
    path = tmp_path / "f"
    path.write_bytes(data)
    expected = default_chunker.chunk_bytes(data)
    check_chunk_list(expected, data, DEFAULT_PARAMS)
    fd = os.open(path, os.O_RDONLY)
    try:
        for hint in (-1, size):
            os.lseek(fd, 0, os.SEEK_SET)
            assert default_chunker.chunk_file(fd, hint) == (expected, size)
    finally:
        os.close(fd)


@settings(max_examples=60, deadline=None)
@given(
    size=st.one_of(st.integers(0, 3 * SMALL_SEGMENT), st.integers(0, 256 * KiB)),
    seed=st.integers(0, 2**32),
    most=st.sampled_from([7, 1000, 1 << 20]),
)
def test_stream_equals_chunk_bytes_for_any_size_and_read_pattern(size: int, seed: int, most: int) -> None:
    data = data_of(size, seed)
    with Chunker(SMALL, segment_size=SMALL_SEGMENT) as c:
        expected = c.chunk_bytes(data)
        check_chunk_list(expected, data, SMALL)
        assert c.chunk_stream(ShortReads(data, seed, most).readinto, -1) == (expected, size)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.one_of(
        st.integers(0, 4 * MiB),
        st.sampled_from(boundary_sizes(DEFAULT_PARAMS, 1 * MiB)),
    ),
    seed=st.integers(0, 2**32),
)
def test_chunk_file_equals_chunk_bytes_with_default_parameters(tmp_path: Path, size: int, seed: int) -> None:
    data = data_of(size, seed)
    path = tmp_path / f"f{seed}"
    path.write_bytes(data)
    with Chunker(DEFAULT_PARAMS, segment_size=1 * MiB) as c:
        fd = os.open(path, os.O_RDONLY)
        try:
            got = c.chunk_file(fd, size)
        finally:
            os.close(fd)
        assert got == (c.chunk_bytes(data), size)
    path.unlink()


@settings(max_examples=40, deadline=None)
@given(
    params=st.builds(
        lambda mn, avg_bits, mx_extra: ChunkerParams(
            min_size=min(mn, 1 << avg_bits), avg_size=1 << avg_bits, max_size=max(1 << avg_bits, 1 * KiB) + mx_extra
        ),
        mn=st.integers(32, 2048).map(lambda n: 2 * n),
        avg_bits=st.integers(8, 12),
        mx_extra=st.integers(0, 8 * KiB),
    ),
    size=st.integers(0, 96 * KiB),
    seed=st.integers(0, 2**32),
)
def test_chunk_sizes_respect_any_valid_parameters(params: ChunkerParams, size: int, seed: int) -> None:
    data = data_of(size, seed)
    with Chunker(params, segment_size=0) as c:  # segment is raised to max_size: most carry-over
        packed = c.chunk_bytes(data)
        check_chunk_list(packed, data, params)
        assert c.chunk_stream(ShortReads(data, seed, 5000).readinto) == (packed, size)


def test_small_size_hint_on_a_stream_that_is_longer_still_reads_all(small_chunker: Chunker) -> None:
    """A file that grew between fstat and read: the small-input path hands over to the pipeline."""
    data = data_of(5 * SMALL_SEGMENT + 17, 3)
    for hint in (0, 1, SMALL.min_size - 1, SMALL.min_size):
        got = small_chunker.chunk_stream(ShortReads(data, hint, 999).readinto, hint)
        assert got == (small_chunker.chunk_bytes(data), len(data))


def test_size_hint_larger_than_the_stream_reports_the_bytes_really_read(small_chunker: Chunker) -> None:
    data = data_of(100, 4)
    assert small_chunker.chunk_stream(ShortReads(data, 4, 10).readinto, SMALL.min_size) == (
        small_chunker.chunk_bytes(data),
        100,
    )


def test_chunk_file_starts_at_the_current_offset(small_chunker: Chunker, tmp_path: Path) -> None:
    data = data_of(50 * KiB, 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 1000, os.SEEK_SET)
        assert small_chunker.chunk_file(fd) == (small_chunker.chunk_bytes(data[1000:]), len(data) - 1000)
    finally:
        os.close(fd)


def test_one_chunker_serves_several_threads_at_once(tmp_path: Path) -> None:
    blobs = [data_of(300 * KiB + i * 777, 100 + i) for i in range(4)]
    results: dict[int, tuple[bytes, int]] = {}
    with Chunker(SMALL, segment_size=SMALL_SEGMENT) as c:

        def work(i: int) -> None:
            for _ in range(3):
                results[i] = c.chunk_stream(ShortReads(blobs[i], i, 3000).readinto)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(blobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, blob in enumerate(blobs):
            assert results[i] == (c.chunk_bytes(blob), len(blob))


def test_a_read_error_propagates_and_leaves_the_chunker_usable(small_chunker: Chunker) -> None:
    data = data_of(100 * KiB, 6)
    stream = ShortReads(data, 6, 5000)

    def failing(buf: memoryview) -> int:
        if stream.pos > 40 * KiB:
            raise OSError(5, "Input/output error")
        return stream.readinto(buf)

    with pytest.raises(OSError, match="Input/output"):
        small_chunker.chunk_stream(failing)
    assert small_chunker.chunk_stream(ShortReads(data, 7, 5000).readinto) == (
        small_chunker.chunk_bytes(data),
        len(data),
    )


def test_empty_input_has_no_chunks(small_chunker: Chunker) -> None:
    assert small_chunker.chunk_bytes(b"") == b""
    assert small_chunker.chunk_stream(ShortReads(b"", 0, 1).readinto, 0) == (b"", 0)
    assert small_chunker.chunk_stream(ShortReads(b"", 0, 1).readinto, -1) == (b"", 0)


# -- locality of edits -------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2])
def test_inserting_100_bytes_into_64_mib_changes_at_most_two_chunk_ids(
    default_chunker: Chunker, seed: int
) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(64 * MiB)
    at = rng.randrange(len(data))
    edited = data[:at] + rng.randbytes(100) + data[at:]
    before = {cid for cid, _ in iter_chunks(default_chunker.chunk_bytes(data))}
    after = {cid for cid, _ in iter_chunks(default_chunker.chunk_bytes(edited))}
    assert len(before) > 100
    assert len(after - before) <= 2
    assert len(before - after) <= 2


def test_identical_content_at_different_offsets_shares_chunks(default_chunker: Chunker) -> None:
    body = data_of(8 * MiB, 8)
    a = {cid for cid, _ in iter_chunks(default_chunker.chunk_bytes(data_of(123_457, 9) + body))}
    b = {cid for cid, _ in iter_chunks(default_chunker.chunk_bytes(body))}
    assert len(a & b) >= len(b) - 2


# -- packing -------------------------------------------------------------------------------
def test_pack_and_iterate_chunks_round_trip() -> None:
    refs = [(chunk_id(bytes([i])), i + 1) for i in range(5)]
    packed = pack_chunks(refs)
    assert len(packed) == 5 * RECORD_SIZE
    assert list(iter_chunks(packed)) == refs
    assert [off for _, off, _ in iter_chunk_spans(packed)] == [0, 1, 3, 6, 10]


# -- parameters ----------------------------------------------------------------------------
def test_default_parameters_are_valid_and_cut_as_documented() -> None:
    p = ChunkerParams()
    assert (p.min_size, p.avg_size, p.max_size) == (64 * KiB, 256 * KiB, 1 * MiB)
    assert p == DEFAULT_PARAMS


@pytest.mark.parametrize(
    "kwargs",
    [
        {"algorithm": 0},
        {"algorithm": 2},
        {"min_size": 62, "avg_size": 256, "max_size": 1024},  # min below 64
        {"min_size": 0},
        {"min_size": -2},
        {"min_size": 512 * KiB, "avg_size": 256 * KiB},  # min > avg
        {"avg_size": 2 * MiB, "max_size": 1 * MiB},  # avg > max
        {"avg_size": 300 * KiB},  # not a power of two
        {"min_size": 64, "avg_size": 128, "max_size": 1024},  # avg below FastCDC's 256
        {"min_size": 64, "avg_size": 256, "max_size": 512},  # max below FastCDC's 1 KiB
        {"min_size": 64, "avg_size": 64, "max_size": 64},
        {"min_size": 2 * MiB, "avg_size": 4 * MiB, "max_size": 16 * MiB},  # min above FastCDC's 1 MiB
        {"min_size": 64 * KiB, "avg_size": 8 * MiB, "max_size": 16 * MiB},  # avg above FastCDC's 4 MiB
        {"max_size": 16 * MiB + 2},
        {"min_size": 65 * KiB + 1},  # odd: FastCDC would cut chunks of min_size - 1
    ],
)
def test_invalid_chunker_params_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ChunkerParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_size": 64, "avg_size": 256, "max_size": 1024},
        {"min_size": 1 * MiB, "avg_size": 4 * MiB, "max_size": 16 * MiB},
        {"min_size": 256, "avg_size": 256, "max_size": 1 * KiB + 1},
    ],
)
def test_extreme_valid_chunker_params_can_really_cut(kwargs: dict[str, int]) -> None:
    params = ChunkerParams(**kwargs)
    data = data_of(3 * params.max_size + 5, 11)
    with Chunker(params) as c:
        check_chunk_list(c.chunk_bytes(data), data, params)
