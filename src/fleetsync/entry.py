"""Entries (what a path is) and journal records (what happened to a path)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

from fleetsync import paths
from fleetsync.errors import FleetsyncError

FILE, DIR, LINK = "f", "d", "l"
PUT, DELETE, MOVE = "put", "del", "mv"
HASH_LEN = 32


@dataclass(frozen=True, slots=True)
class Entry:
    """The replicated state of one path: kind, mode bits, and content identity."""

    kind: str
    mode: int
    size: int = 0
    mtime_ns: int = 0
    hash: bytes | None = None
    target: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready form."""
        d: dict[str, Any] = {"k": self.kind, "m": self.mode}
        if self.kind == FILE:
            d["s"] = self.size
            d["t"] = self.mtime_ns
            d["h"] = self.hash.hex() if self.hash else None
        elif self.kind == LINK:
            d["l"] = paths.encode(self.target or b"")
        return d

    @classmethod
    def from_wire(cls, d: Any) -> "Entry":
        """Parse and validate the JSON form."""
        if not isinstance(d, dict):
            raise FleetsyncError(f"entry must be an object, got {type(d).__name__}")
        kind = d.get("k")
        mode = d.get("m")
        if kind not in (FILE, DIR, LINK) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise FleetsyncError(f"bad entry kind/mode: {d!r:.200}")
        if kind == FILE:
            size, mtime, h = d.get("s"), d.get("t"), d.get("h")
            if not isinstance(size, int) or size < 0 or not isinstance(mtime, int):
                raise FleetsyncError(f"bad file entry: {d!r:.200}")
            try:
                hb = bytes.fromhex(h)
            except (TypeError, ValueError):
                raise FleetsyncError(f"bad hash in entry: {d!r:.200}") from None
            if len(hb) != HASH_LEN:
                raise FleetsyncError(f"bad hash length in entry: {d!r:.200}")
            return cls(FILE, mode, size, mtime, hb)
        if kind == LINK:
            target = paths.decode(d.get("l", ""))
            if not target or b"\0" in target or len(target) > paths.MAX_PATH:
                raise FleetsyncError(f"bad symlink target in entry: {d!r:.200}")
            return cls(LINK, mode, target=target)
        return cls(DIR, mode)

    def same_content(self, other: "Entry | None") -> bool:
        """True if other has the same kind and bytes/target (mode and mtime may differ)."""
        if other is None or other.kind != self.kind:
            return False
        if self.kind == FILE:
            return self.hash == other.hash and self.size == other.size
        if self.kind == LINK:
            return self.target == other.target
        return True


#: A manifest row as the snapshot carries it: (path, kind, mode, size, mtime_ns, hash, target).
Row = tuple[bytes, str, int, int, int, "bytes | None", "bytes | None"]


def row_to_wire(row: Row) -> list[Any]:
    """Compact JSON form of a manifest row: [path, kind, mode] plus size, mtime, hash (files) or target (links)."""
    path, kind, mode, size, mtime, h, target = row
    if kind == FILE:
        return [paths.encode(path), kind, mode, size, mtime, h.hex() if h else None]
    if kind == LINK:
        return [paths.encode(path), kind, mode, paths.encode(target or b"")]
    return [paths.encode(path), kind, mode]


def row_from_wire(x: Any) -> Row:
    """Parse and validate a compact row (the same rules as Entry.from_wire; the path is confined)."""
    if not isinstance(x, list) or len(x) < 3:
        raise FleetsyncError(f"snapshot row must be a list [path, kind, mode, ...], got {x!r:.200}")
    path = paths.decode_checked(x[0])
    kind, mode = x[1], x[2]
    if kind not in (FILE, DIR, LINK) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise FleetsyncError(f"bad row kind/mode: {x!r:.200}")
    if kind == FILE:
        if len(x) != 6 or not isinstance(x[3], int) or x[3] < 0 or not isinstance(x[4], int):
            raise FleetsyncError(f"bad file row: {x!r:.200}")
        try:
            hb = bytes.fromhex(x[5])
        except (TypeError, ValueError):
            raise FleetsyncError(f"bad hash in row: {x!r:.200}") from None
        if len(hb) != HASH_LEN:
            raise FleetsyncError(f"bad hash length in row: {x!r:.200}")
        return (path, FILE, mode, x[3], x[4], hb, None)
    if kind == LINK:
        target = paths.decode(x[3]) if len(x) == 4 else b""
        if not target or b"\0" in target or len(target) > paths.MAX_PATH:
            raise FleetsyncError(f"bad symlink target in row: {x!r:.200}")
        return (path, LINK, mode, 0, 0, None, target)
    if len(x) != 3:
        raise FleetsyncError(f"bad directory row: {x!r:.200}")
    return (path, DIR, mode, 0, 0, None, None)


def row_of(path: bytes, e: Entry) -> Row:
    """The manifest row of (path, entry)."""
    return (path, e.kind, e.mode, e.size, e.mtime_ns, e.hash, e.target)


def entry_of(row: Row) -> Entry:
    """The entry of a manifest row."""
    return Entry(row[1], row[2], row[3] or 0, row[4] or 0, row[5], row[6])


@dataclass(frozen=True, slots=True)
class Record:
    """One journal record: at seq, op happened to path (moved from old_path for 'mv')."""

    seq: int
    op: str
    path: bytes
    entry: Entry | None = None
    old_path: bytes | None = None
    ts: float = field(default=0.0, compare=False)

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready form."""
        d: dict[str, Any] = {"seq": self.seq, "op": self.op, "path": paths.encode(self.path), "ts": self.ts}
        if self.entry is not None:
            d["e"] = self.entry.to_wire()
        if self.old_path is not None:
            d["old"] = paths.encode(self.old_path)
        return d

    @classmethod
    def from_wire(cls, d: Any) -> "Record":
        """Parse and validate a record received from an upstream (paths are confined)."""
        if not isinstance(d, dict):
            raise FleetsyncError("record must be an object")
        seq, op = d.get("seq"), d.get("op")
        if not isinstance(seq, int) or seq <= 0 or op not in (PUT, DELETE, MOVE):
            raise FleetsyncError(f"bad record header: {d!r:.200}")
        path = paths.decode_checked(d.get("path"))
        entry = Entry.from_wire(d["e"]) if d.get("e") is not None else None
        old = paths.decode_checked(d["old"]) if d.get("old") is not None else None
        if op == PUT and entry is None:
            raise FleetsyncError(f"put record {seq} without entry")
        if op == MOVE and old is None:
            raise FleetsyncError(f"move record {seq} without old path")
        ts = d.get("ts", 0.0)
        return cls(seq, op, path, entry, old, float(ts) if isinstance(ts, (int, float)) else 0.0)


def entry_from_stat(st: os.stat_result, hash_: bytes | None = None, target: bytes | None = None) -> Entry:
    """Build an Entry from an lstat result (hash/target supplied by the caller)."""
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        return Entry(FILE, mode, st.st_size, st.st_mtime_ns, hash_)
    if stat.S_ISDIR(st.st_mode):
        return Entry(DIR, mode)
    if stat.S_ISLNK(st.st_mode):
        return Entry(LINK, 0o777, target=target)
    raise FleetsyncError(f"unsupported file type {stat.filemode(st.st_mode)}")


def kind_of(st: os.stat_result) -> str | None:
    """Kind letter for an lstat result, or None for unsupported types (fifos, sockets, devices)."""
    if stat.S_ISREG(st.st_mode):
        return FILE
    if stat.S_ISDIR(st.st_mode):
        return DIR
    if stat.S_ISLNK(st.st_mode):
        return LINK
    return None
