"""The origin's pre-hash: a file its writer closed is hashed during its settle window, and that
digest is used only while lstat shows exactly what was hashed and no event came since."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from fleetsync.hashing import hash_bytes
from fleetsync.index.hot import HotBlobs
from fleetsync.index.indexer import Indexer, open_for_write
from fleetsync.journal.sqlite import SqliteJournal

SETTLE = 0.05


def _indexer(tmp_path: Path) -> tuple[Path, SqliteJournal, Indexer, HotBlobs]:
    root = tmp_path / "root"
    root.mkdir()
    j = SqliteJournal(str(tmp_path / "o.db"), content_index=False)
    hot = HotBlobs()
    return root, j, Indexer(str(root), j, settle=SETTLE, hot=hot), hot


async def _prehashed(ix: Indexer) -> None:
    """Wait until every queued pre-hash has reported back to the loop."""
    for _ in range(500):
        if ix._pre_queued == 0:
            return
        await asyncio.sleep(0.002)
    raise AssertionError("pre-hash did not finish")


async def _commit_all(ix: Indexer) -> None:
    await asyncio.sleep(SETTLE + 0.02)
    for _ in range(50):
        await ix.process_ready()
        if not ix.pending:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still pending: {list(ix.pending)}")


def _run(ix: Indexer, body) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        ix._loop = asyncio.get_running_loop()
        try:
            await body()
        finally:
            ix.close()
    asyncio.run(main())


def test_closed_file_is_hashed_early_and_its_digest_used(tmp_path: Path) -> None:
    """Written and closed: hashed on the pre-hash thread; the batch records that digest without reading."""
    root, j, ix, hot = _indexer(tmp_path)
    data = os.urandom(5000)

    async def body() -> None:
        (root / "f").write_bytes(data)
        ix.changed(b"f", closed=True)
        await _prehashed(ix)
        pre = ix.pending[b"f"].pre
        assert pre is not None and pre.digest == hash_bytes(data)
        assert hot.get(hash_bytes(data)) == data  # the content waits in the hot cache, not in the hint
        await _commit_all(ix)

    _run(ix, body)
    assert (e := j.get(b"f")) is not None and e.hash == hash_bytes(data) and e.size == len(data)
    assert (ix.prehashed, ix.prehash_used) == (1, 1)
    assert hot.get(hash_bytes(data)) == data  # kept for the replicas, as a read would have


def test_rewrite_that_sent_no_event_is_hashed_again(tmp_path: Path) -> None:
    """Rewritten after the pre-hash with the same size and mtime, and no event seen: ctime differs,
    so the pre-hash is not used and the batch reads the new content."""
    root, j, ix, _ = _indexer(tmp_path)
    f = root / "f"

    async def body() -> None:
        f.write_bytes(b"A" * 300)
        ix.changed(b"f", closed=True)
        await _prehashed(ix)
        assert ix.pending[b"f"].pre is not None
        st = f.stat()
        await asyncio.sleep(0.02)
        f.write_bytes(b"B" * 300)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        await _commit_all(ix)

    _run(ix, body)
    assert (e := j.get(b"f")) is not None and e.hash == hash_bytes(b"B" * 300)
    assert ix.prehash_used == 0


def test_an_event_after_the_pre_hash_drops_it(tmp_path: Path) -> None:
    """A write reported after the pre-hash makes a new hint without it; the final content is recorded."""
    root, j, ix, _ = _indexer(tmp_path)
    f = root / "f"

    async def body() -> None:
        f.write_bytes(b"one")
        ix.changed(b"f", closed=True)
        await _prehashed(ix)
        assert ix.pending[b"f"].pre is not None
        with open(f, "ab") as w:
            w.write(b" two")
            ix.changed(b"f", writing=True)
            assert ix.pending[b"f"].pre is None
        ix.changed(b"f", closed=True)
        await _prehashed(ix)
        await _commit_all(ix)

    _run(ix, body)
    assert (e := j.get(b"f")) is not None and e.hash == hash_bytes(b"one two")
    assert ix.prehash_used == 1


def test_a_file_held_open_for_writing_is_not_pre_hashed(tmp_path: Path) -> None:
    """Another descriptor still open for writing: the pre-hash is not kept (the batch decides)."""
    root, j, ix, _ = _indexer(tmp_path)
    f = root / "f"
    f.write_bytes(b"probe")
    fd = os.open(f, os.O_RDONLY)
    try:
        with open(f, "ab"):
            if open_for_write(fd) is not True:
                pytest.skip("file leases unavailable here (fs.leases-enable=0 or no CAP_LEASE)")
    finally:
        os.close(fd)

    async def body() -> None:
        with open(f, "wb") as w:
            w.write(b"partial")
            w.flush()
            ix.changed(b"f", closed=True)  # a close of another descriptor, this one still open
            await _prehashed(ix)
            assert ix.pending[b"f"].pre is None
        ix.changed(b"f", closed=True)
        await _prehashed(ix)
        await _commit_all(ix)

    _run(ix, body)
    assert (e := j.get(b"f")) is not None and e.hash == hash_bytes(b"partial")
    assert ix.prehashed == 1


def test_pre_hashed_content_shares_the_hot_cache_budget(tmp_path: Path) -> None:
    """Pre-hashed content is held only by the hot cache, within its byte budget: a burst larger
    than the budget keeps the newest content, every file is still recorded from its pre-hash, and
    the content a batch used becomes the newest entry."""
    root = tmp_path / "root"
    root.mkdir()
    j = SqliteJournal(str(tmp_path / "o.db"), content_index=False)
    hot = HotBlobs(max_bytes=2500)
    ix = Indexer(str(root), j, settle=SETTLE, hot=hot)
    blobs = {f"f{i}".encode(): os.urandom(1000) for i in range(5)}

    async def body() -> None:
        for name, data in blobs.items():
            (root / name.decode()).write_bytes(data)
            ix.changed(name, closed=True)
            await _prehashed(ix)
            assert hot.nbytes <= 2500
        assert all(ix.pending[n].pre is not None for n in blobs)
        kept = [n for n, d in blobs.items() if hot.get(hash_bytes(d)) is not None]
        assert kept == [b"f3", b"f4"]
        hot.put(b"x" * 32, b"y" * 400)  # something newer than the pre-hashes
        await _commit_all(ix)
        # The batch used f3's and f4's pre-hashes: they are now newer than x, which goes first.
        hot.put(b"z" * 32, b"y" * 400)
        assert hot.get(b"x" * 32) is None
        assert hot.get(hash_bytes(blobs[b"f4"])) is not None

    _run(ix, body)
    assert ix.prehash_used == 5
    for name, data in blobs.items():
        assert (e := j.get(name)) is not None and e.hash == hash_bytes(data)


def test_large_files_and_the_scanner_are_not_pre_hashed(tmp_path: Path) -> None:
    """Files above the hot cache's item size wait for their batch; without close events nothing is pre-hashed."""
    root, j, ix, hot = _indexer(tmp_path)
    big = os.urandom(hot.item_max + 1)

    async def body() -> None:
        (root / "big").write_bytes(big)
        ix.changed(b"big", closed=True)
        await _prehashed(ix)
        assert ix.pending[b"big"].pre is None
        ix.close_events = False
        (root / "s").write_bytes(b"scanned")
        ix.changed(b"s", closed=True)
        assert ix._pre_queued == 0
        await _commit_all(ix)

    _run(ix, body)
    assert (e := j.get(b"big")) is not None and e.hash == hash_bytes(big)
    assert (e := j.get(b"s")) is not None and e.hash == hash_bytes(b"scanned")
    assert (ix.prehashed, ix.prehash_used) == (0, 0)
