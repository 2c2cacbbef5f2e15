"""Bootstrapping a replica whose root already holds (some of) the content: nothing right is re-sent."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from tests.helpers.cluster import Cluster


def _fill(root: Path, n: int, seed: int) -> dict[Path, int]:
    rng = random.Random(seed)
    sizes = {}
    for i in range(n):
        p = root / f"d{i % 7}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(1, 30000))
        p.write_bytes(data)
        sizes[p] = len(data)
    os.symlink("d0/f0.bin", root / "link")
    return sizes


def test_prefilled_root_is_verified_not_redownloaded(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "c", n_replicas=1)
    sizes = _fill(c.origin.root, 300, seed=1)
    r = c.replicas["r1"]
    # The replica root already has the tree (same bytes, modes, nanosecond mtimes)…
    shutil.copytree(c.origin.root, r.root, symlinks=True, dirs_exist_ok=True)
    # …except: one file has different content (same size and mtime: only the hash can tell),
    # one is missing, and there is one extra file and one extra directory to delete.
    victim = r.root / "d1" / "f1.bin"
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    (r.root / "d2" / "f2.bin").unlink()
    (r.root / "stale.html").write_bytes(b"old")
    (r.root / "stale-dir" / "x").mkdir(parents=True)
    try:
        c.start()
        c.wait_ready()
        c.wait_converged(timeout=60)
        sent = c.bytes_sent("r1")
        expected = sizes[c.origin.root / "d1" / "f1.bin"] + sizes[c.origin.root / "d2" / "f2.bin"]
        assert sent == expected, f"fetched {sent} bytes, only {expected} were missing or wrong"
        assert not (r.root / "stale.html").exists() and not (r.root / "stale-dir").exists()
    finally:
        c.stop()


def test_empty_replica_joins_late_and_fetches_each_blob_once(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "c", n_replicas=1)
    sizes = _fill(c.origin.root, 200, seed=2)
    # Duplicate content under other names: fetched once, copied locally.
    for i in range(20):
        shutil.copy2(c.origin.root / "d3" / "f3.bin", c.origin.root / "d3" / f"copy{i}.bin")
    try:
        c.start()
        c.wait_ready()
        c.wait_converged(timeout=60)
        anchor = len((c.origin.root / "anchor").read_bytes())
        assert c.bytes_sent("r1") == sum(sizes.values()) + anchor
    finally:
        c.stop()
