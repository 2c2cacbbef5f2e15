"""WAL checkpoints run on the journal's own thread: commits wake it instead of checkpointing
themselves, the WAL starts over after a checkpoint that copied it all (it does not grow with the
number of commits), and close() stops the thread."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from fleetsync.entry import FILE, PUT, Entry, Record
from fleetsync.hashing import hash_bytes
from fleetsync.journal.checkpoint import AUTOCHECKPOINT_PAGES
from fleetsync.journal.sqlite import SqliteJournal


def _batch(start: int, n: int) -> list[Record]:
    return [Record(s, PUT, f"d{s % 37}/f{s:07d}".encode(), Entry(FILE, 0o644, 100, s, hash_bytes(str(s).encode())))
            for s in range(start, start + n)]


def _wait(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_commits_wake_a_checkpoint_thread_and_the_wal_starts_over(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    j = SqliteJournal(db, durable=False)
    j.checkpointer.interval = 0.0
    try:
        assert j.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == AUTOCHECKPOINT_PAGES
        seq = 1
        frames_each = []
        for _ in range(30):
            runs = j.checkpointer.runs
            j.apply_records(_batch(seq, 300))
            seq += 300
            _wait(lambda: j.checkpointer.runs > runs, "a background checkpoint")
            frames, copied = j.checkpointer.last
            assert frames > 0 and copied == frames, "a passive checkpoint with no reader copies the whole WAL"
            frames_each.append(frames)
        # Each commit reuses the WAL from its start: it holds one batch's pages, not thirty's.
        page = j.db.execute("PRAGMA page_size").fetchone()[0]
        wal = os.path.getsize(db + "-wal")
        assert wal <= 32 + (max(frames_each) + 1) * (page + 24) < sum(frames_each) * page // 4, (wal, frames_each)
        thread = j.checkpointer._thread
        assert thread is not None and thread.name == "fleetsync-checkpoint" and thread.is_alive()
    finally:
        j.close()
    assert not thread.is_alive()
    # Everything committed is in the database after the journal closed.
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM manifest").fetchone()[0] == 30 * 300
    conn.close()


def test_commits_in_a_burst_share_a_checkpoint(tmp_path: Path) -> None:
    j = SqliteJournal(str(tmp_path / "o.db"), durable=True)
    j.checkpointer.interval = 0.5
    try:
        seq = 1
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.2:
            j.apply_records(_batch(seq, 20))
            seq += 20
        _wait(lambda: j.checkpointer.runs >= 1, "a background checkpoint")
        time.sleep(0.6)
        # About one per interval, however many commits came (there were dozens).
        assert seq > 200 and j.checkpointer.runs <= 4, (seq, j.checkpointer.runs)
    finally:
        j.close()
