"""The pipelined blob writer: order, duplicates, bounds, failures (fake upstream, real filesystem)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fleetsync.entry import FILE, Entry
from fleetsync.errors import IntegrityError
from fleetsync.hashing import hash_bytes
from fleetsync.replica import pipeline
from fleetsync.replica.fsops import ConfinedRoot
from fleetsync.replica.pipeline import MISSING, BlobPipeline, RetryLater
from fleetsync.transport.wire import CHANGED, GONE, OK


class FakeClient:
    """Serves frames for requested digests from a dict; optionally corrupts or withholds some."""

    def __init__(self, blobs: dict[bytes, bytes], status: dict[bytes, int] | None = None,
                 corrupt: set[bytes] | None = None) -> None:
        self.blobs_by_hash = blobs
        self.status = status or {}
        self.corrupt = corrupt or set()
        self.requested: list[bytes] = []

    async def blobs(self, digests: list[bytes], hints: list[bytes | None] | None = None
                    ) -> AsyncIterator[tuple[bytes, int, bytes]]:
        self.requested = list(digests)
        self.hints = list(hints) if hints is not None else None
        for d in digests:
            await asyncio.sleep(0)
            st = self.status.get(d, OK)
            data = self.blobs_by_hash[d] if st == OK else b""
            if d in self.corrupt:
                data = b"X" + data[1:]
            yield d, st, data


def entry(data: bytes, mode: int = 0o644, mtime: int = 1_700_000_000_123_456_789) -> Entry:
    return Entry(FILE, mode, len(data), mtime, hash_bytes(data))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(params=[0, 3], ids=["inline", "3-writer-threads"])
def pool(request: pytest.FixtureRequest) -> Any:
    if not request.param:
        yield None
        return
    with ThreadPoolExecutor(max_workers=request.param) as p:
        yield p


async def place_all(fs: ConfinedRoot, client: FakeClient, pool: Any,
                    items: list[tuple[bytes, Entry]]) -> list[int]:
    pipe = BlobPipeline(fs, client, pool, "fake", lambda n: None)  # type: ignore[arg-type]
    for i, (_, e) in enumerate(items):
        assert e.hash is not None
        pipe.want(e.hash, e, i)
    pipe.start()
    out = []
    ok = False
    try:
        for i, (p, e) in enumerate(items):
            assert e.hash is not None
            out.append(await pipe.place(e.hash, i, p, e))
            pipe.passed(i)
        ok = True
    finally:
        await pipe.close(ok)
    return out


def test_many_files_with_duplicates_land_with_their_own_mode_and_mtime(tmp_path: Path, pool: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """More files than the descriptor bound, duplicated content far apart: all placed, nothing left open."""
    monkeypatch.setattr(pipeline, "MAX_PENDING_FILES", 8)
    monkeypatch.setattr(pipeline, "MAX_PENDING_BYTES", 4096)
    fs = ConfinedRoot(tmp_path / "root")
    contents = [b"content %d " % i * (i % 50 + 1) for i in range(100)]
    items = [(b"d%d/f%03d" % (i % 7, i), entry(c, 0o600 + i % 8, 1_700_000_000_000_000_000 + i))
             for i, c in enumerate(contents)]
    # The same content again, late in the batch, with another mode and mtime.
    for i in range(0, 100, 9):
        items.append((b"dup/f%03d" % i, entry(contents[i], 0o640, 1_600_000_000_000_000_000 + i)))
    fds_before = len(os.listdir("/proc/self/fd"))
    client = FakeClient({e.hash: c for c, (_, e) in zip(contents, items)})  # type: ignore[misc]
    res = run(place_all(fs, client, pool, items))
    assert res == [OK] * len(items)
    assert len(client.requested) == 100  # each content fetched once
    for p, e in items:
        st = os.stat(tmp_path / "root" / os.fsdecode(p))
        assert (st.st_size, st.st_mtime_ns, st.st_mode & 0o7777) == (e.size, e.mtime_ns, e.mode)
        assert hash_bytes((tmp_path / "root" / os.fsdecode(p)).read_bytes()) == e.hash
    assert not [n for n in os.listdir(tmp_path / "root") if n.startswith(".fleetsync.")]
    fs.close()  # drops the cached directory descriptors
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def test_corrupt_blob_never_becomes_visible(tmp_path: Path, pool: Any) -> None:
    fs = ConfinedRoot(tmp_path / "root")
    good, bad = b"good content", b"bad content!"
    items = [(b"a/good", entry(good)), (b"a/bad", entry(bad)), (b"a/after", entry(b"after"))]
    client = FakeClient({items[0][1].hash: good, items[1][1].hash: bad, items[2][1].hash: b"after"},  # type: ignore[dict-item]
                        corrupt={items[1][1].hash})  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        run(place_all(fs, client, pool, items))
    assert (tmp_path / "root/a/good").read_bytes() == good
    assert not (tmp_path / "root/a/bad").exists()
    assert not (tmp_path / "root/a/after").exists()
    fs.close()


def test_gone_and_changed(tmp_path: Path, pool: Any) -> None:
    fs = ConfinedRoot(tmp_path / "root")
    a, b = entry(b"aaa"), entry(b"bbb")
    client = FakeClient({a.hash: b"aaa", b.hash: b"bbb"}, status={b.hash: GONE})  # type: ignore[dict-item]
    assert run(place_all(fs, client, pool, [(b"a", a), (b"b", b)])) == [OK, GONE]
    client = FakeClient({a.hash: b"aaa", b.hash: b"bbb"}, status={b.hash: CHANGED})  # type: ignore[dict-item]
    with pytest.raises(RetryLater):
        run(place_all(fs, client, pool, [(b"a2", a), (b"b2", b)]))
    assert not (tmp_path / "root/b2").exists()
    fs.close()


def test_item_that_did_not_ask_gets_missing(tmp_path: Path, pool: Any) -> None:
    fs = ConfinedRoot(tmp_path / "root")
    a = entry(b"aaa")

    async def go() -> int:
        pipe = BlobPipeline(fs, FakeClient({a.hash: b"aaa"}), pool, "fake", lambda n: None)  # type: ignore[arg-type,dict-item]
        assert a.hash is not None
        pipe.want(a.hash, a, 0)
        pipe.start()
        try:
            assert await pipe.place(a.hash, 0, b"x", a) == OK
            pipe.passed(0)
            return await pipe.place(a.hash, 1, b"y", a)
        finally:
            await pipe.close(True)

    assert run(go()) == MISSING
    assert (tmp_path / "root/x").read_bytes() == b"aaa"
    fs.close()


def test_temp_replaces_a_directory_and_an_existing_file(tmp_path: Path, pool: Any) -> None:
    root = tmp_path / "root"
    (root / "d/sub").mkdir(parents=True)
    (root / "d/sub/x").write_bytes(b"x")
    (root / "f").write_bytes(b"old")
    fs = ConfinedRoot(root)
    new_d, new_f = entry(b"file where a dir was"), entry(b"new")
    client = FakeClient({new_d.hash: b"file where a dir was", new_f.hash: b"new"})  # type: ignore[dict-item]
    assert run(place_all(fs, client, pool, [(b"d", new_d), (b"f", new_f)])) == [OK, OK]
    assert (root / "d").read_bytes() == b"file where a dir was"
    assert (root / "f").read_bytes() == b"new"
    fs.close()
