"""A replica started with --listen relays: another replica can follow it instead of the origin."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import tree
from tests.helpers.cluster import Cluster, Node, Proc


def test_replica_relays_to_a_downstream_replica(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "c", n_replicas=1, replica_listen=True)
    for i in range(100):
        (c.origin.root / "d" / f"{i % 5}").mkdir(parents=True, exist_ok=True)
        (c.origin.root / "d" / f"{i % 5}" / f"f{i}.css").write_bytes(b"body{}" * i)
    down = Node("downstream", c.base)
    relay = c.replicas["r1"]
    try:
        c.start()
        c.wait_ready()
        c.wait_converged(timeout=60)
        down.proc = Proc("downstream", ["replica", "--root", str(down.root), "--state", str(down.state),
                                        "--upstream", relay.url, "--id", "downstream"], down.log, c.base)
        down.proc.start()
        (c.origin.root / "d" / "0").rename(c.origin.root / "d" / "zero")
        (c.origin.root / "late.html").write_bytes(b"late")
        c.wait_converged(timeout=60)

        def relay_done() -> bool:
            st = c.replica_status("r1")
            ents = [r for r in st["replicas"] if r["id"] == "downstream"]
            return bool(ents) and ents[0]["applied_seq"] == st["seq"] == c.status()["seq"]

        import time

        deadline = time.monotonic() + 60
        while not relay_done():
            assert time.monotonic() < deadline, "downstream never caught up with the relay\n" + c.logs_report()
            time.sleep(0.2)
        want = tree.snapshot(c.origin.root)
        got = tree.snapshot(down.root)
        assert not tree.diff(want, got), tree.diff(want, got)
        # The origin served the downstream nothing: the relay did.
        assert c.replica_entry(c.status(), "downstream") is None
    finally:
        if down.proc is not None:
            down.proc.terminate()
        c.stop()
