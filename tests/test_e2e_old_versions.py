"""End-to-end: replaced and deleted versions leave a replica's disk once it is idle."""

from __future__ import annotations

import os
import time

import pytest

from fleetsync import paths
from tests.helpers.cluster import ClusterFactory

pytestmark = pytest.mark.e2e


def _temps(root: bytes) -> list[bytes]:
    """Every temp-named entry (old versions waiting to be unlinked) under root."""
    rules = paths.IgnoreRules(())
    return [os.path.join(dp, n) for dp, dns, fns in os.walk(root) for n in dns + fns if rules.ignored(n)]


def test_old_versions_are_unlinked_once_the_replica_is_idle(make_cluster: ClusterFactory) -> None:
    """Edits and deletes converge at once; the old versions, set aside under temp names while the
    batches were applied, are gone from every replica soon after the changes stop."""
    c = make_cluster(n_replicas=2)
    d = c.origin.root / "site"
    d.mkdir()
    for i in range(60):
        (d / f"p{i:02d}.html").write_bytes(b"first %d\n" % i * 200)
    c.wait_converged(timeout=30)
    for i in range(40):
        (d / f"p{i:02d}.html").write_bytes(b"second %d\n" % i * 300)
    for i in range(40, 60):
        (d / f"p{i:02d}.html").unlink()
    c.wait_converged(timeout=30)
    deadline = time.monotonic() + 10
    left: dict[str, list[bytes]] = {}
    while time.monotonic() < deadline:
        left = {rid: _temps(n.broot) for rid, n in c.replicas.items()}
        if not any(left.values()):
            break
        time.sleep(0.1)
    assert not any(left.values()), f"old versions still on the replicas 10 s after convergence: {left}"
    for rid, n in c.replicas.items():
        names = sorted(os.listdir(n.root / "site"))
        assert names == [f"p{i:02d}.html" for i in range(40)], (rid, names)
