"""E2E: zstd on the blob stream (--compress on) and plain (--compress off) both converge; on the wire
the compressed replica costs the origin fewer bytes for compressible content (real processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cluster import Cluster

pytestmark = pytest.mark.e2e


def test_compressed_and_plain_replicas_converge_compressed_is_smaller(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "c", n_replicas=2)
    assert c.replicas["r1"].proc is not None and c.replicas["r2"].proc is not None
    c.replicas["r1"].proc.args += ["--compress", "on"]
    c.replicas["r2"].proc.args += ["--compress", "off"]
    css = b"".join(b".rule-%d { margin: %dpx; color: #%06x; }\n" % (i, i % 40, i * 7919 % 0xFFFFFF)
                   for i in range(2000))
    for i in range(150):
        d = c.origin.root / "assets" / f"d{i % 6}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"site{i}.css").write_bytes(css[i * 97:] + b"/* %d */" % i)
    try:
        c.start()
        c.wait_ready()
        c.wait_converged(timeout=90)
        # A second round after start-up: new and modified files.
        for i in range(0, 150, 3):
            (c.origin.root / "assets" / f"d{i % 6}" / f"site{i}.css").write_bytes(css[: 40_000 + i] + b"/* v2 */")
        (c.origin.root / "assets" / "new.css").write_bytes(css * 3)
        c.wait_converged(timeout=90)
        on, off = c.bytes_sent("r1"), c.bytes_sent("r2")
        assert off > 5_000_000, off
        assert on < off / 3, (on, off)
    finally:
        c.stop()
