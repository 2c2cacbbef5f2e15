"""Content the indexer just hashed, kept briefly for the replicas that are about to ask for it.

Every replica fetches each new version within moments of its record; without this cache the
origin would open, read and hash the same file once per replica. An entry is bytes whose BLAKE3
digest is the key, so serving it is always correct for that digest, even if the file has changed
since (a newer record then follows, exactly as if the replica had fetched a moment earlier).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

#: Default budget of cached content bytes.
HOT_BYTES = 4 << 20
#: Files larger than this are not kept.
HOT_ITEM_MAX = 1 << 20


class HotBlobs:
    """A bounded, thread-safe FIFO of digest -> content."""

    def __init__(self, max_bytes: int = HOT_BYTES, item_max: int = HOT_ITEM_MAX) -> None:
        self.max_bytes = max_bytes
        self.item_max = min(item_max, max_bytes)
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def put(self, digest: bytes, data: bytes) -> None:
        """Keep content whose digest the caller has just computed (ignored if too large)."""
        if len(data) > self.item_max or self.max_bytes <= 0:
            return
        with self._lock:
            old = self._items.pop(digest, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[digest] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def get(self, digest: bytes) -> bytes | None:
        """The content with this digest, if it is still kept."""
        with self._lock:
            data = self._items.get(digest)
        if data is None:
            self.misses += 1
        else:
            self.hits += 1
        return data

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Content bytes held."""
        return self._bytes
