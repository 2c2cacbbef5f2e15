"""Real sftp uploads (OpenSSH sftp against sftp-server): a slowly written file is never served partially."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.helpers import selfcheck
from tests.helpers.cluster import Cluster

SFTP_SERVER = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server",
                                "/usr/lib/sftp-server") if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(
    SFTP_SERVER is None or shutil.which("sftp") is None,
    reason="needs OpenSSH's sftp client and sftp-server: apt-get install openssh-client openssh-sftp-server")

SIZE = 768 << 10


def _sftp(batch: str, cwd: Path, kbit: int) -> None:
    """Run OpenSSH sftp directly against a local sftp-server (-D), rate-limited to kbit/s."""
    r = subprocess.run(["sftp", "-q", "-l", str(kbit), "-D", SFTP_SERVER, "-b", "-"], input=batch, text=True,
                       capture_output=True, cwd=cwd, timeout=120)
    assert r.returncode == 0, f"sftp failed: {r.stdout}\n{r.stderr}"


def _recorded_sizes(c: Cluster, name: bytes) -> list[int]:
    db = sqlite3.connect(c.origin.state / "origin.db")
    try:
        return [s for (s,) in db.execute("SELECT size FROM records WHERE path=? AND op IN ('put','mv')", (name,))]
    finally:
        db.close()


@pytest.mark.parametrize("via_temp_name", [False, True], ids=["direct", "part-then-rename"])
def test_slow_sftp_upload_is_never_served_partially(tmp_path: Path, via_temp_name: bool) -> None:
    src = tmp_path / "upload.bin"
    src.write_bytes(selfcheck.make(random.Random(5).randbytes(SIZE)))
    c = Cluster(tmp_path / "c", n_replicas=2)
    readers = []
    try:
        c.start()
        c.wait_ready()
        c.wait_converged(timeout=60)
        readers = [selfcheck.TornReader(r.root, [b"big.bin"]) for r in c.replicas.values()]
        for t in readers:
            t.start()
        dest = c.origin.root / "big.bin"
        if via_temp_name:
            batch = f"put {src} {dest}.part\nrename {dest}.part {dest}\n"
        else:
            batch = f"put {src} {dest}\n"
        # ~1.2 Mbit/s: 32 KiB writes about every 0.2 s (a settle window), the upload lasts ~5 s.
        _sftp(batch, tmp_path, 1200)
        c.wait_converged(timeout=60)
        for r in c.replicas.values():
            assert (r.root / "big.bin").read_bytes() == src.read_bytes()
    finally:
        results = [t.stop() for t in readers]
        c.stop()
    for bad, good in results:
        assert not bad, f"a replica served a partial upload: {bad[:5]}"
    assert all(good > 0 for _, good in results), "the readers never saw the file"
    sizes = _recorded_sizes(c, b"big.bin")
    assert sizes and all(s == src.stat().st_size for s in sizes), f"origin journaled partial versions: {sizes}"
    if via_temp_name:
        assert _recorded_sizes(c, b"big.bin.part") == [], "the temp name must never be journaled"
