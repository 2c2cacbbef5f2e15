"""HTTP client for an upstream (origin or relay): feed, blobs, snapshot, status."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.http_exceptions import LineTooLong

from fleetsync import paths
from fleetsync.entry import Entry, Record, Row, row_from_wire, row_of
from fleetsync.errors import FleetsyncError, IntegrityError, ResyncNeeded
from fleetsync.hashing import new_hasher
from fleetsync.transport.compress import DecodingReader, request_headers
from fleetsync.transport.wire import API, BATCH_MAX_HASHES, HEADER, OK, STATUS_NAMES


#: Longest snapshot line accepted (a rows line holds up to 1000 rows of percent-encoded paths).
SNAPSHOT_LINE_MAX = 16 << 20


@dataclass(slots=True)
class FeedPage:
    """One page of the change feed."""

    journal_id: str
    head: int
    min_seq: int
    records: list[Record]


class TokenBucket:
    """Limits an average byte rate: consume(n) sleeps while more was taken than the rate allows."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"bandwidth limit must be positive, got {rate}")
        self.rate = float(rate)
        self.capacity = float(burst if burst is not None else min(max(rate / 8, 16 << 10), 1 << 20))
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    async def consume(self, n: int) -> None:
        """Take n bytes; sleep until the bucket is no longer in debt."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate) - n
        self.stamp = now
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


class UpstreamClient:
    """Talks to one upstream over HTTP; counts payload bytes received; optionally limits content bandwidth."""

    def __init__(self, base_url: str, *, replica_id: str = "", token: str | None = None,
                 timeout: float = 60.0, bwlimit: float | None = None, compress: bool = False) -> None:
        self.base = base_url.rstrip("/")
        self.replica_id = replica_id
        headers = {"X-Fleetsync-Replica": replica_id}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        #: Headers sent on every request (replica id, token).
        self.headers: dict[str, str] = dict(headers)
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout),
            auto_decompress=False,
        )
        self.bytes_received = 0
        self.compress = compress
        self._bucket = TokenBucket(bwlimit) if bwlimit else None
        self._chunk = min(1 << 20, max(int(bwlimit / 16), 16 << 10)) if bwlimit else 1 << 20

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP session (for chunk-level transfers, transport/chunks.py)."""
        return self._session

    async def account(self, n: int) -> None:
        """Count n content bytes received outside this class, paying the bandwidth limit."""
        self.bytes_received += n
        if self._bucket is not None:
            await self._bucket.consume(n)

    async def close(self) -> None:
        """Close connections."""
        await self._session.close()

    def _where(self, what: str) -> str:
        return f"{what} from {self.base}"

    async def _check(self, resp: aiohttp.ClientResponse, what: str) -> None:
        if resp.status >= 400:
            body = (await resp.text())[:300]
            raise FleetsyncError(f"{self._where(what)}: HTTP {resp.status}: {body}")

    async def status(self) -> dict[str, Any]:
        """GET /v1/status."""
        async with self._session.get(self.base + API + "/status") as resp:
            await self._check(resp, "status")
            return await resp.json()

    async def feed(self, after: int, *, limit: int = 2000, wait: float = 20.0, applied: int | None = None,
                   error: str | None = None) -> FeedPage:
        """Long-poll the change feed for records after `after`."""
        params: dict[str, str] = {"after": str(after), "limit": str(limit), "wait": str(wait),
                                  "replica": self.replica_id, "applied": str(applied if applied is not None else after)}
        if error:
            params["error"] = error[:300]
        async with self._session.get(self.base + API + "/feed", params=params) as resp:
            if resp.status == 410:
                body = await resp.json()
                raise ResyncNeeded(f"{self._where('feed')}: {body.get('error')} (min_seq {body.get('min_seq')})")
            await self._check(resp, f"feed after {after}")
            body = await resp.json()
        try:
            recs = []
            for r in body["records"]:
                try:
                    recs.append(Record.from_wire(r))
                except FleetsyncError as e:
                    seq = r.get("seq") if isinstance(r, dict) else None
                    raise FleetsyncError(f"{self._where('feed')}: refusing record seq {seq}: {e}") from e
            page = FeedPage(str(body["journal_id"]), int(body["head"]), int(body["min_seq"]), recs)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FleetsyncError(f"{self._where('feed')}: malformed response: {e!r}") from e
        prev = after
        for r in recs:
            if r.seq <= prev:
                raise FleetsyncError(f"{self._where('feed')}: records out of order at seq {r.seq}")
            prev = r.seq
        return page

    async def blobs(self, digests: list[bytes], hints: list[bytes | None] | None = None
                    ) -> AsyncIterator[tuple[bytes, int, bytes]]:
        """Fetch many small blobs in one stream; yields (digest, status, data) in request order.

        hints: for each digest, a path where the upstream should hold it (the origin looks blobs
        up by path; it keeps no hash index).
        """
        for i in range(0, len(digests), BATCH_MAX_HASHES):
            chunk = digests[i:i + BATCH_MAX_HASHES]
            req: dict[str, Any] = {"hashes": [d.hex() for d in chunk]}
            if hints is not None:
                req["paths"] = [paths.encode(h) if h else None for h in hints[i:i + BATCH_MAX_HASHES]]
            body = json.dumps(req)
            async with self._session.post(self.base + API + "/blobs", data=body,
                                          headers={"Content-Type": "application/json",
                                                   **request_headers(self.compress)}) as resp:
                await self._check(resp, f"blob batch of {len(chunk)}")
                reader = DecodingReader(resp, self._where("blob batch"))
                for want in chunk:
                    hdr = await reader.readexactly(HEADER.size)
                    digest, status, length = HEADER.unpack(hdr)
                    if digest != want:
                        raise FleetsyncError(f"{self._where('blob batch')}: frame for {digest.hex()[:12]}… "
                                             f"where {want.hex()[:12]}… was expected")
                    if self._bucket is not None:
                        data = await self._read_limited(reader, length)
                    else:
                        data = await reader.readexactly(length) if length else b""
                    self.bytes_received += length
                    yield digest, status, data

    async def _read_limited(self, reader: DecodingReader, length: int) -> bytes:
        """readexactly(length) in pieces, each paid for in the token bucket."""
        assert self._bucket is not None
        parts = []
        left = length
        while left:
            part = await reader.readexactly(min(left, self._chunk))
            parts.append(part)
            left -= len(part)
            await self._bucket.consume(len(part))
        return b"".join(parts)

    async def blob_to_fd(self, digest: bytes, size: int, fd: int, hint: bytes | None = None) -> None:
        """Stream one large blob into fd (resuming with Range from the fd's size) and verify its hash."""
        h = new_hasher()
        have = os.lseek(fd, 0, os.SEEK_END)
        if have:
            os.lseek(fd, 0, os.SEEK_SET)
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
        headers = {"Range": f"bytes={have}-"} if have else {}
        url = f"{self.base}{API}/blob/{digest.hex()}"
        params = {"path": paths.encode(hint)} if hint else {}
        async with self._session.get(url, headers=headers, params=params) as resp:
            if resp.status == 404:
                raise BlobGone(f"{self._where('blob ' + digest.hex()[:12] + '…')}: gone")
            if resp.status == 409:
                raise BlobChanged(f"{self._where('blob ' + digest.hex()[:12] + '…')}: changed at the source")
            await self._check(resp, f"blob {digest.hex()[:12]}…")
            if have and resp.status != 206:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                h = new_hasher()
            async for chunk in resp.content.iter_chunked(self._chunk):
                h.update(chunk)
                os.write(fd, chunk)
                self.bytes_received += len(chunk)
                if self._bucket is not None:
                    await self._bucket.consume(len(chunk))
        if os.lseek(fd, 0, os.SEEK_CUR) != size or h.digest() != digest:
            raise IntegrityError(f"fetching blob {digest.hex()[:12]}… from {self.base}: hash mismatch")

    async def snapshot(self) -> tuple[str, int, AsyncIterator[list[Row]]]:
        """Open the manifest snapshot: (journal_id, seq, async iterator of lists of validated rows)."""
        resp = await self._session.get(self.base + API + "/snapshot", params={"format": "rows"})
        await self._check(resp, "snapshot")
        try:
            first = json.loads(await resp.content.readline())
            jid, seq = str(first["journal_id"]), int(first["seq"])
        except (ValueError, KeyError, TypeError) as e:
            resp.release()
            raise FleetsyncError(f"{self._where('snapshot')}: bad header: {e}") from None
        rows_format = first.get("format") == "rows"

        async def chunks() -> AsyncIterator[list[Row]]:
            try:
                count = 0
                pending: list[Row] = []  # per-entry form: rows gathered 1,000 at a time
                while True:
                    line = await resp.content.readuntil(b"\n", max_size=SNAPSHOT_LINE_MAX)
                    if not line.endswith(b"\n"):
                        raise FleetsyncError(f"{self._where('snapshot')}: truncated after {count} entries")
                    try:
                        d = json.loads(line)
                    except ValueError as e:
                        raise FleetsyncError(f"{self._where('snapshot')}: bad line after {count} entries: {e}") from None
                    if rows_format and isinstance(d, list):
                        rows = [row_from_wire(x) for x in d]
                        count += len(rows)
                        yield rows
                        continue
                    if not isinstance(d, dict):
                        raise FleetsyncError(f"{self._where('snapshot')}: bad line after {count} entries")
                    if d.get("end"):
                        if d.get("count") != count:
                            raise FleetsyncError(f"{self._where('snapshot')}: count mismatch "
                                                 f"({count} entries received, trailer says {d.get('count')})")
                        if pending:
                            yield pending
                        return
                    if rows_format:
                        raise FleetsyncError(f"{self._where('snapshot')}: bad line after {count} entries")
                    # An upstream without the rows format: one object per entry.
                    count += 1
                    pending.append(row_of(paths.decode_checked(d.get("p")), Entry.from_wire(d.get("e"))))
                    if len(pending) >= 1000:
                        yield pending
                        pending = []
            except LineTooLong as e:
                raise FleetsyncError(f"{self._where('snapshot')}: line longer than {SNAPSHOT_LINE_MAX} bytes") from e
            finally:
                resp.release()

        return jid, seq, chunks()


class BlobGone(FleetsyncError):
    """The upstream no longer holds this content (a later record supersedes it)."""


class BlobChanged(FleetsyncError):
    """The upstream's file changed since it was recorded; retry later."""


__all__ = ["UpstreamClient", "TokenBucket", "FeedPage", "BlobGone", "BlobChanged", "OK", "STATUS_NAMES"]
