"""zstd "when it pays", shared by every place chunks rest or travel compressed.

Compressing costs ~1.3 s per GiB on one core and float32 weights shrink only ~8 %, so a chunk
is compressed only when a 16 KiB sample already shrinks by ``MIN_GAIN`` and the whole chunk
then does too; otherwise it is stored raw. The codec byte says which.
"""

from __future__ import annotations

import threading

import zstandard

from .errors import ChunkCorruptError

CODEC_RAW = 0
CODEC_ZSTD = 1

LEVEL = 1
MIN_GAIN = 0.10  # keep compressed bytes only if they save at least 10 %
_SAMPLE = 16 * 1024
_MIN_SIZE = 512

_local = threading.local()


def _cctx() -> zstandard.ZstdCompressor:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=LEVEL)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def maybe_compress(data: bytes | bytearray | memoryview) -> tuple[int, bytes | memoryview]:
    """(codec, payload): zstd if it saves at least MIN_GAIN, else the data itself (a
    bytearray as a view of it, never copied)."""
    if isinstance(data, bytearray):
        data = memoryview(data)
    n = len(data)
    if n < _MIN_SIZE:
        return CODEC_RAW, data
    cctx = _cctx()
    if n > 4 * _SAMPLE:
        sample = data[:_SAMPLE]
        if len(cctx.compress(sample)) > (1 - MIN_GAIN) * _SAMPLE:
            return CODEC_RAW, data
    packed = cctx.compress(data)
    if len(packed) > (1 - MIN_GAIN) * n:
        return CODEC_RAW, data
    return CODEC_ZSTD, packed


def decompress(codec: int, payload: bytes | memoryview, raw_len: int, chunk_hex: str = "") -> bytes | memoryview:
    """The plain bytes of a payload; :class:`ChunkCorruptError` if it cannot be decoded."""
    if codec == CODEC_RAW:
        if len(payload) != raw_len:
            raise ChunkCorruptError(f"chunk {chunk_hex}: {len(payload)} bytes, expected {raw_len}", chunk_hex)
        return payload
    if codec == CODEC_ZSTD:
        try:
            # The frame header's content size is what zstd allocates: a forged one (2**40)
            # must be refused before that, not after.
            declared = zstandard.frame_content_size(payload)
            if declared not in (-1, raw_len):
                raise ChunkCorruptError(f"chunk {chunk_hex}: zstd frame declares {declared} bytes, expected {raw_len}", chunk_hex)
            out = _dctx().decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as e:
            raise ChunkCorruptError(f"chunk {chunk_hex}: zstd payload does not decode: {e}", chunk_hex) from None
        if len(out) != raw_len:
            raise ChunkCorruptError(f"chunk {chunk_hex}: decodes to {len(out)} bytes, expected {raw_len}", chunk_hex)
        return out
    raise ChunkCorruptError(f"chunk {chunk_hex}: unknown codec {codec}", chunk_hex)
