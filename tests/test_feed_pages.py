"""Feed pages: followers asking for the same page get the same bytes, read and encoded once per
journal state; a commit or a compaction gives a fresh page; an empty page is never cached."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from tests.helpers.apiserver import ApiServer


async def _page(s: aiohttp.ClientSession, url: str, after: int, rid: str, limit: int = 100) -> dict:
    params = {"after": str(after), "limit": str(limit), "wait": "0", "replica": rid}
    async with s.get(f"{url}/v1/feed", params=params) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        return json.loads(await resp.read())


async def test_followers_share_an_encoded_page_until_the_journal_changes(origin: ApiServer, tmp_path: Path) -> None:
    origin.put("a", b"1")
    origin.put("b", b"22")
    counts = origin.state.feed_pages
    async with aiohttp.ClientSession() as s:
        pages = [await _page(s, origin.url, 0, rid) for rid in ("r1", "r2", "r3")]
        assert pages[0] == pages[1] == pages[2]
        assert [r["seq"] for r in pages[0]["records"]] == [1, 2] and pages[0]["head"] == 2
        assert counts == {"cached": 2, "encoded": 1}
        # Another position or limit is another page.
        assert [r["seq"] for r in (await _page(s, origin.url, 1, "r1"))["records"]] == [2]
        assert [r["seq"] for r in (await _page(s, origin.url, 0, "r1", limit=1))["records"]] == [1]
        assert counts == {"cached": 2, "encoded": 3}
        # A commit moves the head: the same position gives the new records, not the cached page.
        origin.put("c", b"333")
        page = await _page(s, origin.url, 0, "r1")
        assert [r["seq"] for r in page["records"]] == [1, 2, 3] and page["head"] == 3
        # A compaction moves min_seq: the old page is not served for it either.
        assert (await _page(s, origin.url, 1, "r1"))["min_seq"] == 1
        origin.journal.compact(2)
        page = await _page(s, origin.url, 1, "r2")
        assert page["min_seq"] == 2 and [r["seq"] for r in page["records"]] == [2, 3]
        # An empty page (a caught-up follower) is not kept: the next commit must show up at once.
        before = dict(counts)
        for rid in ("r1", "r2"):
            assert (await _page(s, origin.url, 3, rid))["records"] == []
        assert counts["encoded"] == before["encoded"] + 2 and counts["cached"] == before["cached"]
        async with s.get(f"{origin.url}/v1/status") as resp:
            assert (await resp.json())["feed_pages"] == counts
