"""Journal + manifest: the durable, sequenced record of every change and the current entry of every path.

The origin appends records (assigning seqs); a replica stores the records it applied with the
origin's seqs, so either can serve the same feed downstream. Backends implement `Journal`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from fleetsync.entry import Entry, Record, Row

#: Records an origin or a relaying replica keeps for its followers; older followers resync from a snapshot.
DEFAULT_RETAIN = 1_000_000


class Journal(Protocol):
    """Sequenced change log plus manifest (path -> Entry)."""

    journal_id: str

    def head(self) -> int:
        """Last sequence number (for a replica: the applied cursor)."""

    def min_seq(self) -> int:
        """Smallest seq still retained; a feed `after` below min_seq - 1 needs a snapshot resync."""

    def read(self, after: int, limit: int) -> list[Record]:
        """Records with seq > after, in order, at most limit."""

    def get(self, path: bytes) -> Entry | None:
        """Manifest entry of path."""

    def paths_with_hash(self, digest: bytes, limit: int = 4) -> list[bytes]:
        """Some manifest paths whose file content has this hash."""

    def paths_with_hashes(self, digests: list[bytes], limit: int = 4) -> dict[bytes, list[bytes]]:
        """paths_with_hash() for many digests at once (digests without a path are left out)."""

    def compact(self, keep: int) -> int:
        """Drop records older than the newest `keep`; returns how many were dropped."""

    def snapshot(self) -> tuple[int, Iterator[tuple[bytes, Entry]]]:
        """A consistent (seq, entries) view of the manifest."""

    def snapshot_rows(self, chunk: int = 2000) -> tuple[int, Iterator[list[Row]]]:
        """The same view as lists of raw manifest rows (path, kind, mode, size, mtime_ns, hash, target)."""


from fleetsync.journal.sqlite import SqliteJournal  # noqa: E402

__all__ = ["DEFAULT_RETAIN", "Journal", "SqliteJournal"]
