"""Every encode and decode of the origin protocol's bodies and headers, for both sides.

The consumer (:mod:`pathapi.wire.client`) and the origin (:mod:`pathapi.wire.origin`) build
and read the bytes of docs/format.md ("Origin protocol") only through these functions, so
the two ends cannot drift apart. Decoders raise :class:`ValueError` on malformed input and
never read past the buffer they are given; what an error means for a request (a 400, a
broken origin) is for the caller to say.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from cas.delta import DIGEST_SIZE
from cas.hashing import ID_SIZE

from ..version import Version
from .protocol import (
    DELTA_HEAD,
    DELTA_ITEM,
    FRAME,
    HEADER_MANIFEST_ID,
    HEADER_PROTOCOL,
    HEADER_VERSION,
    MAX_DELTA_IDS,
    PROTOCOL_VERSION,
)


def request_headers(secret: str) -> dict[str, str]:
    """The headers every request to an origin carries: the app secret and the protocol version."""
    return {"Authorization": f"Bearer {secret}", HEADER_PROTOCOL: PROTOCOL_VERSION}


def bearer_token(authorization: str) -> bytes:
    """The secret an ``Authorization`` header presents (empty if it is not ``Bearer``).
    Header bytes that are not UTF-8 arrive as surrogates: kept as sent, never an error."""
    return authorization[7:].encode("utf-8", "surrogateescape") if authorization.startswith("Bearer ") else b""


def manifest_headers(manifest_id: bytes, version: Version | None) -> dict[str, str]:
    """The headers of a manifest answer: its id and, if known, the version that produced it."""
    out = {HEADER_MANIFEST_ID: manifest_id.hex()}
    if version is not None:
        out[HEADER_VERSION] = str(version)
    return out


def manifest_version(headers: Mapping[str, str]) -> Version | None:
    """The version a manifest answer names (None without one); ValueError if malformed."""
    stamp = headers.get(HEADER_VERSION)
    return Version.parse(stamp) if stamp is not None else None


def encode_chunk_request(manifest_id: bytes, ids: Sequence[bytes]) -> bytes:
    """The body of ``POST /v1/chunks``: the manifest id, then the chunk ids."""
    return manifest_id + b"".join(ids)


def decode_chunk_request(body: bytes) -> tuple[bytes, list[bytes]]:
    """(manifest id, chunk ids) of a ``POST /v1/chunks`` body."""
    if len(body) < ID_SIZE or (len(body) - ID_SIZE) % ID_SIZE:
        raise ValueError("body must be a manifest id and chunk ids, 32 bytes each")
    return body[:ID_SIZE], [body[i : i + ID_SIZE] for i in range(ID_SIZE, len(body), ID_SIZE)]


def encode_delta_request(manifest_id: bytes, block: int, wants: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The body of ``POST /v1/deltas``: for each (chunk id, block digests of the base the
    requester holds at its place), asked as a delta against those blocks."""
    out = [manifest_id, DELTA_HEAD.pack(block, len(wants))]
    for cid, digests in wants:
        out.append(DELTA_ITEM.pack(cid, len(digests) // DIGEST_SIZE))
        out.append(digests)
    return b"".join(out)


def decode_delta_request(body: bytes) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
    """(manifest id, block size, [(chunk id, base digests)]) of a ``POST /v1/deltas`` body."""
    if len(body) < ID_SIZE + DELTA_HEAD.size:
        raise ValueError("truncated header")
    block, count = DELTA_HEAD.unpack_from(body, ID_SIZE)
    if block < 4096 or block > (1 << 20) or block & (block - 1):
        raise ValueError(f"block size {block} is not a power of two in [4 KiB, 1 MiB]")
    if count > MAX_DELTA_IDS:
        raise ValueError(f"{count} chunks (at most {MAX_DELTA_IDS})")
    pos = ID_SIZE + DELTA_HEAD.size
    wants: list[tuple[bytes, bytes]] = []
    for _ in range(count):
        if pos + DELTA_ITEM.size > len(body):
            raise ValueError("truncated entry")
        cid, n = DELTA_ITEM.unpack_from(body, pos)
        pos += DELTA_ITEM.size
        if n * DIGEST_SIZE + pos > len(body):
            raise ValueError("truncated digests")
        wants.append((cid, body[pos : pos + n * DIGEST_SIZE]))
        pos += n * DIGEST_SIZE
    if pos != len(body):
        raise ValueError(f"{len(body) - pos} trailing bytes")
    return body[:ID_SIZE], block, wants


def frame_head(status: int, codec: int, cid: bytes, raw: int, stored: int) -> bytes:
    """The header of one chunk frame; ``stored`` payload bytes follow it."""
    return FRAME.pack(status, codec, cid, raw, stored)


def frame_bound(plain: int) -> int:
    """The most bytes one frame may take for a chunk of ``plain`` bytes (header included)."""
    return FRAME.size + plain


@dataclass(frozen=True)
class FrameView:
    """One frame of a chunk answer. ``payload`` is shorter than ``stored`` when the answer
    ends inside it (the caller decides what a truncated frame means)."""

    status: int
    codec: int
    cid: bytes
    raw: int
    stored: int
    payload: memoryview

    @property
    def complete(self) -> bool:
        return len(self.payload) == self.stored


def iter_frames(body: bytes | memoryview) -> Iterator[FrameView]:
    """The frames of a chunk answer, in order, without copying payloads. ValueError when the
    answer ends inside a frame header."""
    mv = memoryview(body)
    pos = 0
    while pos < len(mv):
        if pos + FRAME.size > len(mv):
            raise ValueError("truncated chunk frame")
        status, codec, cid, raw, stored = FRAME.unpack_from(mv, pos)
        pos += FRAME.size
        yield FrameView(status, codec, cid, raw, stored, mv[pos : pos + stored])
        pos += stored


def json_field(body: bytes, key: str) -> object:
    """``body``'s JSON object's ``key`` (None if the body is not such an object)."""
    try:
        return json.loads(body)[key]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        return None


def error_body(reason: str) -> bytes:
    """The JSON body of a refusal: ``{"error": reason}``."""
    return json.dumps({"error": reason}).encode()


def busy_answer(reason: str, retry_after: int) -> bytes:
    """The raw 503 answer of a connection refused for want of a slot: the reason as JSON
    ``{"error": ...}`` in the body and a ``Retry-After`` header (docs/format.md)."""
    body = error_body(reason)
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        + f"Retry-After: {retry_after}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )


def retry_after(headers: Mapping[str, str], most: float) -> float | None:
    """A ``Retry-After`` of whole seconds, bounded to [0, ``most``] (None without one: an
    HTTP date or garbage counts as none)."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), "").strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 6:
        return None
    return min(float(value), most)
