"""WAL checkpoints on a thread and connection of their own, so that a commit does not wait for one.

SQLite's automatic checkpoint runs inside the commit that crosses its threshold (1,000 pages by
default): it copies the WAL's pages into the database file and, with `synchronous` NORMAL or FULL,
syncs both files, on the committing thread. For a replica that is one commit in two or three of a
1,000-change round, each on the path of the changes still arriving. Here every commit only wakes a
thread that runs a PASSIVE checkpoint (it never blocks a reader or the writer) right after a
commit, at most once per `interval` seconds; the WAL starts over at the first write after a
checkpoint that copied all of it, so the checkpoint aims at the gap between two commits. The connection's own automatic checkpoint stays on at a much higher threshold, in case the
thread cannot keep up.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

log = logging.getLogger("fleetsync.journal")

#: Seconds between background checkpoints while commits keep coming.
CHECKPOINT_INTERVAL = 1.0
#: WAL pages at which the committing connection checkpoints itself after all (SQLite's default: 1000).
AUTOCHECKPOINT_PAGES = 16384


class Checkpointer:
    """Runs passive WAL checkpoints of one database on a private thread, at most once per `interval` s."""

    def __init__(self, db_path: str, synchronous: str, interval: float = CHECKPOINT_INTERVAL) -> None:
        self.db_path = db_path
        self.synchronous = synchronous
        self.interval = interval
        #: Checkpoints run, and the WAL pages (frames) the last one found and copied.
        self.runs = 0
        self.last: tuple[int, int] = (0, 0)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def kick(self) -> None:
        """A transaction committed: checkpoint soon."""
        with self._lock:
            if self._stopping.is_set():
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fleetsync-checkpoint", daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            last = -self.interval
            while True:
                self._wake.wait()
                if self._stopping.is_set():
                    return
                if time.monotonic() < last + self.interval:
                    # Too soon after the last one. Run right after the first commit once the
                    # interval is over (the gap before the next commit is the best chance to copy
                    # the whole WAL, so the next write starts it over), or when none comes: idle.
                    if self._stopping.wait(last + self.interval - time.monotonic()):
                        return
                    self._wake.clear()
                    self._wake.wait(self.interval)
                    if self._stopping.is_set():
                        return
                self._wake.clear()
                last = time.monotonic()
                try:
                    _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as e:
                    log.debug("background checkpoint of %s: %s", self.db_path, e)
                    continue
                self.runs += 1
                self.last = (frames, copied)
        finally:
            conn.close()

    def close(self) -> None:
        """Stop the thread (a checkpoint in progress finishes first)."""
        with self._lock:
            self._stopping.set()
            self._wake.set()
            t, self._thread = self._thread, None
        if t is not None:
            t.join()
