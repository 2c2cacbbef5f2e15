"""SQLite (WAL) journal and manifest; the embedded default backend."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from fleetsync import paths
from fleetsync.entry import DELETE, DIR, FILE, LINK, MOVE, PUT, Entry, Record, Row, row_of
from fleetsync.journal.checkpoint import AUTOCHECKPOINT_PAGES, Checkpointer

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, op TEXT NOT NULL, path BLOB NOT NULL, old BLOB,
    kind TEXT, mode INTEGER, size INTEGER, mtime INTEGER, hash BLOB, target BLOB, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS manifest (
    path BLOB PRIMARY KEY, kind TEXT NOT NULL, mode INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime INTEGER NOT NULL, hash BLOB, target BLOB, ino INTEGER, ctime INTEGER, seq INTEGER NOT NULL
) WITHOUT ROWID;
"""
#: Lookups by content hash (replicas: local reuse and serving relays; not kept on the origin, whose
#: blob requests name the path) and by origin inode (no longer used; dropped where found).
CONTENT_INDEX = "CREATE INDEX IF NOT EXISTS manifest_hash ON manifest(hash) WHERE hash IS NOT NULL"

_ENTRY_COLS = "kind, mode, size, mtime, hash, target"
#: Page cache of a journal connection (KiB).
CACHE_KIB = 20000
#: Page cache while a snapshot is installed: it also bounds the sorter that builds the hash index
#: (with the full cache it held 20 MB more at 1M entries, enough to push a replica past 100 MB).
INSTALL_CACHE_KIB = 4000


def _entry(row: tuple) -> Entry:
    kind, mode, size, mtime, h, target = row
    return Entry(kind, mode, size or 0, mtime or 0, h, target)


def _follow(path: bytes, old: bytes, new: bytes) -> bytes:
    """Where path is after old was renamed to new."""
    return paths.rebase(path, old, new) if paths.is_under(path, old) else path


def _subtree_bounds(path: bytes) -> tuple[bytes, bytes]:
    """Half-open BLOB range [lo, hi) holding exactly the strict descendants of path."""
    return path + b"/", path + b"0"


@dataclass(frozen=True, slots=True)
class LocalStat:
    """Origin-side identity of a file used to skip re-hashing (never sent on the wire)."""

    ino: int
    ctime_ns: int


@dataclass(slots=True)
class Change:
    """A change to commit on the origin: the journal assigns its seq."""

    op: str
    path: bytes
    entry: Entry | None = None
    old_path: bytes | None = None
    local: LocalStat | None = None


class SqliteJournal:
    """Journal + manifest in one SQLite database in WAL mode."""

    def __init__(self, db_path: str, *, durable: bool = True, content_index: bool | None = None) -> None:
        """Open (or create) the database.

        content_index: keep the manifest's hash index (True), drop it (False: the origin, where
        every change would otherwise touch a random page of it), or keep what the database has
        (None: other connections to the same database).
        """
        os.makedirs(os.path.dirname(os.path.abspath(db_path)), exist_ok=True)
        self.db_path = db_path
        self.db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        sync = "FULL" if durable else "NORMAL"
        self.db.execute(f"PRAGMA synchronous={sync}")
        self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        # Commits wake a thread that checkpoints the WAL (see checkpoint.py), not wait for one.
        self.db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        self.checkpointer = Checkpointer(db_path, sync)
        self.db.executescript(SCHEMA)
        self._lock = threading.RLock()
        if content_index is not None or self.meta("content_index") is None:
            want = content_index is not False
            self.db.execute("DROP INDEX IF EXISTS manifest_ino")
            self.db.execute(CONTENT_INDEX if want else "DROP INDEX IF EXISTS manifest_hash")
            self.set_meta("content_index", "1" if want else "0")
        self.has_content_index: bool = self.meta("content_index") == "1"
        jid = self.meta("journal_id")
        if jid is None:
            jid = uuid.uuid4().hex
            self.set_meta("journal_id", jid)
        self.journal_id: str = jid
        self._head = int(self.meta("head") or 0)
        self._min = int(self.meta("min_seq") or 1)
        entries = self.meta("entries")
        if entries is None:  # a database from before the counter: count once
            entries = str(self.db.execute("SELECT count(*) FROM manifest").fetchone()[0])
            self.set_meta("entries", entries)
        self._count = int(entries)
        self._delta = 0

    # -- meta ------------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        """Read a meta value."""
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        """Write a meta value (autocommit)."""
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def set_journal_id(self, jid: str) -> None:
        """Adopt an upstream's journal identity (replicas/relays)."""
        self.set_meta("journal_id", jid)
        self.journal_id = jid

    # -- reads -----------------------------------------------------------------------------------
    def head(self) -> int:
        """Last sequence number."""
        return self._head

    def min_seq(self) -> int:
        """Smallest retained seq."""
        return self._min

    def read(self, after: int, limit: int) -> list[Record]:
        """Records after a seq."""
        rows = self.db.execute(
            f"SELECT seq, op, path, old, {_ENTRY_COLS}, ts FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        ).fetchall()
        out = []
        for seq, op, path, old, kind, mode, size, mtime, h, target, ts in rows:
            e = _entry((kind, mode, size, mtime, h, target)) if kind is not None else None
            out.append(Record(seq, op, path, e, old, ts))
        return out

    def record_ts(self, seq: int) -> float | None:
        """Commit time of the record at seq, if retained."""
        row = self.db.execute("SELECT ts FROM records WHERE seq=?", (seq,)).fetchone()
        return row[0] if row else None

    def get(self, path: bytes) -> Entry | None:
        """Manifest entry of path."""
        row = self.db.execute(f"SELECT {_ENTRY_COLS} FROM manifest WHERE path=?", (path,)).fetchone()
        return _entry(row) if row else None

    def get_with_local(self, path: bytes) -> tuple[Entry, LocalStat | None] | None:
        """Manifest entry plus the origin-local stat identity."""
        row = self.db.execute(
            f"SELECT {_ENTRY_COLS}, ino, ctime FROM manifest WHERE path=?", (path,)
        ).fetchone()
        if not row:
            return None
        local = LocalStat(row[6], row[7]) if row[6] is not None else None
        return _entry(row[:6]), local

    def children(self, path: bytes, kind: str | None = None) -> list[bytes]:
        """Direct children names of a directory path in the manifest (b'' is the root), optionally of one kind."""
        where, args = ("AND kind = ?", (kind,)) if kind else ("", ())
        if path:
            lo, hi = _subtree_bounds(path)
            rows = self.db.execute(f"SELECT path FROM manifest WHERE path >= ? AND path < ? {where}", (lo, hi, *args))
            plen = len(lo)
        else:
            rows = self.db.execute(f"SELECT path FROM manifest WHERE 1 {where}", args)
            plen = 0
        return [p[plen:] for (p,) in rows if b"/" not in p[plen:]]

    def subtree(self, path: bytes) -> list[tuple[bytes, Entry]]:
        """Path and all its descendants with entries."""
        lo, hi = _subtree_bounds(path)
        rows = self.db.execute(
            f"SELECT path, {_ENTRY_COLS} FROM manifest WHERE path = ? OR (path >= ? AND path < ?)",
            (path, lo, hi),
        ).fetchall()
        return [(r[0], _entry(r[1:])) for r in rows]

    def paths_with_hash(self, digest: bytes, limit: int = 4) -> list[bytes]:
        """Paths whose content has this hash ([] without the hash index: never a full scan)."""
        if not self.has_content_index:
            return []
        rows = self.db.execute("SELECT path FROM manifest WHERE hash=? LIMIT ?", (digest, limit))
        return [r[0] for r in rows]

    def paths_with_hashes(self, digests: list[bytes], limit: int = 4) -> dict[bytes, list[bytes]]:
        """paths_with_hash() for many digests in a few statements (digests without a path are left out)."""
        out: dict[bytes, list[bytes]] = {}
        if not self.has_content_index:
            return out
        for i in range(0, len(digests), 500):
            chunk = digests[i:i + 500]
            rows = self.db.execute(
                "SELECT hash, path FROM (SELECT hash, path, row_number() OVER (PARTITION BY hash) AS n "
                f"FROM manifest WHERE hash IN ({','.join('?' * len(chunk))})) WHERE n <= ?", (*chunk, limit))
            for h, path in rows:
                out.setdefault(h, []).append(path)
        return out

    def get_many(self, paths: list[bytes]) -> dict[bytes, Entry]:
        """get() for many paths in a few statements (absent paths are left out)."""
        return {p: e for p, (e, _) in self.get_many_with_local(paths).items()}

    def empty(self) -> bool:
        """True if the manifest has no entries (O(1), unlike count())."""
        return self.db.execute("SELECT 1 FROM manifest LIMIT 1").fetchone() is None

    def count(self) -> int:
        """Number of manifest entries (O(1): kept in `meta` by every write)."""
        return self._count

    def get_many_with_local(self, paths: list[bytes]) -> dict[bytes, tuple[Entry, LocalStat | None]]:
        """get_with_local() for many paths in a few statements (absent paths are left out)."""
        out: dict[bytes, tuple[Entry, LocalStat | None]] = {}
        for i in range(0, len(paths), 500):
            chunk = paths[i:i + 500]
            rows = self.db.execute(
                f"SELECT path, {_ENTRY_COLS}, ino, ctime FROM manifest WHERE path IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for r in rows:
                out[r[0]] = (_entry(r[1:7]), LocalStat(r[7], r[8]) if r[7] is not None else None)
        return out

    def iter_local(self, top: bytes = b"") -> Iterator[tuple[bytes, Entry, LocalStat | None]]:
        """Manifest rows at and under top (b'' = all) with local stat identity, in path byte order."""
        cur = self.db.cursor()
        if top:
            lo, hi = _subtree_bounds(top)
            cur.execute(f"SELECT path, {_ENTRY_COLS}, ino, ctime FROM manifest "
                        "WHERE path = ? OR (path >= ? AND path < ?) ORDER BY path", (top, lo, hi))
        else:
            cur.execute(f"SELECT path, {_ENTRY_COLS}, ino, ctime FROM manifest ORDER BY path")
        while rows := cur.fetchmany(5000):
            for r in rows:
                yield r[0], _entry(r[1:7]), (LocalStat(r[7], r[8]) if r[7] is not None else None)

    def snapshot(self) -> tuple[int, Iterator[tuple[bytes, Entry]]]:
        """A consistent view on a private connection: (seq, iterator over all entries)."""
        seq, chunks = self.snapshot_rows()
        return seq, ((r[0], _entry(r[1:])) for rows in chunks for r in rows)

    def snapshot_rows(self, chunk: int = 2000) -> tuple[int, Iterator[list[Row]]]:
        """A consistent view on a private connection: (seq, iterator over lists of raw manifest rows)."""
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN")
        seq = int((conn.execute("SELECT value FROM meta WHERE key='head'").fetchone() or ("0",))[0])

        def rows() -> Iterator[list[Row]]:
            try:
                cur = conn.execute(f"SELECT path, {_ENTRY_COLS} FROM manifest ORDER BY path")
                while batch := cur.fetchmany(chunk):
                    yield batch
            finally:
                conn.execute("COMMIT")
                conn.close()

        return seq, rows()

    # -- writes ----------------------------------------------------------------------------------
    def commit(self, changes: Iterable[Change], now: float | None = None,
               unresolved: list[Change] | None = None,
               parent: Callable[[bytes], Entry | None] | None = None,
               misplaced: list[tuple[Change, bytes, bytes]] | None = None,
               touched: Iterable[tuple[bytes, LocalStat]] = ()) -> list[Record]:
        """Origin: assign seqs to changes, append them and update the manifest in one transaction.

        `touched` (path, stat identity) pairs refresh the identity of unchanged files in the same
        transaction (no record), so re-hashing them can be skipped next time.

        A MOVE without an entry takes the manifest entry of its old path at that point of the
        transaction; if the manifest has no such path the move is skipped and, when given,
        appended to `unresolved`. A MOVE onto a path that has descendants at that point (a
        rename cannot replace a non-empty directory on disk, so a hint was placed wrong) is
        applied and also appended to `unresolved`: the caller compares the destination with the disk.

        With `parent`, a MOVE's destination directories the manifest lacks at that point (an
        earlier move of the same transaction may have made them) are first recorded with the
        entry `parent(path)` gives; where it gives None the move is skipped and appended to
        `misplaced` with where its source and its destination are after the later moves of the
        transaction (a later move of a directory above the source carries the source's entry).
        """
        ts = time.time() if now is None else now
        out: list[Record] = []
        lost: list[tuple[Change, bytes, bytes]] = []  # misplaced moves: (change, source now, destination now)
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._head
                for ch in changes:
                    entry = ch.entry
                    if ch.op == MOVE and lost:
                        assert ch.old_path is not None
                        lost = [(m, _follow(src, ch.old_path, ch.path), _follow(dst, ch.old_path, ch.path))
                                for m, src, dst in lost]
                    if ch.op == MOVE and entry is None:
                        assert ch.old_path is not None
                        entry = self.get(ch.old_path)
                        if entry is None or ch.old_path == ch.path:
                            if unresolved is not None and entry is None:
                                unresolved.append(ch)
                            continue
                    if ch.op == MOVE and parent is not None:
                        made = self._missing_dirs(ch.path, parent)
                        if made is None:
                            lost.append((ch, ch.old_path, ch.path))
                            continue
                        for anc, e in made:
                            seq += 1
                            rec = Record(seq, PUT, anc, e, None, ts)
                            self._append(rec)
                            self._apply_manifest(rec, None)
                            out.append(rec)
                    if ch.op == MOVE and unresolved is not None and self._has_descendants(ch.path):
                        unresolved.append(ch)
                    seq += 1
                    rec = Record(seq, ch.op, ch.path, entry, ch.old_path, ts)
                    self._append(rec)
                    self._apply_manifest(rec, ch.local)
                    out.append(rec)
                for path, local in touched:
                    self._touch(path, local)
                if out:
                    self._set_head(seq)
                self._save_count()
                self._commit_tx()
            except BaseException:
                self._rollback()
                raise
        if misplaced is not None:
            misplaced.extend(lost)
        return out

    def _missing_dirs(self, path: bytes, parent: Callable[[bytes], Entry | None]
                      ) -> list[tuple[bytes, Entry]] | None:
        """Inside a write transaction: the ancestors of path the manifest lacks (or holds as
        non-directories), outermost first, each with its entry from `parent`; None if one has none."""
        missing: list[bytes] = []
        p = paths.parent(path)
        while p:
            cur = self.get(p)
            if cur is not None and cur.kind == DIR:
                break  # the manifest holds every ancestor of a directory it holds
            missing.append(p)
            p = paths.parent(p)
        out: list[tuple[bytes, Entry]] = []
        for anc in reversed(missing):
            e = parent(anc)
            if e is None:
                return None
            out.append((anc, e))
        return out

    def _touch(self, path: bytes, local: LocalStat) -> None:
        """Inside a write transaction: refresh the stat identity of an unchanged file (no record)."""
        if not self.db.execute("UPDATE manifest SET ctime=? WHERE path=? AND ino=?",
                               (local.ctime_ns, path, local.ino)).rowcount:
            self.db.execute("UPDATE manifest SET ino=?, ctime=? WHERE path=?", (local.ino, local.ctime_ns, path))

    def apply_records(self, records: list[Record], head: int | None = None,
                      meta: dict[str, str | None] | None = None) -> None:
        """Replica: store records applied with the upstream's seqs and advance head, atomically.

        `meta` values are set (or deleted where None) in the same transaction.
        """
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for key, value in (meta or {}).items():
                    if value is None:
                        self.db.execute("DELETE FROM meta WHERE key=?", (key,))
                    else:
                        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
                for rec in records:
                    self._append(rec)
                    self._apply_manifest(rec, None)
                new_head = head if head is not None else (records[-1].seq if records else self._head)
                self._set_head(max(new_head, self._head))
                self._save_count()
                self._commit_tx()
            except BaseException:
                self._rollback()
                raise

    def compact(self, keep: int) -> int:
        """Drop records older than the newest `keep`; returns how many were dropped."""
        cutoff = self._head - keep
        if cutoff < self._min:
            return 0
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            n = self.db.execute("DELETE FROM records WHERE seq <= ?", (cutoff,)).rowcount
            self._min = cutoff + 1
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('min_seq', ?)", (str(self._min),))
            self.db.execute("COMMIT")
        self.checkpointer.kick()
        return n

    def _has_descendants(self, path: bytes) -> bool:
        lo, hi = _subtree_bounds(path)
        return self.db.execute("SELECT 1 FROM manifest WHERE path >= ? AND path < ? LIMIT 1", (lo, hi)).fetchone() is not None

    def close(self) -> None:
        """Close the database (after the checkpoint thread stopped)."""
        self.checkpointer.close()
        self.db.close()

    # -- internals -------------------------------------------------------------------------------
    def _save_count(self) -> None:
        """Inside a write transaction: persist the entry count changed by this transaction."""
        if self._delta:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('entries', ?)", (str(self._count + self._delta),))

    def _commit_tx(self) -> None:
        """COMMIT, then adopt the transaction's entry count."""
        self.db.execute("COMMIT")
        self._count += self._delta
        self._delta = 0
        self.checkpointer.kick()

    def _rollback(self) -> None:
        self.db.execute("ROLLBACK")
        self._head = int(self.meta("head") or 0)
        self._delta = 0

    def _set_head(self, seq: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('head', ?)", (str(seq),))
        self._head = seq

    def _append(self, rec: Record) -> None:
        e = rec.entry
        self.db.execute(
            "INSERT OR REPLACE INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (rec.seq, rec.op, rec.path, rec.old_path,
             e.kind if e else None, e.mode if e else None, e.size if e else None,
             e.mtime_ns if e else None, e.hash if e else None, e.target if e else None, rec.ts),
        )

    def _delete_tree(self, path: bytes) -> None:
        lo, hi = _subtree_bounds(path)
        n = self.db.execute("DELETE FROM manifest WHERE path = ? OR (path >= ? AND path < ?)", (path, lo, hi)).rowcount
        self._delta -= n

    def _apply_manifest(self, rec: Record, local: LocalStat | None) -> None:
        if rec.op == DELETE:
            self._delete_tree(rec.path)
            return
        if rec.op == MOVE:
            old = rec.old_path
            assert old is not None
            if old != rec.path:
                self._delete_tree(rec.path)
                lo, hi = _subtree_bounds(old)
                self.db.execute("UPDATE manifest SET path=? WHERE path=?", (rec.path, old))
                self.db.execute(
                    "UPDATE manifest SET path = CAST(? || substr(path, ?) AS BLOB) WHERE path >= ? AND path < ?",
                    (rec.path, len(old) + 1, lo, hi),
                )
            if rec.entry is None:
                return
        e = rec.entry
        assert e is not None
        prev = self.db.execute("SELECT kind, ino, ctime FROM manifest WHERE path=?", (rec.path,)).fetchone()
        if prev and prev[0] == DIR and e.kind != DIR:
            self._delete_tree(rec.path)
            prev = None
        if prev is None:
            self._delta += 1
        if local is None:
            ino, ctime = (prev[1], prev[2]) if rec.op == MOVE and prev else (None, None)
        else:
            ino, ctime = local.ino, local.ctime_ns
        cols = (e.kind, e.mode, e.size if e.kind == FILE else 0, e.mtime_ns if e.kind == FILE else 0,
                e.hash if e.kind == FILE else None, e.target if e.kind == LINK else None)
        if prev is None:
            self.db.execute("INSERT INTO manifest VALUES (?,?,?,?,?,?,?,?,?,?)", (rec.path, *cols, ino, ctime, rec.seq))
        elif prev[1] == ino:
            # Same inode (an in-place edit): leave the inode index alone, it is one random b-tree
            # page per change on a large manifest.
            self.db.execute("UPDATE manifest SET kind=?, mode=?, size=?, mtime=?, hash=?, target=?, ctime=?, seq=? "
                            "WHERE path=?", (*cols, ctime, rec.seq, rec.path))
        else:
            self.db.execute("UPDATE manifest SET kind=?, mode=?, size=?, mtime=?, hash=?, target=?, ino=?, ctime=?, "
                            "seq=? WHERE path=?", (*cols, ino, ctime, rec.seq, rec.path))




class SnapshotStage:
    """A manifest snapshot streamed into the database (bounded memory), then diffed and installed."""

    def __init__(self, journal: SqliteJournal, seq: int = 0) -> None:
        """Start an empty staging table with the manifest's columns (it becomes the manifest at install)."""
        self.j = journal
        db = journal.db
        db.execute("DROP TABLE IF EXISTS snap")
        db.execute("CREATE TABLE snap (path BLOB PRIMARY KEY, kind TEXT NOT NULL, mode INTEGER NOT NULL, "
                   "size INTEGER NOT NULL, mtime INTEGER NOT NULL, hash BLOB, target BLOB, ino INTEGER, "
                   f"ctime INTEGER, seq INTEGER NOT NULL DEFAULT {int(seq)}) WITHOUT ROWID")

    def add(self, rows: list[tuple[bytes, Entry]]) -> None:
        """Append snapshot entries."""
        self.add_rows([row_of(p, e) for p, e in rows])

    def add_rows(self, rows: list[Row]) -> None:
        """Append snapshot rows (path, kind, mode, size, mtime_ns, hash, target)."""
        with self.j._lock:
            self.j.db.execute("BEGIN")
            self.j.db.executemany("INSERT OR REPLACE INTO snap (path, kind, mode, size, mtime, hash, target) "
                                  "VALUES (?,?,?,?,?,?,?)", rows)
            self.j.db.execute("COMMIT")
        self.j.checkpointer.kick()

    def iter(self) -> Iterator[tuple[bytes, Entry]]:
        """Entries in path order (parents before children)."""
        cur = self.j.db.cursor()
        cur.execute(f"SELECT path, {_ENTRY_COLS} FROM snap ORDER BY path")
        while rows := cur.fetchmany(2000):
            for r in rows:
                yield r[0], _entry(r[1:])

    def contains(self, path: bytes) -> bool:
        """True if the snapshot has path."""
        return self.j.db.execute("SELECT 1 FROM snap WHERE path=?", (path,)).fetchone() is not None

    def manifest_extras(self) -> list[bytes]:
        """Manifest paths absent from the snapshot (to delete), shallowest first."""
        rows = self.j.db.execute(
            "SELECT path FROM manifest WHERE path NOT IN (SELECT path FROM snap) ORDER BY path").fetchall()
        return [r[0] for r in rows]

    def unchanged(self, path: bytes, e: Entry) -> bool:
        """True if the current manifest already has exactly this entry for path."""
        return self.j.get(path) == e

    def install(self, seq: int, journal_id: str) -> None:
        """Make the snapshot the manifest at seq (records before it are gone).

        The staging table is renamed into place and the hash index built once, sorted, instead of
        copying every row into the old table (100k entries: 0.3 -> 0.1 s; 1M: 6.8 -> 1.2 s).
        """
        j = self.j
        with j._lock:
            j.db.execute(f"PRAGMA cache_size=-{INSTALL_CACHE_KIB}")
            j.db.execute("BEGIN IMMEDIATE")
            try:
                j.db.execute("DELETE FROM records")
                j.db.execute("DROP TABLE manifest")
                j.db.execute("ALTER TABLE snap RENAME TO manifest")
                if j.has_content_index:
                    j.db.execute(CONTENT_INDEX)
                n = j.db.execute("SELECT count(*) FROM manifest").fetchone()[0]
                j.db.execute("INSERT OR REPLACE INTO meta VALUES ('entries', ?)", (str(n),))
                j._set_head(seq)
                j._min = seq + 1
                for k, v in (("min_seq", str(j._min)), ("journal_id", journal_id), ("bootstrapped", "1")):
                    j.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, v))
                j.db.execute("COMMIT")
            except BaseException:
                j._rollback()
                raise
            finally:
                j.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        j.checkpointer.kick()
        j._count = n
        j.journal_id = journal_id


__all__ = ["SqliteJournal", "SnapshotStage", "Change", "LocalStat", "PUT", "DELETE", "MOVE"]
