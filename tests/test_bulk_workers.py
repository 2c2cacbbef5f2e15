"""Bootstrap worker processes (replica/bulk.py): when they are used, and that they die with the replica."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fleetsync.errors import FleetsyncError
from fleetsync.replica import bulk


def test_used_only_where_a_worker_speaks_the_clients_protocol() -> None:
    assert bulk.usable("http://origin:8470", bwlimit=None)
    assert bulk.usable("https://origin:8470", bwlimit=None)
    assert not bulk.usable("http://origin:8470", bwlimit=1e6)  # the token bucket lives in the replica
    assert not bulk.usable("ftp://origin", bwlimit=None)


def test_worker_count_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEETSYNC_BOOTSTRAP_WORKERS", raising=False)
    assert 1 <= bulk.default_workers() <= 4
    monkeypatch.setenv("FLEETSYNC_BOOTSTRAP_WORKERS", "0")
    assert bulk.default_workers() == 0
    monkeypatch.setenv("FLEETSYNC_BOOTSTRAP_WORKERS", "two")
    with pytest.raises(FleetsyncError, match="FLEETSYNC_BOOTSTRAP_WORKERS"):
        bulk.default_workers()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def test_workers_die_with_the_replica(tmp_path: object) -> None:
    """A replica killed with SIGKILL mid-bootstrap leaves no worker writing behind it."""
    script = textwrap.dedent("""
        import os, sys, time
        from fleetsync.replica import bulk
        if __name__ == "__main__":
            pool = bulk.start_pool(1)
            print(pool.submit(os.getpid).result(), flush=True)
            pool.submit(time.sleep, 120)
            time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        assert not _gone(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(worker), f"worker {worker} outlived its replica"
    finally:
        if parent.poll() is None:
            parent.kill()
