"""Content the indexer just hashed, kept briefly for the replicas that are about to ask for it.

Every replica fetches each new version within moments of its record; without this cache the
origin would open, read and hash the same file once per replica. An entry is bytes whose BLAKE3
digest is the key, so serving it is always correct for that digest, even if the file has changed
since (a newer record then follows, exactly as if the replica had fetched a moment earlier).

The budget covers the content of the commits three replicas are fetching at once in a
1,000-change round (measured: 4 MiB answered 35-65 % of a round's blob requests, 8 MiB 80-97 %,
16 and 32 MiB 99.7 %; the rest is read and hashed again once per replica). A burst fills it, which
costs about 20 MB of peak RSS at 16 MiB (about 40-75 MB at 32 MiB). Content the indexer pre-hashed
when its writer closed the file waits here for its batch too (one budget for both: a separate
16 MiB for pre-hashes raised a 20k-file burst's origin peak by 12-20 MB and no round's hit rate).
Entries expire after `ttl` seconds, so an idle origin holds nothing; the indexer does not fill the
cache while it walks the tree (an initial index would only churn it).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

#: Default budget of cached content bytes.
HOT_BYTES = 16 << 20
#: Budget of the server's second cache: content it read from disk on a miss, kept for the next
#: replica's request. Replicas bootstrapping together ask for the same content moments apart.
#: Kept in the indexer's HOT_BYTES instead, a bootstrap's reads pushed the indexer's content out
#: and the origin's peak while it served three 1M-file bootstraps rose 39-41 MB over idle, against
#: 26-28 MB with this budget (bench/serve_memory.py, BENCHMARKS.md, fifteenth session).
MISS_BYTES = 4 << 20
#: Files larger than this are not kept.
HOT_ITEM_MAX = 1 << 20
#: Seconds an entry is kept (replicas that follow ask for new content within moments).
HOT_TTL = 10.0


class HotBlobs:
    """A bounded, thread-safe FIFO of digest -> content whose entries expire after ttl seconds."""

    def __init__(self, max_bytes: int = HOT_BYTES, item_max: int = HOT_ITEM_MAX, ttl: float = HOT_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.item_max = min(item_max, max_bytes)
        self.ttl = ttl
        self._clock = clock
        self._items: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def put(self, digest: bytes, data: bytes) -> None:
        """Keep content whose digest the caller has just computed (ignored if too large)."""
        if len(data) > self.item_max or self.max_bytes <= 0:
            return
        now = self._clock()
        with self._lock:
            old = self._items.pop(digest, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._items[digest] = (data, now)
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, (dropped, _) = self._items.popitem(last=False)
                self._bytes -= len(dropped)
            self._expire(now)

    def get(self, digest: bytes) -> bytes | None:
        """The content with this digest, if it is still kept."""
        with self._lock:
            item = self._items.get(digest)
        if item is None or item[1] < self._clock() - self.ttl:
            self.misses += 1
            return None
        self.hits += 1
        return item[0]

    def touch(self, digest: bytes) -> None:
        """Make a kept entry the newest (its content is about to be asked for), if it is still kept."""
        with self._lock:
            item = self._items.get(digest)
            if item is not None:
                self._items[digest] = (item[0], self._clock())
                self._items.move_to_end(digest)

    def expire(self) -> None:
        """Drop entries older than ttl (called now and then, so an idle origin holds nothing)."""
        with self._lock:
            self._expire(self._clock())

    def _expire(self, now: float) -> None:
        limit = now - self.ttl
        while self._items:
            digest, (data, t) = next(iter(self._items.items()))
            if t >= limit:
                break
            del self._items[digest]
            self._bytes -= len(data)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Content bytes held."""
        return self._bytes
