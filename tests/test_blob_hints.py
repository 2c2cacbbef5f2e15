"""Blob lookups by path hint: the origin keeps no hash index, so requests name where the content is."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest

from fleetsync.hashing import hash_bytes
from fleetsync.journal.sqlite import SqliteJournal
from fleetsync.transport.client import BlobGone, UpstreamClient
from fleetsync.transport.wire import CHANGED, GONE, OK
from tests.helpers.apiserver import ApiServer


def test_origin_journal_has_no_hash_or_inode_index_and_replicas_keep_theirs(tmp_path: Path) -> None:
    o = SqliteJournal(str(tmp_path / "o.db"), content_index=False)
    names = {r[0] for r in o.db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "manifest_hash" not in names and "manifest_ino" not in names
    o.close()
    reader = SqliteJournal(str(tmp_path / "o.db"), durable=False)  # another connection: keeps what is there
    assert not reader.has_content_index and reader.paths_with_hash(b"\0" * 32) == []
    reader.close()
    r = SqliteJournal(str(tmp_path / "r.db"))
    assert r.has_content_index
    assert "manifest_hash" in {x[0] for x in r.db.execute("SELECT name FROM sqlite_master WHERE type='index'")}


async def test_blobs_are_found_by_their_path_hint(origin: ApiServer) -> None:
    a = origin.put("a/x.css", b"alpha" * 100)
    b = origin.put("b/y.js", b"beta" * 100)
    client = UpstreamClient(origin.url, replica_id="t")
    try:
        got = [(d, st, data) async for d, st, data in client.blobs([a.hash, b.hash], [b"a/x.css", b"b/y.js"])]
        assert [(st, hash_bytes(data)) for _, st, data in got] == [(OK, a.hash), (OK, b.hash)]
        # Without a hint (or with a stale one) the origin cannot find content: "gone", never a scan.
        got = [st async for _, st, _ in client.blobs([a.hash, b.hash], [None, b"a/x.css"])]
        assert got == [GONE, GONE]
        # Large-blob path: GET /v1/blob/<hex>?path=…
        fd = os.open(origin.root.parent / "out", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await client.blob_to_fd(a.hash, a.size, fd, hint=b"a/x.css")
            assert os.pread(fd, a.size + 1, 0) == b"alpha" * 100
            os.ftruncate(fd, 0)
            with pytest.raises(BlobGone):
                await client.blob_to_fd(a.hash, a.size, fd, hint=b"b/y.js")
        finally:
            os.close(fd)
    finally:
        await client.close()


async def test_a_blob_at_its_hint_is_served_without_a_manifest_lookup(origin: ApiServer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The hinted file is read and hashed; only when it does not hash right does the manifest decide."""
    a = origin.put("a/x.css", b"alpha" * 100)

    def no_lookup(*args: object) -> list[tuple[bytes, int, int]]:
        raise AssertionError("manifest lookup for a blob found at its hint")

    client = UpstreamClient(origin.url, replica_id="t")
    try:
        with monkeypatch.context() as m:
            m.setattr(origin.state._lookup, "find", no_lookup)
            got = [(st, data) async for _, st, data in client.blobs([a.hash], [b"a/x.css"])]
            assert got == [(OK, b"alpha" * 100)]
        # Other bytes at the hinted path (a change not recorded yet): the manifest still lists the
        # path with this hash, so the answer is "changed" (retry later), never wrong content.
        (origin.root / "a" / "x.css").write_bytes(b"ALPHA" * 100)
        assert [st async for _, st, _ in client.blobs([a.hash], [b"a/x.css"])] == [CHANGED]
        # A FIFO planted at the hint does not block the server.
        os.unlink(origin.root / "a" / "x.css")
        os.mkfifo(origin.root / "a" / "x.css")
        assert [st async for _, st, _ in client.blobs([a.hash], [b"a/x.css"])] == [CHANGED]
    finally:
        await client.close()


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs", "a/../../x", "a%00b", ""])
async def test_hostile_path_hints_are_refused(origin: ApiServer, bad: str) -> None:
    a = origin.put("a/x.css", b"alpha")
    async with aiohttp.ClientSession() as s:
        async with s.post(origin.url + "/v1/blobs", json={"hashes": [a.hash.hex()], "paths": [bad]}) as resp:
            assert resp.status == 400, await resp.text()
            assert "path" in (await resp.json())["error"]
        async with s.get(origin.url + f"/v1/blob/{a.hash.hex()}", params={"path": bad}) as resp:
            assert resp.status == 400
        async with s.post(origin.url + "/v1/blobs", json={"hashes": [a.hash.hex()], "paths": ["a", "b"]}) as resp:
            assert resp.status == 400  # not one hint per hash
