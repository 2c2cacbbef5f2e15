"""A following replica overlaps a batch's flush with streaming the next batch's content: the cursor
commits only after the flush returned, nothing of the next batch is visible before that commit, a
failed flush leaves the cursor before its batch (which is applied again), and a batch placed when
the replica closes is committed once its flush returns."""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from pathlib import Path

import pytest

from fleetsync.replica.follower import Replica
from tests.helpers.apiserver import ApiServer, replica_in


def _gate_flush(rep: Replica) -> tuple[threading.Event, list[int]]:
    """Make rep's flushes wait for the returned event; the list counts flushes begun."""
    gate, begun = threading.Event(), [0]
    real = rep.fs.sync

    def sync() -> None:
        begun[0] += 1
        assert gate.wait(30), "flush gate never opened"
        real()

    rep.fs.sync = sync  # type: ignore[method-assign]
    return gate, begun


async def _until(cond, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_next_batch_streams_during_the_flush_and_commits_after_it(
        origin: ApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fleetsync.replica")
    a, b, c = b"a" * 5000, b"b" * 7000, b"c" * 9000
    origin.put("one/a", a)
    rep = replica_in(tmp_path, origin.url, rid="t")
    root = tmp_path / "replica"
    gate, begun = _gate_flush(rep)
    try:
        assert await rep._apply(origin.journal.read(0, 10)) == 1
        await _until(lambda: begun[0] == 1, "the first flush")
        assert rep.journal.head() == 0, "the cursor moved before the flush returned"
        assert (root / "one" / "a").read_bytes() == a  # placed, not yet durable

        origin.put("two/b", b)
        origin.put("two/c", c)
        second = asyncio.create_task(rep._apply(origin.journal.read(1, 10)))
        # The next batch's content crosses the wire while the first batch is still flushing ...
        await _until(lambda: rep.stats.bytes_fetched == len(a) + len(b) + len(c), "the second batch's content")
        await asyncio.sleep(0.05)
        assert not second.done()
        assert rep.journal.head() == 0
        # ... but none of it is visible before the first batch's commit.
        assert not (root / "two").exists()

        gate.set()
        assert await second == 2
        assert rep.journal.head() == 1, "the first batch committed, the second is placed and flushing"
        assert rep.journal.meta("inflight") == "2-3"
        assert (root / "two" / "b").read_bytes() == b and (root / "two" / "c").read_bytes() == c
        await rep._make_durable()
        assert rep.journal.head() == 3 and rep.journal.meta("inflight") is None
        assert rep.stats.batches == 2 and rep.stats.files_written == 3
        # The debug line counts the content fetched during the previous flush with its own batch.
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch ")]
        assert lines[1].startswith(f"batch 2-3: 2 records, 2 files written, {len(b) + len(c)} bytes fetched;"), lines
    finally:
        gate.set()
        await rep.close()


async def test_a_failed_flush_leaves_the_cursor_before_its_batch(origin: ApiServer, tmp_path: Path) -> None:
    origin.put("f", b"first")
    rep = replica_in(tmp_path, origin.url, rid="t")
    fails = [1]
    real = rep.fs.sync

    def sync() -> None:
        if fails[0]:
            fails[0] -= 1
            raise OSError(errno.EIO, "flushing the replica's filesystem")
        real()

    rep.fs.sync = sync  # type: ignore[method-assign]
    try:
        recs = origin.journal.read(0, 10)
        await rep._apply(recs)
        with pytest.raises(OSError, match="flushing"):
            await rep._make_durable()
        assert rep.journal.head() == 0 and rep.journal.meta("inflight") == "1-1"
        # The follow loop asks for the batch again from its cursor; applying it again is harmless.
        assert await rep.apply_batch(recs) == 1
        assert rep.journal.head() == 1 and rep.stats.batches == 1
        assert (tmp_path / "replica" / "f").read_bytes() == b"first"
    finally:
        await rep.close()


async def test_close_commits_a_batch_whose_flush_returned(origin: ApiServer, tmp_path: Path) -> None:
    origin.put("x/y", b"content")
    rep = replica_in(tmp_path, origin.url, rid="t")
    await rep._apply(origin.journal.read(0, 10))
    await rep.close()
    again = replica_in(tmp_path, origin.url, rid="t")
    try:
        assert again.journal.head() == 1 and again.journal.meta("inflight") is None
    finally:
        await again.close()


async def test_the_follow_loop_converges_with_overlapped_batches(origin: ApiServer, tmp_path: Path) -> None:
    """Through run(): many small batches (one record each, as pages come), all applied and committed."""
    rep = replica_in(tmp_path, origin.url, rid="t", poll_wait=0.2)
    follow = asyncio.create_task(rep.run())
    try:
        data = {f"d{i % 3}/f{i}": bytes([65 + i % 26]) * (100 + i) for i in range(40)}
        for name, body in data.items():
            origin.put(name, body)
            origin.state.notify()
            await asyncio.sleep(0.005)
        await _until(lambda: rep.journal.head() == origin.journal.head(), "the replica to commit everything")
        for name, body in data.items():
            assert (tmp_path / "replica" / name).read_bytes() == body
        assert rep.last_error is None
    finally:
        rep.stop()
        follow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await follow
        await rep.close()
