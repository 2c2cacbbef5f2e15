"""Group commit: feed pages that arrive while a batch applies share its flush and cursor commit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from fleetsync.entry import Record
from fleetsync.journal.sqlite import SqliteJournal
from fleetsync.replica.follower import Replica, _Group
from tests.helpers.apiserver import ApiServer

StageFn = Callable[[list[Record], _Group], Awaitable[int]]


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[ApiServer]:
    o = ApiServer(tmp_path, content_index=False)
    await o.start()
    try:
        yield o
    finally:
        await o.stop()


def _put(origin: ApiServer, names: range) -> None:
    for i in names:
        origin.put(f"d{i % 2}/f{i}.html", f"<p>{i}</p>".encode() * (i + 1))
    origin.state.notify()


async def _until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _following(rep: Replica) -> asyncio.Task[None]:
    task = asyncio.ensure_future(rep.run())
    await _until(lambda: rep.journal.meta("bootstrapped") is not None, "the bootstrap")
    return task


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def _stop(rep: Replica, task: asyncio.Task[None]) -> None:
    rep.stop()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    await rep.close()


def test_staged_records_are_read_back_by_the_replica_and_never_served(tmp_path: Path) -> None:
    from fleetsync.entry import FILE, PUT, Entry
    j = SqliteJournal(str(tmp_path / "r.db"), durable=False)
    e = Entry(FILE, 0o644, 3, 1, b"\1" * 32)
    j.begin()
    j.stage([Record(1, PUT, b"a", e), Record(2, PUT, b"b", e)])
    assert j.staging and j.get(b"a") == e and j.paths_with_hash(e.hash) == [b"a", b"b"]
    assert j.head() == 0 and j.read(0, 10) == [], "a relay must not serve what is not committed"
    j.rollback_staged()
    assert not j.staging and j.get(b"a") is None and j.head() == 0 and j.count() == 0
    j.begin()
    j.stage([Record(1, PUT, b"a", e)])
    j.stage([Record(2, PUT, b"b", e)])
    j.commit_staged(meta={"k": "v"})
    assert j.head() == 2 and [r.seq for r in j.read(0, 10)] == [1, 2] and j.count() == 2 and j.meta("k") == "v"
    j.close()
    j = SqliteJournal(str(tmp_path / "r.db"), durable=False)
    assert j.head() == 2 and j.count() == 2
    j.close()


async def test_a_page_that_arrives_during_a_batch_joins_its_flush_and_commit(origin: ApiServer,
                                                                             tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    rep = Replica(str(tmp_path / "r"), str(tmp_path / "rs"), origin.url, "t", poll_wait=1)
    task = await _following(rep)
    stage: StageFn = rep._stage_batch
    seen: list[tuple[list[int], int, int, list[int]]] = []

    async def staged(recs: list[Record], g: _Group) -> int:
        n = await stage(recs, g)
        seen.append(([r.seq for r in recs], g.batches, rep.journal.head(), [r.seq for r in rep.journal.read(0, 99)]))
        if len(seen) == 1:
            # More records commit upstream while this batch is applied; the prefetched page brings them.
            _put(origin, range(4, 7))
            await _until(lambda: rep._ahead is not None and rep._ahead.done(), "the prefetched page")
        return n

    rep._stage_batch = staged  # type: ignore[method-assign]
    try:
        _put(origin, range(1, 4))
        await _until(lambda: rep.journal.head() == 6, "seq 6 applied")
        assert seen == [([1, 2, 3], 1, 0, []), ([4, 5, 6], 2, 0, [])], \
            "both batches staged in one group, head and the served feed unchanged until its commit"
        assert (rep.stats.batches, rep.stats.commits, rep.stats.records) == (2, 1, 6)
        assert _tree(tmp_path / "r") == _tree(origin.root)
        assert rep.journal.meta("inflight") is None
    finally:
        await _stop(rep, task)


async def test_a_failing_batch_rolls_back_its_group_which_is_applied_again(origin: ApiServer,
                                                                          tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    rep = Replica(str(tmp_path / "r"), str(tmp_path / "rs"), origin.url, "t", poll_wait=1)
    task = await _following(rep)
    stage: StageFn = rep._stage_batch
    calls: list[tuple[list[int], int]] = []

    async def staged(recs: list[Record], g: _Group) -> int:
        calls.append(([r.seq for r in recs], rep.journal.head()))
        n = await stage(recs, g)
        if len(calls) == 1:
            _put(origin, range(4, 7))
            await _until(lambda: rep._ahead is not None and rep._ahead.done(), "the prefetched page")
        elif len(calls) == 2:
            raise OSError(28, "No space left on device (injected after the second batch was staged)")
        return n

    rep._stage_batch = staged  # type: ignore[method-assign]
    try:
        _put(origin, range(1, 4))
        await _until(lambda: rep.journal.head() == 6, "seq 6 applied after the retry")
        # The first batch was applied and staged, not committed: the retry starts from seq 0 again.
        assert calls == [([1, 2, 3], 0), ([4, 5, 6], 0), ([1, 2, 3, 4, 5, 6], 0)]
        assert (rep.stats.batches, rep.stats.commits) == (1, 1)
        assert _tree(tmp_path / "r") == _tree(origin.root)
        assert rep.journal.count() == origin.journal.count()
        assert not rep.journal.staging and rep.journal.meta("inflight") is None
    finally:
        await _stop(rep, task)


async def test_a_newer_long_poll_of_a_follower_ends_its_older_one_and_reports_its_position(
        origin: ApiServer) -> None:
    from fleetsync.transport.client import UpstreamClient
    _put(origin, range(1, 4))
    old, new = UpstreamClient(origin.url, replica_id="web-1"), UpstreamClient(origin.url, replica_id="web-1")
    other = UpstreamClient(origin.url, replica_id="web-2")
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = asyncio.ensure_future(old.feed(3, wait=30, applied=1))
        bystander = asyncio.ensure_future(other.feed(3, wait=30))
        await _until(lambda: origin.state.followers.get("web-1") is not None
                     and origin.state.followers["web-1"].waiting == 1, "the first long poll waiting")
        second = asyncio.ensure_future(new.feed(3, wait=30, applied=3))
        page = await asyncio.wait_for(first, 10)
        assert page.records == [] and loop.time() - t0 < 10, "the superseded poll ends, empty, long before 30 s"
        assert origin.state.followers["web-1"].applied_seq == 3
        assert not second.done() and not bystander.done(), "the newer poll and other followers keep waiting"
        _put(origin, range(4, 5))
        assert [r.seq for r in (await asyncio.wait_for(second, 10)).records] == [4]
        assert [r.seq for r in (await asyncio.wait_for(bystander, 10)).records] == [4]
    finally:
        for c in (old, new, other):
            await c.close()
