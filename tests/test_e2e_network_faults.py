"""A replica behind a fault-injecting TCP proxy: latency, resets mid-transfer and stalls lose nothing."""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cluster import Cluster, wait_for
from tests.helpers.faultproxy import FaultProxy

MiB = 1 << 20


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[Cluster, FaultProxy]]:
    """An origin and replica r1 whose upstream is a FaultProxy in front of the origin (5 ms per chunk)."""
    c = Cluster(tmp_path, n_replicas=1, settle=0.1)
    px = FaultProxy(c.origin.port).start()
    px.delay = 0.005
    args = c.replicas["r1"].proc.args
    args[args.index("--upstream") + 1] = f"http://127.0.0.1:{px.port}"
    try:
        c.start()
        c.wait_ready()
        yield c, px
    finally:
        c.stop()
        px.close()


def _write(root: Path, rng: random.Random, name: str, size: int) -> None:
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_bytes(rng.randbytes(size))
    os.rename(tmp, p)


def test_connections_reset_mid_transfer_are_retried_and_lose_nothing(proxied: tuple[Cluster, FaultProxy]) -> None:
    c, px = proxied
    rng = random.Random(7)
    # Every connection to the replica is reset after 256 kB: batched small blobs and the large-file
    # path (> 4 MiB, fetched with Range resume) are both cut mid-stream.
    px.reset_after = 256 * 1024
    for i in range(60):
        _write(c.origin.root, rng, f"small/f{i:03d}.html", rng.randint(2_000, 40_000))
    _write(c.origin.root, rng, "big/video.mp4", 6 * MiB + 123)
    _write(c.origin.root, rng, "big/archive.tar", 2 * MiB)
    wait_for(lambda: px.resets >= 4, 60, "four resets mid-transfer", every=0.05)
    px.reset_after = None
    c.wait_converged(timeout=120)
    assert px.resets >= 4 and px.connections > px.resets
    # And it keeps following afterwards: a change made after the faults arrives too.
    _write(c.origin.root, rng, "small/after.css", 5_000)
    (c.origin.root / "small/f000.html").unlink()
    c.wait_converged(timeout=60)


def test_a_stalled_link_delays_and_then_delivers_everything(proxied: tuple[Cluster, FaultProxy]) -> None:
    c, px = proxied
    rng = random.Random(8)
    px.stall()
    for i in range(30):
        _write(c.origin.root, rng, f"d{i % 3}/page{i}.html", rng.randint(1_000, 30_000))
    (c.origin.root / "anchor").rename(c.origin.root / "d0/anchor-moved")
    time.sleep(2.0)
    assert c.compare_trees(), "nothing can reach the replica while the link is stalled"
    px.resume()
    c.wait_converged(timeout=60)


def test_all_connections_reset_while_idle_then_changes_still_arrive(proxied: tuple[Cluster, FaultProxy]) -> None:
    c, px = proxied
    rng = random.Random(9)
    wait_for(lambda: px.reset_all() > 0, 10, "an open long poll to reset", every=0.05)
    _write(c.origin.root, rng, "late/file.txt", 12_345)
    c.wait_converged(timeout=60)


def test_a_large_file_resumes_where_each_reset_cut_it(proxied: tuple[Cluster, FaultProxy]) -> None:
    c, px = proxied
    rng = random.Random(10)
    # Every connection breaks after 1 MiB: a 6 MiB file arrives only if each new connection
    # continues where the last one stopped (Range), not from byte 0.
    px.reset_after = MiB
    size = 6 * MiB + 4321
    _write(c.origin.root, rng, "media/clip.mp4", size)
    c.wait_converged(timeout=90)
    assert px.resets >= 5, f"only {px.resets} resets: the fault was not exercised"
    # (The origin's bytes_sent counts what entered its socket buffers, lost ones too: the replica's
    # log says where each new connection started.)
    offsets = [int(x) for x in re.findall(r"media/clip\.mp4.*resuming at byte (\d+)",
                                          c.replicas["r1"].log.read_text(errors="replace"))]
    assert len(offsets) >= 5 and offsets == sorted(offsets) and offsets[0] > 0, offsets
