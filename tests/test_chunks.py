"""Chunk-level transfer: chunk lists, delta plans, and delta fetches against a real upstream server."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleetsync.entry import FILE, Entry
from fleetsync.hashing import hash_bytes
from fleetsync.transport import chunks
from fleetsync.transport.chunks import ChunkList, DeltaUnavailable, chunk_fd, fetch_delta, plan_delta
from tests.helpers.apiserver import ApiServer


def data_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def edited(data: bytes, at: int, n: int, seed: int = 9) -> bytes:
    return data[:at] + random.Random(seed).randbytes(n) + data[at + n:]


def write(path: Path, data: bytes) -> int:
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def chunk_bytes(tmp_path: Path, data: bytes, name: str = "f") -> ChunkList:
    fd = write(tmp_path / name, data)
    try:
        cl, whole = chunk_fd(fd)
    finally:
        os.close(fd)
    assert whole == hash_bytes(data)
    return cl


def test_chunk_list_round_trip_and_boundaries_resync_after_an_edit(tmp_path: Path) -> None:
    old = data_of(3 << 20)
    new = edited(old, 1 << 20, 5000)
    a = chunk_bytes(tmp_path, old, "a")
    b = chunk_bytes(tmp_path, new, "b")
    assert a.size == len(old) and sum(a.lengths) == len(old)
    assert ChunkList.decode(a.encode(), "test") == a
    # Content-defined: only the chunks around the edit differ.
    assert len(set(b.digests) - set(a.digests)) <= 3
    plan = plan_delta(a, b)
    assert plan.missing_bytes + plan.reused_bytes == len(new)
    assert plan.missing_bytes <= 3 * a.params.max
    assert len(plan.missing) == 1
    # The unchanged prefix and suffix are each one coalesced copy.
    assert len(plan.copies) == 2


def test_insertion_shifts_offsets_but_keeps_chunks(tmp_path: Path) -> None:
    old = data_of(2 << 20)
    new = old[:700_000] + b"inserted" * 1000 + old[700_000:]
    plan = plan_delta(chunk_bytes(tmp_path, old, "a"), chunk_bytes(tmp_path, new, "b"))
    assert plan.missing_bytes < 600_000
    assert sum(n for _, _, n in plan.copies) == plan.reused_bytes


def test_decode_rejects_malformed_lists(tmp_path: Path) -> None:
    cl = chunk_bytes(tmp_path, data_of(300_000))
    raw = cl.encode()
    for bad in (raw[:10], raw[:-1], b"XXXX" + raw[4:], raw + b"\0" * 36):
        with pytest.raises(DeltaUnavailable):
            ChunkList.decode(bad, "test")


def test_too_many_ranges_are_merged(tmp_path: Path) -> None:
    old = bytearray(data_of(4 << 20))
    new = bytearray(old)
    rng = random.Random(3)
    for k in range(40):
        at = k * 100_000 + 50_000
        new[at:at + 10] = rng.randbytes(10)
    a, b = chunk_bytes(tmp_path, bytes(old), "a"), chunk_bytes(tmp_path, bytes(new), "b")
    full = plan_delta(a, b)
    capped = plan_delta(a, b, max_ranges=5)
    assert len(full.missing) > 5 and len(capped.missing) == 5
    assert capped.missing_bytes >= full.missing_bytes
    assert capped.missing_bytes + capped.reused_bytes == len(new)
    offs = b.offsets() + [b.size]
    fetched = sorted((offs[i], offs[j]) for i, j in capped.missing)
    copied = sorted((d, d + n) for _, d, n in capped.copies)
    spans = sorted(fetched + copied)
    pos = 0
    for s, e in spans:
        assert s == pos, (s, pos)
        pos = e
    assert pos == len(new)


# -- against a real upstream ---------------------------------------------------------------------
Upstream = ApiServer


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[Upstream]:
    u = Upstream(tmp_path)
    await u.start()
    try:
        yield u
    finally:
        await u.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"X-Fleetsync-Replica": "t"}, auto_decompress=False) as s:
        yield s


async def delta(session: aiohttp.ClientSession, u: Upstream, e: Entry, src: Path, out: Path,
                **kw: Any) -> chunks.DeltaResult:
    assert e.hash is not None
    sfd = os.open(src, os.O_RDONLY)
    ofd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    counted = []

    async def on_bytes(n: int) -> None:
        counted.append(n)

    try:
        res = await fetch_delta(session, u.url, e.hash, e.size, sfd, ofd, on_bytes=on_bytes, **kw)
    finally:
        os.close(sfd)
        os.close(ofd)
    assert sum(counted) == res.fetched + res.list_bytes
    return res


async def test_delta_fetch_moves_only_changed_chunks(tmp_path: Path, upstream: Upstream,
                                                     session: aiohttp.ClientSession) -> None:
    old = data_of(8 << 20)
    new = edited(old, 4 << 20, 100 << 10)
    (tmp_path / "old").write_bytes(old)
    e = upstream.put("big.bin", new)
    res = await delta(session, upstream, e, tmp_path / "old", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new
    assert res.fetched < 600 << 10, res
    assert res.fetched + res.reused == len(new)
    # What the upstream counted: the chunk list plus the fetched ranges, nothing else.
    assert upstream.sent() == res.fetched + res.list_bytes


async def test_chunk_lists_are_cached_and_shared(tmp_path: Path, upstream: Upstream,
                                                 session: aiohttp.ClientSession) -> None:
    new = data_of(5 << 20, seed=2)
    e = upstream.put("big.bin", new)
    (tmp_path / "old").write_bytes(edited(new, 100, 1000))
    svc_outs = await asyncio.gather(*(chunks.fetch_chunk_list(session, upstream.url, e.hash or b"")
                                      for _ in range(3)))
    assert len(set(svc_outs)) == 1
    await delta(session, upstream, e, tmp_path / "old", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new


async def test_file_changed_under_us_is_refused(tmp_path: Path, upstream: Upstream,
                                                session: aiohttp.ClientSession) -> None:
    old = data_of(6 << 20, seed=3)
    new = edited(old, 3 << 20, 4096)
    (tmp_path / "old").write_bytes(old)
    e = upstream.put("big.bin", new)
    # The origin file changes after it was recorded (same size, same mtime restored): the chunk
    # list computed from it does not match the recorded hash.
    p = upstream.root / "big.bin"
    st = p.stat()
    p.write_bytes(edited(new, 100, 10, seed=5))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DeltaUnavailable, match="HTTP 409"):
        await delta(session, upstream, e, tmp_path / "old", tmp_path / "out")


async def test_ranges_changed_after_the_list_was_served_are_caught(tmp_path: Path, upstream: Upstream,
                                                                   session: aiohttp.ClientSession) -> None:
    old = data_of(6 << 20, seed=4)
    new = edited(old, 3 << 20, 50_000)
    (tmp_path / "old").write_bytes(old)
    e = upstream.put("big.bin", new)
    assert e.hash is not None
    await chunks.fetch_chunk_list(session, upstream.url, e.hash)  # cached now
    p = upstream.root / "big.bin"
    st = p.stat()
    p.write_bytes(edited(new, 3 << 20, 50_000, seed=6))  # the edited region changes again
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DeltaUnavailable, match="hash mismatch"):
        await delta(session, upstream, e, tmp_path / "old", tmp_path / "out")


async def test_corrupted_local_source_fails_whole_file_check(tmp_path: Path, upstream: Upstream,
                                                             session: aiohttp.ClientSession,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    old = data_of(6 << 20, seed=7)
    new = edited(old, 1 << 20, 10_000)
    (tmp_path / "old").write_bytes(old)
    e = upstream.put("big.bin", new)
    real_copy = chunks._copy_all

    def corrupting_copy(src: int, dst: int, copies: list[tuple[int, int, int]]) -> None:
        real_copy(src, dst, copies)
        os.pwrite(dst, b"\xff" * 16, copies[-1][1])  # the source changed between chunking and copying

    monkeypatch.setattr(chunks, "_copy_all", corrupting_copy)
    with pytest.raises(DeltaUnavailable, match="does not match its hash"):
        await delta(session, upstream, e, tmp_path / "old", tmp_path / "out")


async def test_unrelated_source_and_missing_blob_fall_back(tmp_path: Path, upstream: Upstream,
                                                           session: aiohttp.ClientSession) -> None:
    new = data_of(5 << 20, seed=8)
    (tmp_path / "other").write_bytes(data_of(5 << 20, seed=99))
    e = upstream.put("big.bin", new)
    with pytest.raises(DeltaUnavailable, match="full fetch is cheaper"):
        await delta(session, upstream, e, tmp_path / "other", tmp_path / "out")
    gone = Entry(FILE, 0o644, len(new), 0, hash_bytes(b"not here"))
    with pytest.raises(DeltaUnavailable, match="HTTP 404"):
        await delta(session, upstream, gone, tmp_path / "other", tmp_path / "out")
