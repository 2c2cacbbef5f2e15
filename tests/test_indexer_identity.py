"""The origin's stat identity of unchanged files: refreshed inside the batch's commit, then used to skip hashing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from fleetsync.index import indexer as indexer_mod
from fleetsync.index.indexer import Indexer
from fleetsync.journal.sqlite import SqliteJournal

N = 40


async def _settle(ix: Indexer) -> None:
    for _ in range(50):
        await asyncio.sleep(0.005)
        await ix.process_ready()
        if not ix.pending and not ix._moves and not ix.scanning:
            return
    raise AssertionError(f"indexer did not settle: pending {list(ix.pending)}")


def test_identity_of_unchanged_files_is_refreshed_in_one_transaction(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Files whose ctime moved on without a change (chmod to the same mode, a rename's ctime) are
    refreshed in the batch's own transaction, not one durable commit each, and are not hashed again."""
    root = tmp_path / "root"
    root.mkdir()
    names = [f"f{i:02d}.html".encode() for i in range(N)]
    for n in names:
        (root / os.fsdecode(n)).write_bytes(b"page " + n)
    j = SqliteJournal(str(tmp_path / "o.db"), durable=True, content_index=False)
    ix = Indexer(str(root), j, settle=0.0)
    hashed: list[int] = []
    real_hash = indexer_mod.hash_fd_keep

    def counting_hash(*a, **kw):  # type: ignore[no-untyped-def]
        hashed.append(1)
        return real_hash(*a, **kw)

    monkeypatch.setattr(indexer_mod, "hash_fd_keep", counting_hash)

    async def batch() -> None:
        for n in names:
            ix.changed(n, closed=True)
        await _settle(ix)

    asyncio.run(batch())
    assert len(hashed) == N
    head = j.head()

    for n in names:  # same content, same mode: only the ctime changes
        p = root / os.fsdecode(n)
        os.chmod(p, os.stat(p).st_mode & 0o7777)
    outside_tx: list[str] = []

    def trace(sql: str) -> None:
        if sql.lstrip().upper().startswith("UPDATE MANIFEST") and not j.db.in_transaction:
            outside_tx.append(sql)

    j.db.set_trace_callback(trace)
    asyncio.run(batch())
    j.db.set_trace_callback(None)
    assert j.head() == head, "an unchanged file must not produce a record"
    assert not outside_tx, f"{len(outside_tx)} identity updates ran as transactions of their own"
    rows = j.get_many_with_local(names)
    for n in names:
        st = os.lstat(root / os.fsdecode(n))
        local = rows[n][1]
        assert local is not None and (local.ino, local.ctime_ns) == (st.st_ino, st.st_ctime_ns), n

    hashed.clear()
    asyncio.run(batch())  # nothing changed since: the refreshed identity lets every file skip hashing
    assert hashed == [], f"{len(hashed)} unchanged files were hashed again"
    assert j.head() == head
