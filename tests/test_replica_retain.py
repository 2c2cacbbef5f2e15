"""A replica compacts the records it applied beyond `retain`; its own followers further behind resync."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from fleetsync.replica import follower
from fleetsync.replica.follower import Replica
from fleetsync.transport.server import ServerState, build_app
from tests.helpers import tree
from tests.helpers.apiserver import ApiServer, replica_in


async def _follow_until(rep: Replica, head: int, timeout: float = 30.0) -> None:
    """Run rep's follow loop until it has applied `head`, then stop it."""
    rep._stop.clear()
    task = asyncio.create_task(rep.run())
    try:
        deadline = time.monotonic() + timeout
        while rep.journal.head() < head:
            assert not task.done(), "follow loop ended"
            assert time.monotonic() < deadline, f"{rep.id} stuck at {rep.journal.head()} < {head}: {rep.last_error}"
            await asyncio.sleep(0.02)
    finally:
        rep.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_relay_compacts_and_a_follower_behind_it_resyncs(origin: ApiServer, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follower, "RETAIN_SLACK", 5)
    origin.put("first.css", b"a{}")
    relay = replica_in(tmp_path, origin.url, "relay", poll_wait=0.2, retain=10)
    srv = ServerState(relay.journal, str(tmp_path / "relay"), role="replica")
    relay.on_applied.append(srv.notify)
    runner = web.AppRunner(build_app(srv), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    relay_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    first = replica_in(tmp_path, relay_url, "down", poll_wait=0.2)
    down: Replica | None = None
    try:
        await _follow_until(relay, 1)
        await _follow_until(first, 1)
        await first.close()
        for i in range(40):  # seqs 2..41, applied by the relay while `down` is away
            origin.put(f"d{i % 4}/f{i}.js", b"x" * i)
        await _follow_until(relay, 41)
        j = relay.journal
        # Compacted to the newest `retain` records (once `retain + slack` had piled up).
        assert j.head() == 41 and 10 <= j.head() - j.min_seq() + 1 < 15
        kept = [r.seq for r in j.read(0, 100)]
        assert kept == list(range(j.min_seq(), 42))
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{relay_url}/v1/feed", params={"after": "1", "wait": "0"}) as resp:
                assert resp.status == 410
                assert (await resp.json())["min_seq"] == j.min_seq()
            async with s.get(f"{relay_url}/v1/feed", params={"after": str(j.min_seq() - 1), "wait": "0"}) as resp:
                assert resp.status == 200 and len((await resp.json())["records"]) == 41 - j.min_seq() + 1
        # The follower that was at seq 1 comes back: told it is behind, it resyncs from a snapshot.
        down = replica_in(tmp_path, relay_url, "down", poll_wait=0.2)
        await _follow_until(down, 41)
        assert down.stats.bootstraps == 1
        want = tree.snapshot(origin.root)
        assert not tree.diff(want, tree.snapshot(tmp_path / "down")) and not tree.diff(want, tree.snapshot(tmp_path / "relay"))
    finally:
        if down is not None:
            await down.close()
        await relay.close()
        await runner.cleanup()
        srv.close()


async def test_default_retain_keeps_every_record(origin: ApiServer, tmp_path: Path) -> None:
    origin.put("a", b"1")
    rep = replica_in(tmp_path, origin.url, "r", poll_wait=0.2)
    try:
        await _follow_until(rep, 1)
        for i in range(30):
            origin.put(f"b{i}", b"2")
        await _follow_until(rep, 31)
        assert rep.journal.min_seq() == 2 and len(rep.journal.read(0, 100)) == 30
    finally:
        await rep.close()


@pytest.mark.parametrize("command", ["replica", "origin"])
def test_cli_retain_option(tmp_path: Path, command: str) -> None:
    """Both commands take --retain (at least 1,000) and refuse less with the option named."""
    from click.testing import CliRunner

    from fleetsync.cli import main

    assert "--retain" in CliRunner().invoke(main, [command, "--help"]).output
    args = [command, "--root", str(tmp_path / "r"), "--state", str(tmp_path / "s"), "--retain", "10"]
    if command == "replica":
        args += ["--upstream", "http://127.0.0.1:1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "--retain" in res.output and "1000" in res.output, res.output
    assert not (tmp_path / "s").exists()
