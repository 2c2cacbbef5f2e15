"""Deterministic end-to-end cases distilled from failures the generated workloads found."""

from __future__ import annotations

import os

import pytest

from tests.helpers.cluster import Cluster, ClusterFactory

pytestmark = pytest.mark.e2e


def _seed_tree(c: Cluster) -> None:
    """X/Y/child/f.txt, X/Y/g.txt, empty A and B, then wait for the replica to have it."""
    r = c.origin.root
    for d in ("X/Y/child", "A", "B"):
        (r / d).mkdir(parents=True, exist_ok=True)
    (r / "X/Y/child/f.txt").write_bytes(b"child file\n")
    (r / "X/Y/g.txt").write_bytes(b"g\n")
    c.wait_converged(timeout=30)


def test_move_dir_then_move_its_child_out(make_cluster: ClusterFactory) -> None:
    """mv X/Y B/Y; mv B/Y/child A/child  -> the replica must not keep B/Y/child."""
    c = make_cluster(n_replicas=1)
    _seed_tree(c)
    r = c.origin.root
    os.rename(r / "X/Y", r / "B/Y")
    os.rename(r / "B/Y/child", r / "A/child")
    c.wait_converged(timeout=30)


def test_move_child_into_new_dir_then_move_parent(make_cluster: ClusterFactory) -> None:
    """mkdir -p A/new/deeper; mv X/Y/child A/new/deeper/child; mv X/Y B/Y  -> replica converges."""
    c = make_cluster(n_replicas=1)
    _seed_tree(c)
    r = c.origin.root
    os.makedirs(r / "A/new/deeper")
    os.rename(r / "X/Y/child", r / "A/new/deeper/child")
    os.rename(r / "X/Y", r / "B/Y")
    c.wait_converged(timeout=30)


def test_move_child_out_then_move_parent(make_cluster: ClusterFactory) -> None:
    """mv X/Y/child A/child; mv X/Y B/Y  -> replica converges."""
    c = make_cluster(n_replicas=1)
    _seed_tree(c)
    r = c.origin.root
    os.rename(r / "X/Y/child", r / "A/child")
    os.rename(r / "X/Y", r / "B/Y")
    c.wait_converged(timeout=30)


@pytest.mark.parametrize("new_size", [10, 1000])
def test_truncate_by_path_propagates(make_cluster: ClusterFactory, new_size: int) -> None:
    """truncate(2) by path (no open, so no close event) must still reach the replica."""
    c = make_cluster(n_replicas=1)
    f = c.origin.root / "f.txt"
    f.write_bytes(b"x" * 1000)
    c.wait_converged(timeout=30)
    os.truncate(f, new_size)  # same size (1000) still updates mtime
    c.wait_converged(timeout=30)
