"""A real API server (build_app on a loopback port) over a root and a journal, in the test's own event loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from fleetsync.entry import FILE, PUT, Entry, Record
from fleetsync.hashing import hash_bytes
from fleetsync.journal.sqlite import SqliteJournal
from fleetsync.replica.follower import Replica
from fleetsync.transport.server import ServerState, build_app


class ApiServer:
    """build_app over tmp/origin and tmp/origin.db; `put` writes a file and records it in the manifest.

    content_index=False gives the origin's journal (no hash index: blobs are found by path hint).
    """

    def __init__(self, tmp: Path, *, content_index: bool = True) -> None:
        self.root = tmp / "origin"
        self.root.mkdir()
        self.journal = SqliteJournal(str(tmp / "origin.db"), durable=False, content_index=content_index)
        self.state = ServerState(self.journal, str(self.root))
        self.seq = 0
        self.url = ""
        self.runner: web.AppRunner | None = None

    def put(self, name: str, data: bytes) -> Entry:
        """Write root/name and record it (parents created on disk only)."""
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        e = Entry(FILE, 0o644, len(data), p.stat().st_mtime_ns, hash_bytes(data))
        self.seq += 1
        self.journal.apply_records([Record(self.seq, PUT, name.encode(), e)])
        return e

    async def start(self) -> None:
        """Serve on an ephemeral loopback port; sets url."""
        self.runner = web.AppRunner(build_app(self.state), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Stop serving and close the state and the journal."""
        if self.runner is not None:
            await self.runner.cleanup()
        self.state.close()
        self.journal.close()

    def sent(self, rid: str = "t") -> int:
        """Content bytes the server counted for follower rid."""
        f = self.state.followers.get(rid)
        return f.bytes_sent if f else 0


def replica_in(base: Path, url: str, name: str = "replica", rid: str | None = None, **kw: Any) -> Replica:
    """A Replica of url with its root at base/name and its state at base/<name>-state (id: rid or name)."""
    (base / f"{name}-state").mkdir(exist_ok=True)
    return Replica(str(base / name), str(base / f"{name}-state"), url, rid or name, **kw)
