"""The upstream HTTP API served by an origin and by every replica (so replicas can relay).

Endpoints (docs/protocol.md): feed (long-poll), batched blobs, single blob with Range, manifest
snapshot, status. Content is looked up by hash in the manifest and read through a ConfinedRoot.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hmac
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from fleetsync import paths
from fleetsync.entry import FILE, Entry, entry_of, row_to_wire
from fleetsync.errors import FleetsyncError, UnsafePath
from fleetsync.hashing import hash_bytes
from fleetsync.journal.sqlite import SqliteJournal
from fleetsync.replica.fsops import CachedReader
from fleetsync.transport import chunks, compress
from fleetsync.transport.wire import API, BATCH_BLOB_MAX, BATCH_MAX_HASHES, CHANGED, GONE, OK, TOO_LARGE, frame_header

if TYPE_CHECKING:
    from fleetsync.index.hot import HotBlobs

log = logging.getLogger("fleetsync.server")
#: Manifest rows per line of a rows-format snapshot (and per executor step of either format).
SNAPSHOT_ROWS = 1000
FEED_MAX_LIMIT = 10000
FEED_MAX_WAIT = 60.0
#: Encoded feed pages kept for the followers that ask for the same page.
FEED_PAGES_KEPT = 8
READ_GROUP = 64
#: A read group also ends once it holds this many content bytes (bounds memory per blob stream).
READ_GROUP_BYTES = 1 << 20
#: Threads reading blobs for all streams together (few threads: few malloc arenas, bounded buffers).
READERS = 3
#: Hand freed blob buffers back to the OS after this many bytes were served (glibc keeps them otherwise).
TRIM_EVERY_BYTES = 32 << 20
#: Page cache of the blob-lookup connection (KiB); lookups touch only the hash index and a few rows.
LOOKUP_CACHE_KIB = 2048


def _hint(raw: Any) -> bytes | None:
    """A wire-encoded path hint, decoded and validated (None when absent)."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise FleetsyncError(f"path hint must be a string, got {type(raw).__name__}")
    return paths.decode_checked(raw)


def _hints(raw: Any, n: int) -> list[bytes | None]:
    """The optional `paths` list of a blob request: n hints (None where absent)."""
    if raw is None:
        return [None] * n
    if not isinstance(raw, list) or len(raw) != n:
        raise FleetsyncError(f"must be a list as long as hashes ({n})")
    return [_hint(r) for r in raw]


class BlobLookup:
    """Finds the paths holding a content hash: one indexed query per blob on a private read-only connection.

    Not the journal's own connection, so a lookup never sees a transaction in progress and never
    waits for the journal's lock.
    """

    def __init__(self, db_path: str) -> None:
        uri = "file:" + os.path.abspath(db_path).replace("?", "%3f").replace("#", "%23") + "?mode=ro"
        self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        self.db.execute(f"PRAGMA cache_size=-{LOOKUP_CACHE_KIB}")
        self._lock = threading.Lock()
        self._indexed: bool | None = None

    def find(self, digest: bytes, hint: bytes | None = None, limit: int = 4) -> list[tuple[bytes, int, int]]:
        """(path, size, mtime_ns) of manifest files with this hash: the hinted path if it has it, else
        up to `limit` found by the hash index (none where the database has no hash index: the origin)."""
        with self._lock:
            if hint is not None:
                rows = self.db.execute("SELECT path, size, mtime FROM manifest WHERE path=? AND hash=? AND kind='f'",
                                       (hint, digest)).fetchall()
                if rows:
                    return rows
            if self._indexed is None:
                self._indexed = self.db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='index' AND name='manifest_hash'").fetchone() is not None
            if not self._indexed:
                return []
            return self.db.execute(
                "SELECT path, size, mtime FROM manifest WHERE hash=? AND kind='f' LIMIT ?", (digest, limit)
            ).fetchall()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self.db.close()


@dataclass(slots=True)
class Follower:
    """What an upstream knows about one downstream replica."""

    id: str
    applied_seq: int = 0
    last_contact: float = 0.0
    last_error: str | None = None
    bytes_sent: int = 0
    addr: str | None = None


@dataclass
class ServerState:
    """Shared state of an API server."""

    journal: SqliteJournal
    root: str
    token: str | None = None
    role: str = "origin"
    extra_status: Callable[[], dict[str, Any]] = field(default=lambda: {})
    extra_routes: list[web.RouteDef] = field(default_factory=list)
    followers: dict[str, Follower] = field(default_factory=dict)
    #: Content just hashed by the origin's indexer, served without reading the file again.
    hot: HotBlobs | None = None
    #: Content read from disk on a miss, kept (in a budget of its own) for the next replica's request.
    missed: HotBlobs | None = None

    def __post_init__(self) -> None:
        self._changed = asyncio.Event()
        self._reader = CachedReader(self.root)
        self._lookup = BlobLookup(self.journal.db_path)
        self.read_pool = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="fleetsync-read")
        self._served_since_trim = 0
        self._pages: dict[tuple[Any, ...], bytes] = {}
        #: Feed pages served from the cache of encoded pages, and encoded.
        self.feed_pages = {"cached": 0, "encoded": 0}

    def feed_page(self, after: int, limit: int) -> tuple[bytes, bool]:
        """The encoded feed page after `after` (JSON) and whether it has records.

        Followers of one upstream ask for the same page when a commit wakes them: it is read and
        encoded once per journal state (head, min_seq, journal id), not once per follower.
        """
        j = self.journal
        key = (after, limit, j.head(), j.min_seq(), j.journal_id)
        body = self._pages.get(key)
        if body is not None:
            self.feed_pages["cached"] += 1
            return body, True
        recs = j.read(after, limit)
        body = json.dumps({"journal_id": j.journal_id, "head": key[2], "min_seq": key[3],
                           "records": [r.to_wire() for r in recs]}).encode()
        self.feed_pages["encoded"] += 1
        if recs:
            if len(self._pages) >= FEED_PAGES_KEPT:
                del self._pages[next(iter(self._pages))]
            self._pages[key] = body
        return body, bool(recs)

    def notify(self) -> None:
        """Wake long-polling feed requests (call after committing records)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> None:
        """Wait until notify() or timeout."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def follower(self, rid: str, addr: str | None = None) -> Follower:
        """The record of a downstream replica, created on first contact."""
        f = self.followers.get(rid)
        if f is None:
            f = self.followers[rid] = Follower(rid)
        f.last_contact = time.time()
        if addr:
            f.addr = addr
        return f

    # -- content ---------------------------------------------------------------------------------
    def _open(self, p: bytes, size: int, mtime_ns: int, fresh: bool) -> int | None:
        """Open p if it is a regular file of the recorded size and mtime, else None."""
        try:
            fd = self._reader.open_read(p, fresh)
        except (OSError, UnsafePath):
            return None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size == size and st.st_mtime_ns == mtime_ns:
            return fd
        os.close(fd)
        return None

    def read_small(self, digest: bytes, hint: bytes | None = None) -> tuple[int, bytes]:
        """Read a small blob by hash (at the hinted path if it still has it) from the tree, verified: (status, data)."""
        for cache in (self.hot, self.missed):
            if cache is not None and (data := cache.get(digest)) is not None:
                return OK, data
        if hint is not None and (data := self._read_verified(hint, digest)) is not None:
            return OK, self._keep(digest, data)  # no manifest lookup: the hash decided
        cands = self._lookup.find(digest, hint)
        if not cands:
            return GONE, b""
        for p, size, _ in cands:
            if size > BATCH_BLOB_MAX:
                return TOO_LARGE, b""
            if p != hint and (data := self._read_verified(p, digest, size)) is not None:
                return OK, self._keep(digest, data)
        return CHANGED, b""

    def _keep(self, digest: bytes, data: bytes) -> bytes:
        """Keep verified content read on a miss for the other replicas that will ask for it too."""
        if self.missed is not None:
            self.missed.put(digest, data)
        return data

    def _read_verified(self, p: bytes, digest: bytes, size: int | None = None) -> bytes | None:
        """p's content if p is a regular file of `size` bytes (None: any size up to BATCH_BLOB_MAX)
        that hashes to digest, else None.

        The hash decides, not the manifest: the bytes returned are the digest's content whatever
        has happened to the file since (and only someone who knows a content's hash can ask for
        it). A cached directory descriptor may be stale after a directory rename, so a miss is
        retried with every parent resolved afresh.
        """
        for fresh in (False, True):
            try:
                fd = self._reader.open_read(p, fresh)
            except (OSError, UnsafePath):
                continue
            try:
                st = os.fstat(fd)
                want = st.st_size if size is None else size
                if not stat.S_ISREG(st.st_mode) or st.st_size != want or want > BATCH_BLOB_MAX:
                    continue
                data = _read_exactly(fd, want)
            finally:
                os.close(fd)
            if data is not None and hash_bytes(data) == digest:
                return data
        return None

    def open_blob(self, digest: bytes, hint: bytes | None = None) -> tuple[int, Entry, int] | tuple[int, None, None]:
        """Open a blob for streaming: (status, entry, fd) with size/mtime checked against the manifest."""
        cands = self._lookup.find(digest, hint)
        if not cands:
            return GONE, None, None
        for p, size, mtime_ns in cands:
            for fresh in (False, True):
                fd = self._open(p, size, mtime_ns, fresh)
                if fd is not None:
                    st = os.fstat(fd)
                    return OK, Entry(FILE, stat.S_IMODE(st.st_mode), size, mtime_ns, digest), fd
        return CHANGED, None, None

    def read_group(self, digests: list[bytes], hints: list[bytes | None]) -> list[tuple[int, bytes]]:
        """read_small() for a prefix of digests: stops after READ_GROUP_BYTES of content (at least one)."""
        out: list[tuple[int, bytes]] = []
        total = 0
        for d, h in zip(digests, hints):
            out.append(self.read_small(d, h))
            total += len(out[-1][1])
            if total >= READ_GROUP_BYTES:
                break
        return out

    def served(self, nbytes: int) -> None:
        """Count content bytes served; now and then return freed buffers to the OS."""
        self._served_since_trim += nbytes
        if self._served_since_trim >= TRIM_EVERY_BYTES:
            self._served_since_trim = 0
            self.read_pool.submit(_malloc_trim)

    def close(self) -> None:
        """Release descriptors, threads and the lookup connection."""
        self.read_pool.shutdown(wait=True)
        self._reader.close()
        self._lookup.close()


def _malloc_trim() -> None:
    """glibc malloc_trim(0): release free heap pages of every arena (no-op elsewhere)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
            _libc.malloc_trim  # noqa: B018 - probe
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: Any = None


def _read_exactly(fd: int, size: int) -> bytes | None:
    """Read exactly size bytes from fd, or None if the file is shorter or longer."""
    data = os.read(fd, size + 1)
    if len(data) > size:
        return None
    if len(data) < size:
        parts = [data]
        got = len(data)
        while got <= size:
            more = os.read(fd, size + 1 - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        if got != size:
            return None
        data = b"".join(parts)
    return data


def _auth_middleware(state: ServerState) -> Any:
    @web.middleware
    async def mw(request: web.Request, handler: Any) -> web.StreamResponse:
        if state.token:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {state.token}".encode()):
                return _error(401, "missing or wrong token (Authorization: Bearer …)")
        return await handler(request)

    return mw


def _error(status: int, msg: str, **extra: Any) -> web.Response:
    return web.json_response({"error": msg, **extra}, status=status)


def _int_param(request: web.Request, name: str, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise web.HTTPBadRequest(text=json.dumps({"error": f"missing query parameter {name!r}"}),
                                     content_type="application/json")
        return default
    try:
        v = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"query parameter {name!r} must be an integer"}),
                                 content_type="application/json") from None
    if v < 0:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"query parameter {name!r} must be >= 0"}),
                                 content_type="application/json")
    return v


def build_app(state: ServerState) -> web.Application:
    """The aiohttp application for an upstream API."""
    app = web.Application(middlewares=[_auth_middleware(state)], client_max_size=4 << 20)
    j = state.journal

    async def feed(request: web.Request) -> web.Response:
        after = _int_param(request, "after")
        limit = min(max(_int_param(request, "limit", 1000), 1), FEED_MAX_LIMIT)
        try:
            wait = min(max(float(request.query.get("wait", "0")), 0.0), FEED_MAX_WAIT)
        except ValueError:
            return _error(400, "query parameter 'wait' must be a number")
        rid = request.query.get("replica") or request.headers.get("X-Fleetsync-Replica")
        if rid:
            f = state.follower(rid[:200], request.remote)
            f.applied_seq = _int_param(request, "applied", after)
            f.last_error = request.query.get("error") or None
        if after < j.min_seq() - 1:
            return _error(410, "behind the retained journal; resync from /v1/snapshot",
                          min_seq=j.min_seq(), journal_id=j.journal_id)
        deadline = time.monotonic() + wait
        body, some = state.feed_page(after, limit)
        while not some and time.monotonic() < deadline:
            await state.wait_change(deadline - time.monotonic())
            body, some = state.feed_page(after, limit)
            if rid:
                state.follower(rid[:200])
        return web.Response(body=body, content_type="application/json")

    async def blobs(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            digests = [bytes.fromhex(h) for h in body["hashes"]]
            raw_hints = body.get("paths")
        except (ValueError, KeyError, TypeError, AttributeError):
            return _error(400, "body must be JSON {\"hashes\": [hex, …], \"paths\": [path or null, …]}")
        if len(digests) > BATCH_MAX_HASHES or any(len(d) != 32 for d in digests):
            return _error(400, f"at most {BATCH_MAX_HASHES} hashes of 32 bytes each")
        try:
            hints = _hints(raw_hints, len(digests))
        except FleetsyncError as e:
            return _error(400, f"paths: {e}")
        rid = request.headers.get("X-Fleetsync-Replica")
        f = state.follower(rid[:200]) if rid else None
        enc = compress.StreamEncoder(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", **enc.headers()})
        await resp.prepare(request)
        loop = asyncio.get_running_loop()

        def read_at(at: int) -> asyncio.Future[list[tuple[int, bytes]]]:
            return loop.run_in_executor(state.read_pool, state.read_group, digests[at:at + READ_GROUP],
                                        hints[at:at + READ_GROUP])

        i = 0
        sent = 0
        ahead = read_at(0) if digests else None
        try:
            while ahead is not None:
                group = digests[i:i + READ_GROUP]
                results = await ahead
                # Read the next group while this one is sent (at most one group waits in memory).
                ahead = read_at(i + len(results)) if i + len(results) < len(digests) else None
                parts = []
                for d, (st, data) in zip(group, results):
                    parts.append(frame_header(d, st, len(data)))
                    parts.append(data)
                    sent += len(data)
                    if f is not None and not enc.enabled:
                        f.bytes_sent += len(data)
                i += len(results)
                buf = b"".join(parts)
                del parts, results
                wire = await enc.write(resp, buf)
                if f is not None and enc.enabled:
                    f.bytes_sent += wire
                del buf
        finally:
            if ahead is not None:
                ahead.cancel()  # the client went away: its result is not wanted
        wire = await enc.finish(resp)
        if f is not None and enc.enabled:
            f.bytes_sent += wire
        state.served(sent)
        return resp

    async def blob(request: web.Request) -> web.StreamResponse:
        try:
            digest = bytes.fromhex(request.match_info["digest"])
            if len(digest) != 32:
                raise ValueError
        except ValueError:
            return _error(400, "blob id must be 64 hex digits")
        try:
            hint = _hint(request.query.get("path"))
        except FleetsyncError as err:
            return _error(400, f"path: {err}")
        status, e, fd = await asyncio.get_running_loop().run_in_executor(state.read_pool, state.open_blob, digest,
                                                                         hint)
        if status == GONE:
            return _error(404, f"blob {digest.hex()[:12]}… is not in the manifest (superseded)")
        if status == CHANGED or fd is None or e is None:
            return _error(409, f"blob {digest.hex()[:12]}…: the file changed since it was recorded")
        rid = request.headers.get("X-Fleetsync-Replica")
        f = state.follower(rid[:200]) if rid else None
        try:
            start, end = 0, e.size
            try:
                rng = request.http_range
            except ValueError:
                return _error(416, "bad Range header")
            if rng.start is not None or rng.stop is not None:
                start = rng.start or 0
                end = min(rng.stop if rng.stop is not None else e.size, e.size)
                if start < 0:
                    start = max(e.size + start, 0)
                if start > e.size:
                    return _error(416, f"range starts beyond {e.size} bytes")
            status_code = 206 if (start, end) != (0, e.size) else 200
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                       "Content-Length": str(end - start)}
            if status_code == 206:
                headers["Content-Range"] = f"bytes {start}-{max(end - 1, start)}/{e.size}"
            resp = web.StreamResponse(status=status_code, headers=headers)
            await resp.prepare(request)
            loop = asyncio.get_running_loop()
            pos = start
            transport = request.transport
            if transport is not None and end > start:
                # Zero-copy: the kernel sends the file (as aiohttp's FileResponse does after prepare()).
                with open(fd, "rb", closefd=False) as fobj:
                    try:
                        await loop.sendfile(transport, fobj, start, end - start)
                        pos = end
                    except NotImplementedError:
                        # No zero-copy on this transport (e.g. TLS): nothing was sent yet, and the
                        # pread loop below sends the whole range instead.
                        pos = start
                if f is not None:
                    f.bytes_sent += pos - start
            while pos < end:
                chunk = await loop.run_in_executor(state.read_pool, os.pread, fd, min(1 << 20, end - pos), pos)
                if not chunk:
                    break
                await resp.write(chunk)
                pos += len(chunk)
                if f is not None:
                    f.bytes_sent += len(chunk)
            await resp.write_eof()
            return resp
        finally:
            os.close(fd)

    async def snapshot(request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        # format=rows: one JSON array of compact rows per line (see docs/protocol.md); else one
        # object per entry, for followers from before the rows format.
        rows_format = request.query.get("format") == "rows"
        seq, chunks = await loop.run_in_executor(None, lambda: j.snapshot_rows(SNAPSHOT_ROWS))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        head: dict[str, Any] = {"journal_id": j.journal_id, "seq": seq}
        if rows_format:
            head["format"] = "rows"
        await resp.write(json.dumps(head).encode() + b"\n")

        def chunk() -> tuple[bytes, int]:
            rows = next(chunks, None)
            if not rows:
                return b"", 0
            if rows_format:
                return (json.dumps([row_to_wire(r) for r in rows]) + "\n").encode(), len(rows)
            lines = [json.dumps({"p": paths.encode(r[0]), "e": entry_of(r).to_wire()}) for r in rows]
            return ("\n".join(lines) + "\n").encode(), len(rows)

        count = 0
        while True:
            data, n = await loop.run_in_executor(None, chunk)
            if not n:
                break
            count += n
            await resp.write(data)
        await resp.write(json.dumps({"end": True, "count": count}).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def status(request: web.Request) -> web.Response:
        return web.json_response(status_doc(state))

    app.router.add_get(API + "/feed", feed)
    app.router.add_post(API + "/blobs", blobs)
    app.router.add_get(API + "/blob/{digest}", blob)
    app.router.add_get(API + "/snapshot", snapshot)
    app.router.add_get(API + "/status", status)
    app.router.add_routes(chunks.routes(state))
    app.router.add_routes(state.extra_routes)
    return app


def status_doc(state: ServerState) -> dict[str, Any]:
    """The /v1/status document."""
    j = state.journal
    head = j.head()
    now = time.time()
    reps = []
    for f in sorted(state.followers.values(), key=lambda f: f.id):
        lag = max(head - f.applied_seq, 0)
        lag_s = 0.0
        if lag:
            ts = j.record_ts(f.applied_seq + 1)
            lag_s = round(max(now - ts, 0.0), 3) if ts else None
        reps.append({"id": f.id, "applied_seq": f.applied_seq, "lag_records": lag, "lag_seconds": lag_s,
                     "last_contact": f.last_contact, "last_error": f.last_error, "bytes_sent": f.bytes_sent,
                     "addr": f.addr})
    doc: dict[str, Any] = {"role": state.role, "journal_id": j.journal_id, "seq": head, "min_seq": j.min_seq(),
                           "time": now, "replicas": reps, "feed_pages": dict(state.feed_pages)}
    doc.update(state.extra_status())
    return doc


async def start_server(state: ServerState, host: str, port: int) -> web.AppRunner:
    """Start serving the API on host:port; returns the runner (call .cleanup() to stop)."""
    runner = web.AppRunner(build_app(state), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner


def parse_listen(addr: str) -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 as [::1]:PORT)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address {addr!r} must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)
