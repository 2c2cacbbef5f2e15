"""Chunk-level transfer of large files modified in place (content-defined chunking, FastCDC 2020).

The upstream serves `GET /v1/chunks/<hex>`: the chunk list of the blob with that hash (length
and BLAKE3 of each content-defined chunk, plus the chunker parameters), computed on demand from
the file, checked against the whole-file hash, and kept in a small LRU cache. A replica holding an
older version of the file chunks its local copy with the same parameters, copies the chunks it
already has into a temp file, fetches only the missing byte ranges with `GET /v1/blob/<hex>` and
`Range`, verifies every fetched chunk and then the whole result against the record's hash. Any
mismatch or error raises `DeltaUnavailable`, and the caller falls back to a full fetch.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from pyfastcdc import FastCDC

from fleetsync import paths
from fleetsync.errors import FleetsyncError
from fleetsync.hashing import hash_bytes, new_hasher
from fleetsync.transport.wire import API, CHANGED, GONE

log = logging.getLogger("fleetsync.chunks")

#: Files at least this large are candidates for chunk-level transfer (smaller ones travel batched).
DELTA_MIN_SIZE = 4 << 20
#: A local file smaller than this is not worth chunking as a source.
SOURCE_MIN_SIZE = 1 << 20
#: If more than this fraction of the new file is missing locally, a plain full fetch is used.
MAX_MISSING_FRACTION = 0.75
#: At most this many Range requests per file (nearest missing ranges are merged beyond it).
MAX_RANGES = 64
#: Range requests in flight at once.
RANGE_CONCURRENCY = 4
#: Bytes of encoded chunk lists kept by an upstream's cache.
CACHE_BYTES = 16 << 20
IO_CHUNK = 1 << 20
CONTENT_TYPE = "application/x-fleetsync-chunks"

_HEAD = struct.Struct(">4sBBHIIIQI")  # magic, version, nc, reserved, avg, min, max, size, count
_REC = struct.Struct(">I32s")  # chunk length, BLAKE3 digest
_MAGIC = b"FSCL"
_VERSION = 1


class DeltaUnavailable(FleetsyncError):
    """Chunk-level transfer did not work out for this file; fetch it whole instead."""


@dataclass(frozen=True, slots=True)
class ChunkerParams:
    """FastCDC 2020 parameters; both ends must chunk with the same ones."""

    avg: int = 64 << 10
    min: int = 16 << 10
    max: int = 256 << 10
    nc: int = 1

    def chunker(self) -> FastCDC:
        """A FastCDC instance with these parameters (raises ValueError when out of range)."""
        return FastCDC(self.avg, min_size=self.min, max_size=self.max, normalized_chunking=self.nc)  # type: ignore[arg-type]


DEFAULT_PARAMS = ChunkerParams()


@dataclass(slots=True)
class ChunkList:
    """The chunks of one file: lengths and BLAKE3 digests in file order."""

    size: int
    params: ChunkerParams
    lengths: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)

    def offsets(self) -> list[int]:
        """Start offset of every chunk."""
        out, pos = [], 0
        for n in self.lengths:
            out.append(pos)
            pos += n
        return out

    def encode(self) -> bytes:
        """Wire form: a fixed header, then one (length, digest) record per chunk."""
        p = self.params
        parts = [_HEAD.pack(_MAGIC, _VERSION, p.nc, 0, p.avg, p.min, p.max, self.size, len(self.lengths))]
        parts.extend(_REC.pack(n, d) for n, d in zip(self.lengths, self.digests))
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, where: str) -> "ChunkList":
        """Parse and sanity-check a wire chunk list; `where` names it in errors."""
        if len(data) < _HEAD.size:
            raise DeltaUnavailable(f"{where}: chunk list truncated ({len(data)} bytes)")
        magic, ver, nc, _, avg, mn, mx, size, count = _HEAD.unpack_from(data)
        if magic != _MAGIC or ver != _VERSION:
            raise DeltaUnavailable(f"{where}: unknown chunk list format {magic!r} v{ver}")
        if len(data) != _HEAD.size + count * _REC.size:
            raise DeltaUnavailable(f"{where}: chunk list of {count} chunks has {len(data)} bytes")
        params = ChunkerParams(avg, mn, mx, nc)
        try:
            params.chunker()
        except ValueError as e:
            raise DeltaUnavailable(f"{where}: unusable chunker parameters {params}: {e}") from None
        cl = cls(size, params)
        for n, d in _REC.iter_unpack(memoryview(data)[_HEAD.size:]):
            if n == 0 or n > mx:
                raise DeltaUnavailable(f"{where}: chunk of {n} bytes outside 1..{mx}")
            cl.lengths.append(n)
            cl.digests.append(d)
        if sum(cl.lengths) != size:
            raise DeltaUnavailable(f"{where}: chunk lengths add up to {sum(cl.lengths)}, not {size}")
        return cl


class _PreadReader:
    """A readinto() reader over a descriptor from offset 0 (pread: the fd's offset is left alone)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0

    def readinto(self, buf: memoryview) -> int:
        n = os.preadv(self.fd, [buf], self.pos)
        self.pos += n
        return n


def chunk_fd(fd: int, params: ChunkerParams = DEFAULT_PARAMS) -> tuple[ChunkList, bytes]:
    """Chunk a whole open file: (chunk list, BLAKE3 of the whole content)."""
    whole = new_hasher()
    size = 0
    cl = ChunkList(0, params)
    for c in params.chunker().cut_stream(_PreadReader(fd)):
        whole.update(c.data)
        cl.lengths.append(c.length)
        cl.digests.append(hash_bytes(c.data))
        size += c.length
    cl.size = size
    return cl, whole.digest()


# -- upstream side --------------------------------------------------------------------------------
class ChunkService:
    """Serves chunk lists of blobs, computed on demand and cached by blob hash (bounded LRU)."""

    def __init__(self, state: Any, params: ChunkerParams = DEFAULT_PARAMS, cache_bytes: int = CACHE_BYTES) -> None:
        self.state = state  # a transport.server.ServerState: open_blob(), follower()
        self.params = params
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cached = 0
        self._inflight: dict[bytes, asyncio.Future[bytes]] = {}
        self.computed = 0

    def _remember(self, digest: bytes, body: bytes) -> None:
        if len(body) > self.cache_bytes:
            return
        self._cache[digest] = body
        self._cached += len(body)
        while self._cached > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)

    def _compute(self, digest: bytes, hint: bytes | None = None) -> tuple[int, bytes]:
        """(status, encoded chunk list) read from the tree; runs in a worker thread."""
        status, e, fd = self.state.open_blob(digest, hint)
        if fd is None or e is None:
            return status, b""
        try:
            before = os.fstat(fd)
            cl, whole = chunk_fd(fd, self.params)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if whole != digest or cl.size != e.size or (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            return CHANGED, b""
        self.computed += 1
        return 0, cl.encode()

    async def get(self, digest: bytes, hint: bytes | None = None) -> tuple[int, bytes]:
        """(status, encoded chunk list); concurrent requests for one blob share one computation."""
        body = self._cache.get(digest)
        if body is not None:
            self._cache.move_to_end(digest)
            return 0, body
        fut = self._inflight.get(digest)
        if fut is not None:
            return 0, await asyncio.shield(fut)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._inflight[digest] = fut
        try:
            status, body = await loop.run_in_executor(None, self._compute, digest, hint)
        except BaseException as err:
            fut.set_exception(DeltaUnavailable(f"blob {digest.hex()[:12]}…: {type(err).__name__}: {err}"))
            fut.exception()  # retrieved: waiters (if any) see it, nobody else must
            raise
        finally:
            del self._inflight[digest]
        if status == 0:
            self._remember(digest, body)
            fut.set_result(body)
        else:
            fut.set_exception(DeltaUnavailable(f"blob {digest.hex()[:12]}…: {'gone' if status == GONE else 'changed'}"))
            fut.exception()
        return status, body

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/chunks/<hex>."""
        try:
            digest = bytes.fromhex(request.match_info["digest"])
            if len(digest) != 32:
                raise ValueError
        except ValueError:
            return web.json_response({"error": "blob id must be 64 hex digits"}, status=400)
        raw = request.query.get("path")
        try:
            hint = paths.decode_checked(raw) if raw is not None else None
        except FleetsyncError as e:
            return web.json_response({"error": f"path: {e}"}, status=400)
        try:
            status, body = await self.get(digest, hint)
        except DeltaUnavailable as e:
            return web.json_response({"error": f"chunk list of {digest.hex()[:12]}… unavailable: {e}"}, status=409)
        if status == GONE:
            return web.json_response({"error": f"blob {digest.hex()[:12]}… is not in the manifest (superseded)"},
                                     status=404)
        if status != 0:
            return web.json_response({"error": f"blob {digest.hex()[:12]}…: the file changed since it was recorded"},
                                     status=409)
        rid = request.headers.get("X-Fleetsync-Replica")
        if rid:
            self.state.follower(rid[:200]).bytes_sent += len(body)
        return web.Response(body=body, content_type=CONTENT_TYPE)


def routes(state: Any, params: ChunkerParams = DEFAULT_PARAMS) -> list[web.RouteDef]:
    """Route definitions serving chunk lists for a ServerState."""
    svc = ChunkService(state, params)
    return [web.get(API + "/chunks/{digest}", svc.handle)]


# -- replica side ---------------------------------------------------------------------------------
def _hint_params(hint: bytes | None) -> dict[str, str]:
    """Query parameters naming where the content is expected upstream (the origin finds blobs by path)."""
    return {"path": paths.encode(hint)} if hint else {}


@dataclass(slots=True)
class DeltaPlan:
    """How to build the new file: local copies (src_off, dst_off, length) and missing chunk spans."""

    copies: list[tuple[int, int, int]] = field(default_factory=list)
    #: (first chunk index, end chunk index) of each missing run, coalesced.
    missing: list[tuple[int, int]] = field(default_factory=list)
    missing_bytes: int = 0
    reused_bytes: int = 0


def plan_delta(local: ChunkList, remote: ChunkList, max_ranges: int = MAX_RANGES) -> DeltaPlan:
    """Match remote chunks against local ones by digest; coalesce adjacent copies and missing chunks."""
    where: dict[bytes, tuple[int, int]] = {}
    for off, n, d in zip(local.offsets(), local.lengths, local.digests):
        where.setdefault(d, (off, n))
    plan = DeltaPlan()
    dst = 0
    run_start: int | None = None
    for i, (n, d) in enumerate(zip(remote.lengths, remote.digests)):
        hit = where.get(d)
        if hit is not None and hit[1] == n:
            if run_start is not None:
                plan.missing.append((run_start, i))
                run_start = None
            src = hit[0]
            if plan.copies and plan.copies[-1][0] + plan.copies[-1][2] == src and plan.copies[-1][1] + plan.copies[-1][2] == dst:
                s, t, m = plan.copies[-1]
                plan.copies[-1] = (s, t, m + n)
            else:
                plan.copies.append((src, dst, n))
            plan.reused_bytes += n
        else:
            if run_start is None:
                run_start = i
            plan.missing_bytes += n
        dst += n
    if run_start is not None:
        plan.missing.append((run_start, len(remote.lengths)))
    # Too many ranges: merge across the smallest gaps (those bytes are fetched instead of copied).
    if len(plan.missing) > max_ranges:
        offs = remote.offsets() + [remote.size]
        gaps = sorted(range(len(plan.missing) - 1),
                      key=lambda k: offs[plan.missing[k + 1][0]] - offs[plan.missing[k][1]])
        merge = set(gaps[:len(plan.missing) - max_ranges])
        merged: list[tuple[int, int]] = []
        for k, (a, b) in enumerate(plan.missing):
            if merged and (k - 1) in merge:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        plan.missing = merged
        plan.missing_bytes = sum(offs[b] - offs[a] for a, b in merged)
        plan.reused_bytes = remote.size - plan.missing_bytes
        plan.copies = _copies_outside(plan.copies, [(offs[a], offs[b]) for a, b in merged])
    return plan


def _copies_outside(copies: list[tuple[int, int, int]], spans: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Trim copies (src, dst, n) to the parts of dst not covered by the fetched spans."""
    out = []
    for src, dst, n in copies:
        pieces = [(dst, dst + n)]
        for a, b in spans:
            nxt = []
            for s, e in pieces:
                if b <= s or a >= e:
                    nxt.append((s, e))
                    continue
                if s < a:
                    nxt.append((s, a))
                if b < e:
                    nxt.append((b, e))
            pieces = nxt
        out.extend((src + (s - dst), s, e - s) for s, e in pieces if e > s)
    return out


@dataclass(slots=True)
class DeltaResult:
    """What a chunk-level transfer moved."""

    size: int
    fetched: int
    reused: int
    ranges: int
    list_bytes: int
    chunks: int


def _copy_range(src: int, dst: int, src_off: int, dst_off: int, n: int) -> None:
    """Copy n bytes between descriptors at explicit offsets (copy_file_range, else pread/pwrite)."""
    while n:
        try:
            done = os.copy_file_range(src, dst, n, src_off, dst_off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
            done = 0
        if done == 0:
            data = os.pread(src, min(n, IO_CHUNK), src_off)
            if not data:
                raise DeltaUnavailable(f"local source ended {n} bytes early at offset {src_off}")
            done = os.pwrite(dst, data, dst_off)
        src_off += done
        dst_off += done
        n -= done


def _copy_all(src: int, dst: int, copies: list[tuple[int, int, int]]) -> None:
    for s, d, n in copies:
        _copy_range(src, dst, s, d, n)


def _hash_result(fd: int, size: int) -> bytes:
    """BLAKE3 of the written file, read back through a fresh read-only descriptor."""
    try:
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise DeltaUnavailable(f"cannot reopen the temp file to verify it: {e}") from e
    try:
        if os.fstat(rfd).st_size != size:
            return b""
        h = new_hasher()
        pos = 0
        while pos < size:
            data = os.pread(rfd, min(IO_CHUNK * 4, size - pos), pos)
            if not data:
                return b""
            h.update(data)
            pos += len(data)
        return h.digest()
    finally:
        os.close(rfd)


async def fetch_chunk_list(session: aiohttp.ClientSession, base: str, digest: bytes,
                           hint: bytes | None = None) -> bytes:
    """GET /v1/chunks/<hex>: the encoded chunk list (DeltaUnavailable on any non-200)."""
    url = f"{base}{API}/chunks/{digest.hex()}"
    async with session.get(url, params=_hint_params(hint)) as resp:
        if resp.status != 200:
            body = (await resp.text())[:200]
            raise DeltaUnavailable(f"fetching chunks of {digest.hex()[:12]}… from {base}: HTTP {resp.status}: {body}")
        return await resp.read()


async def fetch_delta(session: aiohttp.ClientSession, base: str, digest: bytes, size: int, src_fd: int,
                      out_fd: int, *, executor: Executor | None = None,
                      on_bytes: Callable[[int], Awaitable[None]] | None = None,
                      hint: bytes | None = None) -> DeltaResult:
    """Build the blob `digest` of `size` bytes in out_fd from the local file src_fd plus fetched ranges.

    out_fd must be an empty, writable file; on success it holds exactly the verified content. Raises
    DeltaUnavailable (out_fd then holds garbage: truncate it before a full fetch) on any mismatch.
    """
    where = f"fetching chunks of {digest.hex()[:12]}… from {base}"
    loop = asyncio.get_running_loop()
    # The upstream chunks its copy while we chunk ours.
    local_fut = loop.run_in_executor(executor, chunk_fd, src_fd, DEFAULT_PARAMS)
    try:
        raw = await fetch_chunk_list(session, base, digest, hint)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        await asyncio.gather(local_fut, return_exceptions=True)
        raise DeltaUnavailable(f"{where}: {type(e).__name__}: {e}") from e
    except BaseException:
        await asyncio.gather(local_fut, return_exceptions=True)
        raise
    if on_bytes is not None:
        await on_bytes(len(raw))
    remote = ChunkList.decode(raw, where)
    if remote.size != size:
        await asyncio.gather(local_fut, return_exceptions=True)
        raise DeltaUnavailable(f"{where}: chunk list is for {remote.size} bytes, the record says {size}")
    local, _ = await local_fut
    if local.params != remote.params:
        local, _ = await loop.run_in_executor(executor, chunk_fd, src_fd, remote.params)
    plan = plan_delta(local, remote)
    if plan.missing_bytes > MAX_MISSING_FRACTION * size:
        raise DeltaUnavailable(f"{where}: {plan.missing_bytes} of {size} bytes differ; a full fetch is cheaper")
    os.ftruncate(out_fd, size)
    copy_fut = loop.run_in_executor(executor, _copy_all, src_fd, out_fd, plan.copies)
    offs = remote.offsets() + [size]
    sem = asyncio.Semaphore(RANGE_CONCURRENCY)
    fetched = 0

    async def fetch_span(a: int, b: int) -> None:
        nonlocal fetched
        start, end = offs[a], offs[b]
        async with sem:
            headers = {"Range": f"bytes={start}-{end - 1}"}
            async with session.get(f"{base}{API}/blob/{digest.hex()}", headers=headers,
                                   params=_hint_params(hint)) as resp:
                if resp.status != 206 and not (resp.status == 200 and (start, end) == (0, size)):
                    body = (await resp.text())[:200]
                    raise DeltaUnavailable(f"{where}: range {start}-{end - 1}: HTTP {resp.status}: {body}")
                k, pos = a, start
                h = new_hasher()
                left = remote.lengths[k]
                async for piece in resp.content.iter_chunked(IO_CHUNK):
                    if pos + len(piece) > end:
                        raise DeltaUnavailable(f"{where}: range {start}-{end - 1} answered with too many bytes")
                    os.pwrite(out_fd, piece, pos)
                    pos += len(piece)
                    fetched += len(piece)
                    if on_bytes is not None:
                        await on_bytes(len(piece))
                    mv = memoryview(piece)
                    while mv:
                        take = min(left, len(mv))
                        h.update(mv[:take])
                        mv = mv[take:]
                        left -= take
                        if left == 0:
                            if h.digest() != remote.digests[k]:
                                raise DeltaUnavailable(f"{where}: chunk {k} at offset {offs[k]}: hash mismatch")
                            k += 1
                            h = new_hasher()
                            left = remote.lengths[k] if k < len(remote.lengths) else 0
                if pos != end:
                    raise DeltaUnavailable(f"{where}: range {start}-{end - 1} ended after {pos - start} bytes")

    tasks = [asyncio.ensure_future(fetch_span(a, b)) for a, b in plan.missing]
    try:
        await asyncio.gather(copy_fut, *tasks)
    except BaseException as e:
        for t in tasks:
            t.cancel()
        await asyncio.gather(copy_fut, *tasks, return_exceptions=True)
        if isinstance(e, (aiohttp.ClientError, asyncio.TimeoutError, OSError)):
            raise DeltaUnavailable(f"{where}: {type(e).__name__}: {e}") from e
        raise
    got = await loop.run_in_executor(executor, _hash_result, out_fd, size)
    if got != digest:
        raise DeltaUnavailable(f"{where}: the assembled file does not match its hash")
    return DeltaResult(size, fetched, plan.reused_bytes, len(plan.missing), len(raw), len(remote.lengths))


def usable_source(st: os.stat_result | None) -> bool:
    """True if a local file with this lstat result is worth chunking as a delta source."""
    return st is not None and stat.S_ISREG(st.st_mode) and st.st_size >= SOURCE_MIN_SIZE


async def try_delta(client: Any, fs: Any, path: bytes, e: Any, out_fd: int,
                    executor: Executor | None = None) -> bool:
    """Fill the empty temp file out_fd with entry e's content by chunk-level transfer from the file at path.

    `client` is an UpstreamClient (session, base, account()), `fs` the replica's ConfinedRoot. True
    if out_fd now holds the verified content; False (out_fd emptied again) when the file is too
    small, there is no usable local version, or the transfer failed: fetch it whole then.
    """
    if e.size < DELTA_MIN_SIZE or e.hash is None or not usable_source(fs.lstat(path)):
        return False
    try:
        src = fs.open_read(path)
    except (OSError, FleetsyncError):
        return False
    try:
        res = await fetch_delta(client.session, client.base, e.hash, e.size, src, out_fd,
                                executor=executor, on_bytes=client.account, hint=path)
    except (DeltaUnavailable, OSError) as err:
        log.info("chunk-level transfer of %r not used, fetching it whole: %s", path[:200], err)
        os.ftruncate(out_fd, 0)
        os.lseek(out_fd, 0, os.SEEK_SET)
        return False
    finally:
        os.close(src)
    log.info("%r: %d of %d bytes fetched as %d range(s) + %d-byte chunk list, %d reused locally",
             path[:200], res.fetched, res.size, res.ranges, res.list_bytes, res.reused)
    return True
