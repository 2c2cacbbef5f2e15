"""Framing of the batched blob stream (see docs/protocol.md).

A response to POST /v1/blobs is, for each requested hash in request order, a frame:
32-byte digest | 1-byte status | 8-byte big-endian length | `length` bytes of content.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">32sBQ")
OK, GONE, CHANGED, TOO_LARGE = 0, 1, 2, 3
STATUS_NAMES = {OK: "ok", GONE: "gone", CHANGED: "changed", TOO_LARGE: "too large"}
#: Blobs up to this size travel in batched streams; larger ones are fetched singly with Range
#: (zero-copy on the server). At 4 MiB the 1-4 MiB files of a burst were read into memory once per
#: replica and stream: the origin's peak RSS after a 20k-file burst at 100k files was 195-209 MB,
#: 161-167 MB at 1 MiB, with the same convergence time and round time (BENCHMARKS.md, seventeenth
#: session). It equals the hot cache's item size. Servers and clients of either value work together:
#: a server answers a larger blob with "too large" and the client fetches it singly.
BATCH_BLOB_MAX = 1 << 20
#: At most this many hashes per batch request.
BATCH_MAX_HASHES = 10000
API = "/v1"


def frame_header(digest: bytes, status: int, length: int) -> bytes:
    """Header of one frame."""
    return HEADER.pack(digest, status, length)
