#!/usr/bin/env python3
"""Chunk-level (delta) transfer versus a full fetch of a large file edited in place (issue 4).

An upstream API server runs in a child process over a root holding the NEW version of one file
(`--size` MiB, random content, `--edit` MiB overwritten in the middle); the client holds the OLD
version. It is fetched (a) whole, with `GET /v1/blob` as the replica does for large files, and
(b) with `fleetsync.transport.chunks.fetch_delta` (chunk list, local copies, missing ranges), cold
(the server computes the chunk list) and warm (cached). Reported: wall time, bytes received by the
client, bytes the server counted as sent, and the time the same bytes would take on a 1 Gbit/s link.

Usage:  .venv/bin/python bench/delta_transfer.py [--size 500] [--edit 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))

import aiohttp  # noqa: E402

from fleetsync.entry import FILE, PUT, Entry, Record  # noqa: E402
from fleetsync.hashing import hash_fd, new_hasher  # noqa: E402
from fleetsync.transport import chunks  # noqa: E402
from fleetsync.transport.wire import API  # noqa: E402

GBIT = 125e6


def serve(root: str, db: str, port: int) -> None:
    """Child process: serve the API (with /v1/chunks) over root, manifest in db."""
    from aiohttp import web

    from fleetsync.journal.sqlite import SqliteJournal
    from fleetsync.transport.server import ServerState, build_app

    j = SqliteJournal(db, durable=False)
    state = ServerState(j, root)
    app = build_app(state)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def make_files(workdir: str, size: int, edit: int) -> tuple[str, str, Entry]:
    root = os.path.join(workdir, "root")
    os.makedirs(root, exist_ok=True)
    new = os.path.join(root, "big.bin")
    old = os.path.join(workdir, "old.bin")
    with open(old, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
    shutil.copyfile(old, new)
    with open(new, "r+b") as f:
        f.seek(size // 2 - edit // 2)
        f.write(os.urandom(edit))
    fd = os.open(new, os.O_RDONLY)
    try:
        digest, _ = hash_fd(fd)
    finally:
        os.close(fd)
    st = os.stat(new)
    return old, root, Entry(FILE, 0o644, size, st.st_mtime_ns, digest)


def sent(url: str) -> int:
    st = json.loads(urllib.request.urlopen(url + API + "/status").read())
    return sum(r["bytes_sent"] for r in st["replicas"] if r["id"] == "bench")


async def full_fetch(url: str, e: Entry, out: str) -> tuple[float, int]:
    assert e.hash is not None
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    got = 0
    t = time.perf_counter()
    try:
        async with aiohttp.ClientSession(headers={"X-Fleetsync-Replica": "bench"}, auto_decompress=False) as s:
            async with s.get(f"{url}{API}/blob/{e.hash.hex()}") as resp:
                assert resp.status == 200, resp.status
                h = new_hasher()
                async for piece in resp.content.iter_chunked(1 << 20):
                    h.update(piece)
                    os.write(fd, piece)
                    got += len(piece)
        assert h.digest() == e.hash
    finally:
        os.close(fd)
    return time.perf_counter() - t, got


async def delta_fetch(url: str, e: Entry, old: str, out: str) -> tuple[float, chunks.DeltaResult]:
    assert e.hash is not None
    sfd = os.open(old, os.O_RDONLY)
    ofd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    t = time.perf_counter()
    try:
        async with aiohttp.ClientSession(headers={"X-Fleetsync-Replica": "bench"}, auto_decompress=False) as s:
            res = await chunks.fetch_delta(s, url, e.hash, e.size, sfd, ofd)
    finally:
        os.close(sfd)
        os.close(ofd)
    return time.perf_counter() - t, res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=500, help="file size in MiB (default 500)")
    ap.add_argument("--edit", type=float, default=1, help="edit size in MiB, in the middle (default 1)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve[0], a.serve[1], int(a.serve[2]))
        return 0
    workdir = a.workdir or tempfile.mkdtemp(prefix="fleetsync-delta-")
    size, edit = a.size << 20, int(a.edit * (1 << 20))
    old, root, e = make_files(workdir, size, edit)
    from fleetsync.journal.sqlite import SqliteJournal

    db = os.path.join(workdir, "origin.db")
    j = SqliteJournal(db, durable=False)
    j.apply_records([Record(1, PUT, b"big.bin", e)])
    j.close()
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", root, db, str(port)])
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + API + "/status", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        out = os.path.join(workdir, "out.bin")
        for rep in range(3):
            before = sent(url)
            secs, got = asyncio.run(full_fetch(url, e, out))
            rows.append({"mode": "full", "rep": rep, "seconds": round(secs, 3), "client_bytes": got,
                         "server_bytes": sent(url) - before, "at_1Gbit_s": round(secs + got / GBIT, 2)})
            before = sent(url)
            secs, res = asyncio.run(delta_fetch(url, e, old, out))
            wire = res.fetched + res.list_bytes
            rows.append({"mode": "delta " + ("cold" if rep == 0 else "warm"), "rep": rep, "seconds": round(secs, 3),
                         "client_bytes": wire, "server_bytes": sent(url) - before, "ranges": res.ranges,
                         "chunks": res.chunks, "list_bytes": res.list_bytes, "reused": res.reused,
                         "at_1Gbit_s": round(secs + wire / GBIT, 2)})
        for r in rows:
            print(json.dumps({"size_MiB": a.size, "edit_MiB": a.edit, **r}))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
