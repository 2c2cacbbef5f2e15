"""E2E: a large file modified in place reaches replicas as changed chunks only (real processes).

Bytes are asserted from the origin's per-replica counters (`bytes_sent` in /v1/status), never time.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.cluster import ClusterFactory

pytestmark = pytest.mark.e2e
MiB = 1 << 20
SIZE = 24 * MiB
EDIT = 100 << 10


def big(path: Path, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(SIZE // MiB):
            f.write(rng.randbytes(MiB))


def overwrite(path: Path, at: int, n: int, seed: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(random.Random(seed).randbytes(n))


def test_large_file_edited_in_place_moves_only_changed_chunks(make_cluster: ClusterFactory) -> None:
    c = make_cluster(n_replicas=2)
    p = c.origin.root / "media" / "video.bin"
    p.parent.mkdir()
    big(p)
    c.wait_converged(timeout=120)
    before = {rid: c.bytes_sent(rid) for rid in c.ids}
    assert all(b >= SIZE for b in before.values()), before
    overwrite(p, SIZE // 2, EDIT, seed=2)
    c.wait_converged(timeout=120)
    for rid in c.ids:
        moved = c.bytes_sent(rid) - before[rid]
        # 100 KiB edit + up to two neighbouring chunks each side + the chunk list (~36 B per chunk).
        assert moved < 1 * MiB, f"{rid} fetched {moved} bytes for a {EDIT}-byte edit of a {SIZE}-byte file"
    # A second edit elsewhere (and an append): still chunks, still identical trees.
    before = {rid: c.bytes_sent(rid) for rid in c.ids}
    overwrite(p, 1000, 5000, seed=3)
    with open(p, "ab") as f:
        f.write(b"tail" * 1000)
    c.wait_converged(timeout=120)
    for rid in c.ids:
        assert c.bytes_sent(rid) - before[rid] < 1 * MiB


def test_corrupted_local_copy_is_repaired_or_fetched_whole(make_cluster: ClusterFactory) -> None:
    c = make_cluster(n_replicas=1)
    p = c.origin.root / "a.bin"
    q = c.origin.root / "b.bin"
    big(p, seed=4)
    big(q, seed=5)
    c.wait_converged(timeout=120)
    rroot = c.replicas["r1"].root

    def tamper(name: str, write: Callable[[Path], None]) -> None:
        """Replica-side damage the replica does not know about (size and mtime kept)."""
        st = os.stat(rroot / name)
        write(rroot / name)
        os.utime(rroot / name, ns=(st.st_atime_ns, st.st_mtime_ns))

    # a.bin partly overwritten: the delta fetches the origin's edit and the damaged chunks.
    tamper("a.bin", lambda f: overwrite(f, 3 * MiB, 2 * MiB, seed=6))
    before = c.bytes_sent("r1")
    overwrite(p, SIZE // 2, EDIT, seed=8)
    c.wait_converged(timeout=120)
    moved = c.bytes_sent("r1") - before
    assert 2 * MiB <= moved < 4 * MiB, moved
    # b.bin replaced by unrelated content: nothing matches locally, so it is fetched whole.
    tamper("b.bin", lambda f: big(f, seed=7))
    before = c.bytes_sent("r1")
    overwrite(q, SIZE // 2, EDIT, seed=9)
    c.wait_converged(timeout=120)
    assert c.bytes_sent("r1") - before >= SIZE


def test_file_rewritten_during_transfer_converges(make_cluster: ClusterFactory) -> None:
    c = make_cluster(n_replicas=1)
    p = c.origin.root / "busy.bin"
    big(p, seed=10)
    c.wait_converged(timeout=120)
    import time

    for k in range(6):  # edits land while the replica may be chunking or fetching the previous one
        overwrite(p, (k * 3 + 1) * MiB, EDIT, seed=20 + k)
        time.sleep(0.15)
    c.wait_converged(timeout=120)
