"""Bootstrapping a replica whose root already holds (some of) the content: nothing right is re-sent."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

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


def test_bootstrap_workers_fill_an_empty_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With worker processes (bulk.py) the bootstrap gives the same tree: odd names, duplicates, large files."""
    monkeypatch.setenv("FLEETSYNC_BULK_MIN_ENTRIES", "1")
    monkeypatch.setenv("FLEETSYNC_BOOTSTRAP_WORKERS", "2")
    c = Cluster(tmp_path / "c", n_replicas=1)
    root = c.origin.root
    sizes = _fill(root, 400, seed=3)
    odd = [b"sp ace.txt", b"new\nline", b"\xff\xfe-latin1.bin", b"-dash", b"caf\xc3\xa9.html", b"empty"]
    os.makedirs(root / "odd", exist_ok=True)
    for i, name in enumerate(odd):
        with open(os.path.join(bytes(root / "odd"), name), "wb") as f:
            f.write(b"" if name == b"empty" else name * (i + 1))
    for i in range(5):
        shutil.copy2(root / "d1" / "f1.bin", root / "d1" / f"dup{i}.bin")
    (root / "big.bin").write_bytes(random.Random(4).randbytes(5 << 20))  # over the batch limit: the parent's
    os.chmod(root / "d2" / "f2.bin", 0o600)
    try:
        c.start()
        c.wait_ready()
        c.wait_converged(timeout=90)  # compares the trees (content, modes, mtimes, links)
        log = c.replicas["r1"].log.read_text(errors="replace")
        assert "worker processes" in log, "the bootstrap did not use its worker processes"
        anchor = len((root / "anchor").read_bytes())
        expected = sum(sizes.values()) + anchor + (5 << 20) + sum(len(n) * (i + 1) for i, n in enumerate(odd[:-1]))
        assert c.bytes_sent("r1") == expected  # each blob fetched once, duplicates included
    finally:
        c.stop()
