"""Blobs over the server's batched-stream limit are answered "too large" and fetched singly, so
servers and replicas with different limits (1 MiB now, 4 MiB before) work together."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleetsync.hashing import hash_bytes
from fleetsync.index.hot import HOT_ITEM_MAX
from fleetsync.replica import bulk
from fleetsync.transport import server as server_mod
from fleetsync.transport.client import UpstreamClient
from fleetsync.transport.wire import BATCH_BLOB_MAX, OK, TOO_LARGE
from tests.helpers.apiserver import ApiServer, replica_in

LIMIT = 1000


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server streams blobs up to LIMIT bytes only (the replica keeps its own, larger limit)."""
    monkeypatch.setattr(server_mod, "BATCH_BLOB_MAX", LIMIT)


def test_the_stream_limit_is_the_hot_cache_item_size() -> None:
    """What the origin keeps in memory for replicas is exactly what it streams in batches."""
    assert BATCH_BLOB_MAX == HOT_ITEM_MAX == 1 << 20


async def test_server_answers_too_large_over_its_limit(origin: ApiServer, small_limit: None) -> None:
    small, big = os.urandom(LIMIT - 200), os.urandom(LIMIT * 5)
    a, b = origin.put("small", small), origin.put("big", big)
    client = UpstreamClient(origin.url, replica_id="t")
    try:
        got = [(st, data) async for _, st, data in client.blobs([a.hash, b.hash], [b"small", b"big"])]
    finally:
        await client.close()
    assert got == [(OK, small), (TOO_LARGE, b"")]


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "workers"])
async def test_a_resync_fetches_too_large_blobs_singly(origin: ApiServer, tmp_path: Path, small_limit: None,
                                                       workers: int) -> None:
    blobs = {b"s1": os.urandom(500), b"s2": os.urandom(LIMIT), b"b1": os.urandom(LIMIT + 1),
             b"b2": os.urandom(LIMIT * 7)}
    items = [(p, origin.put(p.decode(), data)) for p, data in blobs.items()]
    rep = replica_in(tmp_path, origin.url, rid="t", bootstrap_workers=workers)
    if workers:
        rep._bulk = bulk.start_pool(workers)
    try:
        await rep._fetch_and_write(items)
    finally:
        if rep._bulk is not None:
            rep._bulk.shutdown(wait=True)
            rep._bulk = None
        await rep.close()
    for p, data in blobs.items():
        assert hash_bytes((tmp_path / "replica" / p.decode()).read_bytes()) == hash_bytes(data)
    assert rep.stats.files_written == len(blobs)


async def test_a_record_batch_fetches_too_large_blobs_singly(origin: ApiServer, tmp_path: Path,
                                                             small_limit: None) -> None:
    blobs = {"small": os.urandom(300), "big": os.urandom(LIMIT * 3), "also-big": os.urandom(LIMIT + 1)}
    for name, data in blobs.items():
        origin.put(name, data)
    rep = replica_in(tmp_path, origin.url, rid="t")
    try:
        await rep.apply_batch(origin.journal.read(0, 10))
    finally:
        await rep.close()
    for name, data in blobs.items():
        assert (tmp_path / "replica" / name).read_bytes() == data
    assert rep.stats.bytes_fetched == sum(len(d) for d in blobs.values())
