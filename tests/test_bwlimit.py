"""Replica bandwidth limit (--bwlimit): parsing, and the rate over real HTTP transfers.

Only lower bounds on elapsed time are asserted (a limit can make a transfer slower, never faster).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest

from fleetsync.cli.options import parse_rate
from fleetsync.entry import FILE, PUT, Entry
from fleetsync.hashing import hash_bytes
from fleetsync.journal.sqlite import Change, SqliteJournal
from fleetsync.transport.client import UpstreamClient
from fleetsync.transport.server import ServerState, start_server
from fleetsync.transport.wire import OK
from tests.helpers.cluster import Cluster, free_port

MiB = 1 << 20


def test_parse_rate() -> None:
    assert parse_rate("500K") == 500 * 1024
    assert parse_rate("10M") == 10 * MiB
    assert parse_rate("1.5m") == 1.5 * MiB
    assert parse_rate("2MiB/s") == 2 * MiB
    assert parse_rate("65536") == 65536
    for bad in ("", "fast", "-1M", "0", "M"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def _origin_tree(tmp_path: Path, sizes: list[int]) -> tuple[SqliteJournal, str, list[Entry]]:
    root = tmp_path / "root"
    root.mkdir()
    rng = random.Random(4)
    changes, entries = [], []
    for i, size in enumerate(sizes):
        data = rng.randbytes(size)
        p = root / f"f{i}"
        p.write_bytes(data)
        st = os.stat(p)
        e = Entry(FILE, 0o644, size, st.st_mtime_ns, hash_bytes(data))
        changes.append(Change(PUT, f"f{i}".encode(), e))
        entries.append(e)
    j = SqliteJournal(str(tmp_path / "origin.db"))
    j.commit(changes)
    return j, str(root), entries


async def _timed_fetch(j: SqliteJournal, root: str, entries: list[Entry], rate: float | None,
                       large: bool) -> tuple[int, float]:
    port = free_port()
    state = ServerState(j, root)
    runner = await start_server(state, "127.0.0.1", port)
    client = UpstreamClient(f"http://127.0.0.1:{port}", replica_id="t", bwlimit=rate)
    try:
        t0 = time.monotonic()
        if large:
            for i, e in enumerate(entries):
                assert e.hash is not None
                fd = os.open(os.path.join(root, f"out{i}"), os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    await client.blob_to_fd(e.hash, e.size, fd)
                finally:
                    os.close(fd)
        else:
            async for _d, status, _data in client.blobs([e.hash for e in entries if e.hash]):
                assert status == OK
        return client.bytes_received, time.monotonic() - t0
    finally:
        await client.close()
        await runner.cleanup()
        state.close()


@pytest.mark.parametrize("large", [False, True], ids=["batched-small-blobs", "single-large-blob"])
def test_bwlimit_limits_the_rate_of_a_real_transfer(tmp_path: Path, large: bool) -> None:
    """4 MiB at 1 MiB/s cannot take less than ~3 s (the bucket starts with at most 128 KiB of credit)."""
    sizes = [6 * MiB] if large else [256 << 10] * 16
    total = sum(sizes)
    j, root, entries = _origin_tree(tmp_path, sizes)
    try:
        got, elapsed = asyncio.run(_timed_fetch(j, root, entries, 1 * MiB, large))
    finally:
        j.close()
    assert got == total
    rate = got / elapsed
    assert rate <= 1.3 * MiB, f"{got} bytes in {elapsed:.2f}s = {rate / MiB:.2f} MiB/s with a 1 MiB/s limit"
    assert elapsed >= (total - 256 * 1024) / MiB * 0.9


def test_replica_cli_bwlimit(tmp_path: Path) -> None:
    """`fleetsync replica --bwlimit 1M`: 4 MiB of new files reach the replica no faster than the limit."""
    c = Cluster(tmp_path / "c", n_replicas=1)
    c.replicas["r1"].proc.args += ["--bwlimit", "1M"]  # type: ignore[union-attr]
    c.start()
    try:
        c.wait_ready()
        seq0 = c.wait_converged(timeout=60)["seq"]
        rng = random.Random(7)
        blobs = [rng.randbytes(512 << 10) for _ in range(8)]
        t0 = time.monotonic()  # before the first write: every byte is transferred after this
        for i, data in enumerate(blobs):
            (c.origin.root / f"big{i}.bin").write_bytes(data)
        st = c.wait_converged(timeout=120)
        assert st["seq"] >= seq0 + 8
        elapsed = time.monotonic() - t0
        sent = c.bytes_sent("r1")
        assert sent >= 4 * MiB
        assert elapsed >= 3.0, f"4 MiB reached the replica in {elapsed:.2f}s despite --bwlimit 1M"
    finally:
        c.stop()
