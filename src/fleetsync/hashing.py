"""Content hashing (BLAKE3, 32-byte digests)."""

from __future__ import annotations

import os

from blake3 import blake3

CHUNK = 1 << 20


def hash_bytes(data: bytes) -> bytes:
    """BLAKE3 digest of a byte string."""
    return blake3(data).digest()


def hash_fd(fd: int) -> tuple[bytes, int]:
    """Hash an open file from its current offset to EOF; returns (digest, bytes read)."""
    h = blake3()
    n = 0
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            return h.digest(), n
        h.update(chunk)
        n += len(chunk)


def new_hasher() -> "blake3":
    """A fresh incremental hasher."""
    return blake3()
