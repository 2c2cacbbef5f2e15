"""The ``fleetsync status`` command against a live origin: JSON and text forms."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.cluster import Cluster, ClusterFactory

pytestmark = pytest.mark.e2e

IDS = ["web-alpha", "web-bravo"]


def _status_cli(c: Cluster, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fleetsync status --upstream URL *extra``."""
    return subprocess.run([sys.executable, "-m", "fleetsync", "status", "--upstream", c.origin.url, *extra],
                          capture_output=True, text=True, timeout=60)


def test_status_json_and_text(make_cluster: ClusterFactory) -> None:
    """``status --json`` parses and lists every replica with its lag fields; the text form names each replica."""
    c = make_cluster(n_replicas=2, ids=IDS)
    (c.origin.root / "hello.html").write_bytes(b"<p>hello</p>\n")
    st = c.wait_converged(timeout=60)

    res = _status_cli(c, "--json")
    assert res.returncode == 0, f"status --json exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    try:
        doc = json.loads(res.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"status --json printed invalid JSON ({e}):\n{res.stdout}") from None
    assert isinstance(doc.get("seq"), int), doc
    assert doc["seq"] >= st["seq"] > 0, (doc, st)
    assert isinstance(doc.get("replicas"), list), doc
    by_id = {r.get("id"): r for r in doc["replicas"]}
    assert set(IDS) <= set(by_id), f"replica ids {sorted(map(str, by_id))} do not include {IDS}"
    for rid in IDS:
        r = by_id[rid]
        for key in ("id", "applied_seq", "lag_records", "lag_seconds"):
            assert key in r, f"replica entry {r} lacks {key!r}"
        assert isinstance(r["applied_seq"], int) and r["applied_seq"] > 0, r
        assert isinstance(r["lag_records"], int) and r["lag_records"] >= 0, r
        assert isinstance(r["lag_seconds"], (int, float)) and r["lag_seconds"] >= 0, r

    res = _status_cli(c)
    assert res.returncode == 0, f"status exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    for rid in IDS:
        assert rid in res.stdout, f"text status does not mention replica {rid}:\n{res.stdout}"
