"""The origin protocol (version 1): what crosses the socket between a consumer and an origin.

Specified in docs/format.md ("Origin protocol"). Chunk frames are binary; everything else
is small JSON or a manifest encoding.
"""

from __future__ import annotations

import struct

PROTOCOL_VERSION = "1"
HEADER_PROTOCOL = "X-Pathapi-Protocol"
HEADER_MANIFEST_ID = "X-Manifest-Id"

#: The most ids one chunk request may name, and the most chunk bytes a client asks for at once.
MAX_BATCH_IDS = 4096
BATCH_BYTES = 8 << 20

FRAME = struct.Struct("<BB32sII")  # status, codec, id, raw length, stored length
STATUS_OK = 0
STATUS_STALE = 1  # the file changed since the manifest: the bytes no longer hash to the id
STATUS_UNKNOWN = 2  # the id is not in that manifest
