"""Invariants 3 and 6 end to end: hostile upstreams, a vanished or emptied origin root; publish."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fleetsync.hashing import hash_bytes
from tests.helpers.cluster import Cluster, free_port, wait_for


def test_emptied_origin_root_pauses_instead_of_mass_delete(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "c", n_replicas=1)
    for i in range(50):
        (c.origin.root / f"page{i}.html").write_bytes(b"x" * i)
    try:
        c.start()
        c.wait_ready()
        c.wait_converged(timeout=60)
        seq = c.status()["seq"]
        # The volume "unmounts": everything vanishes at once.
        for p in c.origin.root.iterdir():
            p.unlink()
        st = wait_for(lambda: (s := c.status())["paused"] and s, what="origin to pause")
        assert "empty" in st["paused"]
        time.sleep(1.0)
        assert c.status()["seq"] == seq, "nothing may be journaled while paused"
        assert len(list(c.replicas["r1"].root.iterdir())) == 51, "the replica keeps serving its content"
        # The volume comes back: propagation resumes and nothing was lost.
        for i in range(50):
            (c.origin.root / f"page{i}.html").write_bytes(b"x" * i)
        (c.origin.root / "anchor").write_bytes(b"anchor: this file is never deleted by the tests\n")
        wait_for(lambda: c.status()["paused"] is None, what="origin to resume")
        c.wait_converged(timeout=60)
    finally:
        c.stop()


def test_removed_origin_root_pauses(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "c", n_replicas=1)
    (c.origin.root / "sub").mkdir()
    (c.origin.root / "sub" / "a").write_bytes(b"a")
    try:
        c.start()
        c.wait_ready()
        c.wait_converged(timeout=60)
        shutil.rmtree(c.origin.root)
        st = wait_for(lambda: (s := c.status())["paused"] and s, what="origin to pause")
        assert "root" in st["paused"]
        assert (c.replicas["r1"].root / "sub" / "a").read_bytes() == b"a"
    finally:
        c.stop()


def test_publish_cli_paths_and_errors(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "c", n_replicas=1)
    try:
        c.start()
        c.wait_ready()
        f = c.origin.root / "app" / "generated.html"
        f.parent.mkdir()
        f.write_bytes(b"<p>hi</p>")
        exe = [sys.executable, "-m", "fleetsync", "publish", "--upstream", c.origin.url]
        ok = subprocess.run(exe + [str(f)], capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        assert "update" in ok.stdout
        bad = subprocess.run(exe + [str(c.origin.root / "nope"), "/etc/passwd", str(f.parent)],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 1
        assert "no such file" in bad.stderr and "outside the origin root" in bad.stderr
        assert "directory: rescanning" in bad.stdout
        stdin = subprocess.run(exe + ["--stdin", "-0"], input=f"{f}\0", capture_output=True, text=True, timeout=30)
        assert stdin.returncode == 0, stdin.stderr
        c.wait_converged(timeout=60)
        assert (c.replicas["r1"].root / "app" / "generated.html").read_bytes() == b"<p>hi</p>"
    finally:
        c.stop()


class HostileUpstream:
    """A real HTTP server that speaks the feed protocol but sends hostile records."""

    def __init__(self, records: list[dict[str, Any]], blobs: dict[bytes, bytes]) -> None:
        self.records = records
        self.blobs = blobs
        self.errors: list[str] = []
        self.port = free_port()
        self._loop: Any = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        import asyncio

        async def snapshot(_: web.Request) -> web.StreamResponse:
            body = json.dumps({"journal_id": "evil", "seq": 0}) + "\n" + json.dumps({"end": True, "count": 0}) + "\n"
            return web.Response(body=body.encode(), content_type="application/x-ndjson")

        async def feed(request: web.Request) -> web.Response:
            if request.query.get("error"):
                self.errors.append(request.query["error"])
            after = int(request.query["after"])
            recs = [r for r in self.records if r["seq"] > after]
            if not recs:
                await asyncio.sleep(0.2)
            return web.json_response({"journal_id": "evil", "head": len(self.records), "min_seq": 1,
                                      "records": recs})

        async def blobs(request: web.Request) -> web.StreamResponse:
            import struct

            body = await request.json()
            out = b""
            for h in body["hashes"]:
                d = bytes.fromhex(h)
                data = self.blobs.get(d, b"")
                out += struct.pack(">32sBQ", d, 0, len(data)) + data
            return web.Response(body=out, content_type="application/octet-stream")

        async def main() -> None:
            app = web.Application()
            app.router.add_get("/v1/snapshot", snapshot)
            app.router.add_get("/v1/feed", feed)
            app.router.add_post("/v1/blobs", blobs)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            await asyncio.Event().wait()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())

    def start(self) -> "HostileUpstream":
        """Serve in a background thread."""
        self._thread.start()
        return self


@pytest.mark.parametrize("path", ["../escape", "/tmp/abs-escape", "a/../../escape", "a%00b", "x" * 300,
                                  "ok/%2E%2E/%2E%2E/escape", ""])
def test_hostile_paths_are_refused_and_reported(tmp_path: Path, path: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    data = b"pwned"
    h = hash_bytes(data)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link")  # a symlinked parent planted in the replica root
    entry = {"k": "f", "m": 0o644, "s": len(data), "t": 0, "h": h.hex()}
    records = [{"seq": 1, "op": "put", "path": path, "e": entry, "ts": 0}]
    up = HostileUpstream(records, {h: data}).start()
    proc = subprocess.Popen([sys.executable, "-m", "fleetsync", "replica", "--root", str(root),
                             "--state", str(tmp_path / "state"), "--upstream", f"http://127.0.0.1:{up.port}",
                             "--id", "victim"], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: up.errors, what="the replica to report an error upstream")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert not list(outside.iterdir()), "nothing may be written outside the root"
    assert not (tmp_path / "escape").exists() and not Path("/tmp/abs-escape").exists()
    msg = up.errors[-1]
    assert "refusing record seq 1" in msg, msg
    assert "ERROR" in err


def test_symlinked_parent_in_replica_root_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    data = b"content"
    h = hash_bytes(data)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link")
    entry = {"k": "f", "m": 0o644, "s": len(data), "t": 5, "h": h.hex()}
    up = HostileUpstream([{"seq": 1, "op": "put", "path": "link/file", "e": entry, "ts": 0}], {h: data}).start()
    proc = subprocess.Popen([sys.executable, "-m", "fleetsync", "replica", "--root", str(root),
                             "--state", str(tmp_path / "state"), "--upstream", f"http://127.0.0.1:{up.port}",
                             "--id", "victim"], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (root / "link" / "file").exists(), what="the file to land inside the root")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert not (root / "link").is_symlink() and (root / "link" / "file").read_bytes() == data
    assert not list(outside.iterdir())
