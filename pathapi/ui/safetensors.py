"""``.safetensors`` files without reading their tensors: the table of tensors from the header
alone, and which tensors differ between two versions of a file.

The format: an 8-byte little-endian header length N, N bytes of JSON (tensor name ->
``{"dtype", "shape", "data_offsets": [begin, end]}``, offsets relative to the byte after the
header; an optional ``"__metadata__"`` of strings), then the tensor bytes. Reading the table
costs the chunks that hold the first ``8 + N`` bytes.

Which tensors changed is decided exactly, reading as little as possible: where both versions
cover a tensor's bytes with the same chunk at the same place, those bytes are equal without
reading them; only the rest is read from both and compared.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from cas.manifest import Entry
from cas.store.base import ChunkSource

from ..errors import PathapiError
from .chunkio import Span, read_range, spans

#: The format's own bound on the header (100 MB): a larger length is not a safetensors file.
MAX_HEADER = 100_000_000
SUFFIX = ".safetensors"


class NotSafetensorsError(PathapiError, ValueError):
    """A file whose first bytes are not a safetensors header."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: list[int]
    begin: int  # absolute offset in the file
    end: int

    @property
    def size(self) -> int:
        return self.end - self.begin


def header(chunks: ChunkSource, entry: Entry) -> tuple[list[Tensor], dict[str, str]]:
    """(tensors in file order, metadata) of a stored safetensors file, from its header only."""
    head = read_range(chunks, entry, 0, 8)
    if len(head) < 8:
        raise NotSafetensorsError(f"{entry.path or 'the file'}: {entry.size} bytes, shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > entry.size:
        raise NotSafetensorsError(f"{entry.path or 'the file'}: header length {n} does not fit a safetensors file")
    return parse_header(read_range(chunks, entry, 8, 8 + n), entry.size)


def parse_header(raw: bytes, file_size: int) -> tuple[list[Tensor], dict[str, str]]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise NotSafetensorsError(f"the header is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise NotSafetensorsError("the header is not a JSON object")
    base = 8 + len(raw)
    meta_raw = doc.pop("__metadata__", {})
    meta = {str(k): str(v) for k, v in meta_raw.items()} if isinstance(meta_raw, dict) else {}
    tensors: list[Tensor] = []
    for name, info in doc.items():
        tensors.append(_tensor(name, info, base, file_size))
    return sorted(tensors, key=lambda t: (t.begin, t.name)), meta


def _tensor(name: str, info: Any, base: int, file_size: int) -> Tensor:
    try:
        dtype, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
        ok = (isinstance(dtype, str) and isinstance(shape, list) and all(isinstance(d, int) for d in shape)
              and isinstance(b, int) and isinstance(e, int) and 0 <= b <= e and base + e <= file_size)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise NotSafetensorsError(f"tensor {name[:80]!r} has no valid dtype, shape and data_offsets")
    return Tensor(name, dtype, list(shape), base + b, base + e)


@dataclass(frozen=True)
class TensorChange:
    name: str
    status: str  # "added", "removed", "changed", "same"
    dtype: str
    shape: list[int]
    size: int
    #: bytes of the tensor that differ (exact; 0 for "same")
    changed_bytes: int
    note: str = ""


def diff(chunks: ChunkSource, old: Entry, new: Entry) -> list[TensorChange]:
    """Every tensor of either version with what became of it, in the new file's order."""
    a, _ = header(chunks, old)
    b, _ = header(chunks, new)
    olds = {t.name: t for t in a}
    news = {t.name: t for t in b}
    sa, sb = spans(old), spans(new)
    out: list[TensorChange] = []
    for t in b:
        o = olds.get(t.name)
        if o is None:
            out.append(TensorChange(t.name, "added", t.dtype, t.shape, t.size, t.size))
        elif (o.dtype, o.shape, o.size) != (t.dtype, t.shape, t.size):
            out.append(TensorChange(t.name, "changed", t.dtype, t.shape, t.size, t.size,
                                    f"was {o.dtype} {o.shape}"))
        else:
            n = _differing_bytes(chunks, old, sa, o.begin, new, sb, t.begin, t.size)
            out.append(TensorChange(t.name, "changed" if n else "same", t.dtype, t.shape, t.size, n))
    for t in a:
        if t.name not in news:
            out.append(TensorChange(t.name, "removed", t.dtype, t.shape, t.size, t.size))
    return out


def _cover(ss: list[Span], start: int, length: int) -> list[tuple[int, int, Span]]:
    """(relative start, relative end, chunk) of the chunks covering ``[start, start+length)``."""
    return [(max(s.start, start) - start, min(s.end, start + length) - start, s)
            for s in ss if s.end > start and s.start < start + length]


def _differing_bytes(chunks: ChunkSource, old: Entry, sa: list[Span], a0: int, new: Entry, sb: list[Span], b0: int,
                     length: int) -> int:
    """How many of the ``length`` bytes at ``a0`` in ``old`` and ``b0`` in ``new`` differ.
    Pieces where both lie in the same chunk at the same place are equal unread."""
    ca, cb = _cover(sa, a0, length), _cover(sb, b0, length)
    cuts = sorted({0, length, *(x for r in ca for x in r[:2]), *(x for r in cb for x in r[:2])})
    unsure: list[tuple[int, int]] = []
    i = j = 0
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        if lo == hi:
            continue
        while ca[i][1] <= lo:
            i += 1
        while cb[j][1] <= lo:
            j += 1
        x, y = ca[i][2], cb[j][2]
        if x.id == y.id and x.start - a0 == y.start - b0:
            continue
        if unsure and unsure[-1][1] == lo:
            unsure[-1] = (unsure[-1][0], hi)
        else:
            unsure.append((lo, hi))
    n = 0
    for lo, hi in unsure:
        got_a = read_range(chunks, old, a0 + lo, a0 + hi)
        got_b = read_range(chunks, new, b0 + lo, b0 + hi)
        n += sum(p != q for p, q in zip(got_a, got_b, strict=True))
    return n
