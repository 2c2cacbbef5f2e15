"""inotify under pressure: queue overflow and the watch limit never lose a change."""

from __future__ import annotations

import contextlib
import glob
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cluster import Cluster

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change fs.inotify sysctls (run as root, as CI does)")


@contextlib.contextmanager
def sysctl(name: str, value: int) -> Iterator[int]:
    """Temporarily set /proc/sys/fs/inotify/<name>, restoring it afterwards."""
    path = f"/proc/sys/fs/inotify/{name}"
    old = int(Path(path).read_text())
    Path(path).write_text(str(value))
    try:
        yield old
    finally:
        Path(path).write_text(str(old))


def watches_in_use() -> int:
    """inotify watches held by all processes right now."""
    n = 0
    for f in glob.glob("/proc/[0-9]*/fdinfo/*"):
        try:
            with open(f) as fh:
                n += sum(1 for line in fh if line.startswith("inotify wd:"))
        except OSError:
            continue
    return n


def _burst(root: Path, n: int, dirs: int = 20) -> None:
    for d in range(dirs):
        (root / f"burst{d:02d}").mkdir(exist_ok=True)
    for i in range(n):
        (root / f"burst{i % dirs:02d}" / f"f{i:05d}.html").write_bytes(b"<p>%d</p>" % i)


@needs_root
def test_queue_overflow_during_20k_burst_loses_nothing(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "c", n_replicas=2, origin_args=["--detector", "inotify"])
    try:
        # The queue size is fixed when the origin creates its inotify instance.
        with sysctl("max_queued_events", 64):
            c.start()
            c.wait_ready()
        c.wait_converged(timeout=60)
        writer = threading.Thread(target=_burst, args=(c.origin.root, 20000))
        writer.start()
        # Deletes and renames in the middle of the burst, also subject to the overflow.
        (c.origin.root / "anchor").rename(c.origin.root / "anchor2")
        writer.join()
        for i in range(0, 20000, 97):
            (c.origin.root / f"burst{i % 20:02d}" / f"f{i:05d}.html").unlink()
        st = c.wait_converged(timeout=240)
        assert st["overflows"] >= 1, "the test did not provoke an inotify overflow"
    finally:
        c.stop()


@needs_root
def test_watch_limit_exhaustion_falls_back_to_scanning(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "c", n_replicas=1, origin_args=["--detector", "inotify"])
    for d in range(30):
        (c.origin.root / f"dir{d:02d}" / "sub").mkdir(parents=True)
        (c.origin.root / f"dir{d:02d}" / "sub" / "a.html").write_bytes(b"a")
    try:
        with sysctl("max_user_watches", watches_in_use() + 10):
            c.start()
            c.wait_ready()
            st = c.wait_converged(timeout=60)
            assert st["unwatched"] > 0, "the test did not exhaust the watch limit"
            # Changes deep in subtrees that could not be watched still propagate.
            for d in range(30):
                sub = c.origin.root / f"dir{d:02d}" / "sub"
                (sub / "a.html").write_bytes(b"changed in place")
                (sub / "new.html").write_bytes(b"new")
                (c.origin.root / f"dir{d:02d}" / "gone").mkdir()
            (c.origin.root / "dir05" / "sub" / "new.html").unlink()
            (c.origin.root / "dir07").rename(c.origin.root / "dir07-moved")
            c.wait_converged(timeout=120)
    finally:
        c.stop()
