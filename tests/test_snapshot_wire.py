"""The snapshot's rows format against a real API server, the old per-entry format, and hostile streams."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from fleetsync import paths
from fleetsync.entry import DIR, LINK, PUT, Entry, Record, Row, row_of
from fleetsync.errors import FleetsyncError
from fleetsync.replica.follower import Replica
from fleetsync.transport import client as client_mod
from fleetsync.transport.client import UpstreamClient
from tests.helpers.apiserver import ApiServer

ODD = ["plain.html", "with space.css", "new\nline", "per%cent", "ünïcode/é.txt", "deep/a/b/c/d.js"]


async def _rows(url: str) -> list[Row]:
    c = UpstreamClient(url, replica_id="t")
    try:
        _, _, chunks = await c.snapshot()
        return [r async for rows in chunks for r in rows]
    finally:
        await c.close()


async def test_rows_format_carries_the_manifest_the_entries_format_does(origin: ApiServer) -> None:
    """Files with odd names (and a non-UTF-8 one), directories and symlinks: both formats, one manifest."""
    for i, name in enumerate(ODD * 400):  # 2,400 files: more than one line of rows
        origin.put(f"{i:04d}-{name}", name.encode() * (i % 7 + 1))
    raw = b"bin\xff\xfe-name"
    e_raw = origin.put("placeholder", b"x")
    origin.seq += 1
    origin.journal.apply_records([
        Record(origin.seq, PUT, raw, e_raw),
        Record(origin.seq + 1, PUT, b"adir", Entry(DIR, 0o2755)),
        Record(origin.seq + 2, PUT, b"alink", Entry(LINK, 0o777, target=b"../t\xffrget with space")),
    ])
    rows = await _rows(origin.url)
    seq, want = origin.journal.snapshot()
    assert rows == [row_of(p, e) for p, e in want]
    assert len(rows) == 2400 + 4 and (raw, "f", 0o644, 1, e_raw.mtime_ns, e_raw.hash, None) in rows

    async with aiohttp.ClientSession() as s, s.get(origin.url + "/v1/snapshot") as resp:
        lines = (await resp.read()).split(b"\n")
    head, body, end = json.loads(lines[0]), lines[1:-2], json.loads(lines[-2])
    assert "format" not in head and end == {"end": True, "count": len(rows)}
    old = [row_of(paths.decode_checked(d["p"]), Entry.from_wire(d["e"])) for d in map(json.loads, body)]
    assert old == rows


class Upstream:
    """A fake upstream whose snapshot body is given by the test."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> "Upstream":
        async def snapshot(_: web.Request) -> web.Response:
            return web.Response(body=self.body, content_type="application/x-ndjson")

        app = web.Application()
        app.router.add_get("/v1/snapshot", snapshot)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def _lines(*objs: object) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


H = "ab" * 32
HEAD = {"journal_id": "j1", "seq": 7, "format": "rows"}


async def test_an_upstream_without_the_rows_format_is_still_read() -> None:
    entries = [{"p": f"d/f{i:05d}", "e": {"k": "f", "m": 420, "s": i, "t": i, "h": H}} for i in range(2500)]
    body = _lines({"journal_id": "j1", "seq": 7}, {"p": "d", "e": {"k": "d", "m": 493}}, *entries,
                  {"end": True, "count": 2501})
    async with Upstream(body) as up:
        rows = await _rows(up.url)
    assert rows[0] == (b"d", "d", 0o755, 0, 0, None, None)
    assert rows[1:] == [(f"d/f{i:05d}".encode(), "f", 420, i, i, bytes.fromhex(H), None) for i in range(2500)]


GOOD = ["a", "f", 420, 1, 2, H]


@pytest.mark.parametrize("body, error", [
    (_lines(HEAD, [["../escape", "f", 420, 1, 2, H]], {"end": True, "count": 1}), "bad component"),
    (_lines(HEAD, [["/abs", "f", 420, 1, 2, H]], {"end": True, "count": 1}), "absolute path"),
    (_lines(HEAD, [["a", "f", 420, 1, 2, "zz"]], {"end": True, "count": 1}), "bad hash"),
    (_lines(HEAD, [["a", "f", 420, -1, 2, H]], {"end": True, "count": 1}), "bad file row"),
    (_lines(HEAD, [["a", "x", 420]], {"end": True, "count": 1}), "bad row kind"),
    (_lines(HEAD, [["a", "l", 511, ""]], {"end": True, "count": 1}), "bad symlink target"),
    (_lines(HEAD, ["not a row"], {"end": True, "count": 1}), "must be a list"),
    (_lines(HEAD, [GOOD]), "truncated after 1 entries"),
    (_lines(HEAD, [GOOD]) + b'["a", "f"', "truncated after 1 entries"),
    (_lines(HEAD, [GOOD], {"end": True, "count": 2}), "count mismatch"),
    (_lines(HEAD, [GOOD], 42), "bad line after 1 entries"),
    (_lines(HEAD) + b"{not json\n", "bad line after 0 entries"),
    (b"garbage\n", "bad header"),
])
async def test_hostile_snapshots_are_refused_with_context(body: bytes, error: str) -> None:
    async with Upstream(body) as up:
        with pytest.raises(FleetsyncError, match=error) as exc:
            await _rows(up.url)
    assert "snapshot" in str(exc.value) or "path" in str(exc.value) or "row" in str(exc.value)


async def test_overlong_snapshot_line_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "SNAPSHOT_LINE_MAX", 1000)
    async with Upstream(_lines(HEAD, [GOOD] * 100, {"end": True, "count": 100})) as up:
        with pytest.raises(FleetsyncError, match="line longer than 1000 bytes"):
            await _rows(up.url)


async def test_a_refused_snapshot_leaves_the_replica_as_it_was(tmp_path: Path) -> None:
    """A bootstrap that meets a hostile row stages nothing for good and writes nothing."""
    body = _lines(HEAD, [GOOD, ["ok/../../x", "f", 420, 1, 2, H]], {"end": True, "count": 2})
    (tmp_path / "state").mkdir()
    async with Upstream(body) as up:
        rep = Replica(str(tmp_path / "root"), str(tmp_path / "state"), up.url, "t")
        try:
            with pytest.raises(FleetsyncError, match="bad component"):
                await rep.resync(bootstrap=True)
            assert rep.journal.meta("bootstrapped") is None and rep.journal.head() == 0
            assert rep.journal.count() == 0
        finally:
            await rep.close()
    assert list((tmp_path / "root").iterdir()) == []
