"""The origin protocol (version 1): what crosses the socket between a consumer and an origin.

Specified in docs/format.md ("Origin protocol"). Chunk frames are binary; everything else
is small JSON or a manifest encoding.
"""

from __future__ import annotations

import struct

PROTOCOL_VERSION = "1"
HEADER_PROTOCOL = "X-Pathapi-Protocol"
HEADER_MANIFEST_ID = "X-Manifest-Id"
#: On manifest answers: the run of the origin that produced the tree (pathapi.version).
HEADER_VERSION = "X-Pathapi-Version"

#: The most ids one chunk request may name, and the most chunk bytes a client asks for at once.
MAX_BATCH_IDS = 4096
BATCH_BYTES = 8 << 20
#: The most plain chunk bytes one answer may carry (the lengths of the ids asked for, each
#: time it is asked for): a client batch stops at BATCH_BYTES plus the chunk that crossed it
#: (max_size is at most 16 MiB). A request for more is refused (413) before anything is read.
MAX_ANSWER_BYTES = BATCH_BYTES + (16 << 20)

FRAME = struct.Struct("<BB32sII")  # status, codec, id, raw length, stored length
STATUS_OK = 0
STATUS_STALE = 1  # the file changed since the manifest: the bytes no longer hash to the id
STATUS_UNKNOWN = 2  # the id is not in that manifest
STATUS_DELTA = 3  # the payload is a block delta against the base the request described

#: Delta requests: at most this many chunks each (their digests bound the body size).
MAX_DELTA_IDS = 256
DELTA_HEAD = struct.Struct("<II")  # block size, chunk count
DELTA_ITEM = struct.Struct("<32sH")  # chunk id, number of base block digests

#: The routes an origin serves (docs/format.md, "Origin protocol").
ROUTE_MANIFEST = "/v1/manifest"
ROUTE_EXISTS = "/v1/exists"
ROUTE_CHUNKS = "/v1/chunks"
ROUTE_DELTAS = "/v1/deltas"
ROUTE_STATS = "/v1/stats"
