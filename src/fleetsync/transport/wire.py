"""Framing of the batched blob stream (see docs/protocol.md).

A response to POST /v1/blobs is, for each requested hash in request order, a frame:
32-byte digest | 1-byte status | 8-byte big-endian length | `length` bytes of content.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">32sBQ")
OK, GONE, CHANGED, TOO_LARGE = 0, 1, 2, 3
STATUS_NAMES = {OK: "ok", GONE: "gone", CHANGED: "changed", TOO_LARGE: "too large"}
#: Blobs up to this size travel in batched streams; larger ones are fetched singly with Range.
BATCH_BLOB_MAX = 4 << 20
#: At most this many hashes per batch request.
BATCH_MAX_HASHES = 10000
API = "/v1"


def frame_header(digest: bytes, status: int, length: int) -> bytes:
    """Header of one frame."""
    return HEADER.pack(digest, status, length)
