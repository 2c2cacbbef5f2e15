"""A resync's content fetch against a real API server: duplicates, gone and changed content."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetsync.entry import Entry
from fleetsync.hashing import hash_bytes
from fleetsync.replica import bulk
from fleetsync.replica.follower import Replica
from fleetsync.replica.pipeline import RetryLater
from tests.helpers.apiserver import ApiServer, replica_in


@pytest.fixture(params=["in-process", "workers", "workers-zstd"])
def workers(request: pytest.FixtureRequest) -> Iterator[tuple[int, str]]:
    """(worker processes, compression) of the fetch: none (the replica's event loop writes), or two (bulk.py)."""
    yield {"in-process": (0, "off"), "workers": (2, "off"), "workers-zstd": (2, "on")}[request.param]


def _with_workers(rep: Replica, n: int) -> None:
    if n:
        assert rep.bootstrap_workers  # usable with this upstream and these options
        rep._bulk = bulk.start_pool(n)


def _without_workers(rep: Replica) -> None:
    if rep._bulk is not None:
        rep._bulk.shutdown(wait=True)
        rep._bulk = None


async def test_duplicates_gone_and_large_content(origin: ApiServer, tmp_path: Path, workers: tuple[int, str]) -> None:
    big = bytes(range(256)) * (5 << 12)  # 5 MiB: fetched on its own
    items: list[tuple[bytes, Entry]] = [
        (b"a/x.css", origin.put("a/x.css", b"alpha" * 100)),
        (b"c/dup1", origin.put("c/dup1", b"same")),
        (b"c/dup2", origin.put("c/dup2", b"same")),
        (b"d/gone", origin.put("d/gone", b"gone soon")),
        (b"e/big.bin", origin.put("e/big.bin", big)),
    ]
    # Later versions superseded two of them at the origin (the snapshot being applied is older):
    origin.put("c/dup1", b"newer")  # the path the blob is asked for first: gone there…
    origin.put("d/gone", b"newer")
    rep = replica_in(tmp_path, origin.url, rid="t", compress=workers[1], bootstrap_workers=workers[0])
    _with_workers(rep, workers[0])
    try:
        await rep._fetch_and_write(items)
    finally:
        _without_workers(rep)
        await rep.close()
    root = tmp_path / "replica"
    assert (root / "a/x.css").read_bytes() == b"alpha" * 100
    assert (root / "c/dup2").read_bytes() == b"same"  # …but still at the other path: fetched from there
    assert not (root / "c/dup1").exists() and not (root / "d/gone").exists()  # skipped: the later version follows
    assert hash_bytes((root / "e/big.bin").read_bytes()) == hash_bytes(big)
    for p, e in items:
        if (root / p.decode()).exists():
            st = (root / p.decode()).stat()
            assert (st.st_size, st.st_mtime_ns, st.st_mode & 0o7777) == (e.size, e.mtime_ns, e.mode)
    assert rep.stats.files_written == 3


@pytest.mark.parametrize("how", ["rewritten", "deleted"])
async def test_changed_content_is_retried_not_written(origin: ApiServer, tmp_path: Path, how: str,
                                                     workers: tuple[int, str]) -> None:
    """The origin's file no longer matches its manifest (its record is not written yet): retry later."""
    items = [(b"a/one", origin.put("a/one", b"one")), (b"a/two", origin.put("a/two", b"two"))]
    if how == "rewritten":
        (origin.root / "a" / "two").write_bytes(b"TWO")  # same size, other bytes
    else:
        (origin.root / "a" / "two").unlink()
    rep = replica_in(tmp_path, origin.url, rid="t", compress=workers[1], bootstrap_workers=workers[0])
    _with_workers(rep, workers[0])
    try:
        with pytest.raises(RetryLater, match="changed at"):
            await rep._fetch_and_write(items)
    finally:
        _without_workers(rep)
        await rep.close()
    assert not (tmp_path / "replica" / "a" / "two").exists()


@pytest.mark.parametrize("fail", [False, True])
async def test_background_flush_during_a_resync(origin: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                fail: bool) -> None:
    """While content is written the filesystem is flushed on a thread; none runs after resync returns.

    A failing background flush only logs: the final flush (on the loop) is the one that counts.
    """
    import threading
    import time

    from fleetsync.replica import follower

    monkeypatch.setattr(follower, "BACKGROUND_FLUSH", 0.01)
    for i in range(20):
        origin.put(f"d{i % 3}/f{i}.css", b"x" * (i + 1))
    rep = replica_in(tmp_path, origin.url, rid="t")
    main = threading.current_thread()
    calls: list[bool] = []
    inflight = 0
    real_sync = rep.fs.sync

    def sync() -> None:
        nonlocal inflight
        background = threading.current_thread() is not main
        inflight += 1
        try:
            time.sleep(0.1 if background else 0.0)  # a slow flush in progress when the walk ends
            calls.append(background)
            if fail and background:
                raise OSError(5, "syncfs: Input/output error")
            real_sync()
        finally:
            inflight -= 1

    real_fetch = rep._fetch_and_write

    async def slow_fetch(items: list[tuple[bytes, Entry]]) -> None:
        await asyncio.sleep(0.1)  # content arriving slowly: long enough for background flushes
        await real_fetch(items)

    monkeypatch.setattr(rep.fs, "sync", sync)
    monkeypatch.setattr(rep, "_fetch_and_write", slow_fetch)
    try:
        await rep.resync(bootstrap=True)
        assert inflight == 0
        assert True in calls and calls[-1] is False  # flushed in the background, then once at the end
        n = len(calls)
        await asyncio.sleep(0.1)
        assert len(calls) == n  # stopped
    finally:
        await rep.close()
    assert rep.journal.head() == 20 and (tmp_path / "replica" / "d1" / "f19.css").read_bytes() == b"x" * 20
