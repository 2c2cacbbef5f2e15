"""The origin serves content its indexer just hashed from memory: one disk read for every replica."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from fleetsync.hashing import hash_bytes, hash_fd_keep
from fleetsync.index.hot import HotBlobs
from fleetsync.index.indexer import Indexer
from fleetsync.journal.sqlite import SqliteJournal
from fleetsync.transport.client import UpstreamClient
from fleetsync.transport.wire import OK
from tests.helpers.apiserver import ApiServer


def test_fifo_budget_and_item_limit() -> None:
    h = HotBlobs(max_bytes=10, item_max=6)
    h.put(b"a", b"12345")
    h.put(b"b", b"1234")
    h.put(b"big", b"1234567")  # over item_max: not kept
    assert h.get(b"a") == b"12345" and h.get(b"b") == b"1234" and h.get(b"big") is None
    h.put(b"c", b"123")  # 12 bytes > 10: the oldest goes
    assert h.get(b"a") is None and h.get(b"c") == b"123" and h.nbytes == 7 and len(h) == 2
    assert (h.hits, h.misses) == (3, 2)


def test_entries_expire_after_the_ttl() -> None:
    now = [100.0]
    h = HotBlobs(max_bytes=100, ttl=10.0, clock=lambda: now[0])
    h.put(b"a", b"aaaa")
    now[0] = 105.0
    h.put(b"b", b"bb")
    now[0] = 110.5  # a is 10.5 s old: gone on get, even before anything expires it
    assert h.get(b"a") is None and h.get(b"b") == b"bb"
    h.expire()
    assert len(h) == 1 and h.nbytes == 2
    h.put(b"b", b"bb")  # put again: kept for another ttl
    now[0] = 119.0
    h.expire()
    assert h.get(b"b") == b"bb"
    now[0] = 121.0
    h.put(b"c", b"c")  # a put expires the old ones too
    assert len(h) == 1 and h.nbytes == 1 and h.get(b"b") is None


def test_touch_makes_an_entry_the_newest() -> None:
    """touch() refreshes a kept entry's age and FIFO place; an entry not kept stays absent."""
    now = [100.0]
    h = HotBlobs(max_bytes=6, ttl=10.0, clock=lambda: now[0])
    h.put(b"a", b"aa")
    h.put(b"b", b"bb")
    now[0] = 108.0
    h.touch(b"a")
    h.touch(b"gone")
    assert h.get(b"gone") is None and len(h) == 2
    h.put(b"c", b"cc")
    h.put(b"d", b"dd")  # 8 bytes > 6: b goes first now, not a
    assert h.get(b"b") is None and h.get(b"a") == b"aa"
    now[0] = 115.0  # b's put was 15 s ago, a's touch 7 s
    h.expire()
    assert h.get(b"a") == b"aa"


@pytest.mark.parametrize("size", [0, 1, 1 << 20, (1 << 20) + 1, 3 << 20])
def test_hash_fd_keep_returns_content_up_to_the_limit(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        digest, n, kept = hash_fd_keep(fd, 2 << 20)
    finally:
        os.close(fd)
    assert digest == hash_bytes(data) and n == size
    assert kept == (data if size <= 2 << 20 else None)


def test_indexer_keeps_what_it_hashed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.html").write_bytes(b"<p>a</p>")
    (root / "big.bin").write_bytes(os.urandom(300))
    j = SqliteJournal(str(tmp_path / "o.db"), content_index=False)
    hot = HotBlobs(item_max=100)
    ix = Indexer(str(root), j, settle=0.0, hot=hot)
    for name in (b"a.html", b"big.bin"):
        ix.changed(name, closed=True)

    async def run() -> None:
        await asyncio.sleep(0.01)
        await ix.process_ready()
    asyncio.run(run())
    assert j.get(b"a.html") is not None and j.get(b"big.bin") is not None
    assert hot.get(hash_bytes(b"<p>a</p>")) == b"<p>a</p>"
    assert len(hot) == 1  # big.bin is over item_max
    j.close()


async def test_server_answers_from_the_hot_cache_without_the_file(origin: ApiServer) -> None:
    o = origin
    o.state.hot = HotBlobs()
    kept = o.put("d/kept.css", b"body{}")
    other = o.put("d/other.css", b"p{}")
    o.state.hot.put(kept.hash, b"body{}")
    # The file changed after it was hashed: the cached bytes are still exactly the requested
    # version (a newer record follows); without the cache the same request reports the change.
    (o.root / "d/kept.css").write_bytes(b"body{color:red}")
    os.unlink(o.root / "d/other.css")
    c = UpstreamClient(o.url, replica_id="t")
    try:
        got = [(d, st, data) async for d, st, data in c.blobs([kept.hash, other.hash],
                                                               [b"d/kept.css", b"d/other.css"])]
    finally:
        await c.close()
    assert got[0] == (kept.hash, OK, b"body{}")
    assert got[1][0] == other.hash and got[1][1] != OK
    assert o.state.hot.hits == 1


async def test_a_miss_read_from_disk_is_kept_for_the_next_replica(origin: ApiServer) -> None:
    """Content not in the cache is read and verified once; the next replica's request is a hit.

    It is kept in the server's own smaller cache, not in the indexer's: a bootstrap's reads must
    not push out the content the indexer just hashed for a round.
    """
    o = origin
    o.state.hot = HotBlobs()
    o.state.missed = HotBlobs(max_bytes=64)
    e = o.put("d/a.js", b"let a = 1;")
    got = []
    for rid in ("r1", "r2"):
        c = UpstreamClient(o.url, replica_id=rid)
        try:
            got += [(d, st, data) async for d, st, data in c.blobs([e.hash], [b"d/a.js"])]
        finally:
            await c.close()
    assert got == [(e.hash, OK, b"let a = 1;")] * 2
    assert (o.state.hot.hits, len(o.state.hot)) == (0, 0)
    assert (o.state.missed.misses, o.state.missed.hits) == (1, 1)
    # The budget bounds what misses keep: a larger content pushes the first one out.
    big = o.put("d/b.js", b"x" * 60)
    c = UpstreamClient(o.url, replica_id="r3")
    try:
        got = [(d, st, data) async for d, st, data in c.blobs([big.hash], [b"d/b.js"])]
    finally:
        await c.close()
    assert got == [(big.hash, OK, b"x" * 60)]
    assert o.state.missed.get(e.hash) is None and o.state.missed.nbytes == 60


def test_indexer_does_not_keep_content_hashed_during_a_walk(tmp_path: Path) -> None:
    """An initial index (a walk of the whole tree) leaves the cache empty: no memory held for nobody."""
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    for i in range(20):
        (root / "d" / f"{i}.html").write_bytes(b"<p>%d</p>" % i)
    j = SqliteJournal(str(tmp_path / "o.db"), content_index=False)
    hot = HotBlobs()
    ix = Indexer(str(root), j, settle=0.0, hot=hot)

    async def run() -> None:
        ix.rescan(b"")
        for _ in range(500):
            await ix.process_ready()
            if not ix.busy() and j.get(b"d/19.html") is not None:
                break
            await asyncio.sleep(0.01)
        assert j.get(b"d/19.html") is not None
        assert len(hot) == 0
        (root / "d" / "new.html").write_bytes(b"<p>new</p>")  # a live change after the walk is kept
        ix.changed(b"d/new.html", closed=True)
        await asyncio.sleep(0.01)
        await ix.process_ready()
    asyncio.run(run())
    assert hot.get(hash_bytes(b"<p>new</p>")) == b"<p>new</p>" and len(hot) == 1
    j.close()
