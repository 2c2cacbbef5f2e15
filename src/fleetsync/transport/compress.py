"""zstd compression of the batched blob stream, negotiated per request.

A client that can take zstd sends `Accept-Encoding: zstd` on `POST /v1/blobs`; the upstream then
answers with `Content-Encoding: zstd` and one zstd stream over the whole frame sequence, flushed
after every group of frames so the client can decode and apply as the stream arrives. The client
decides: `--compress auto` (the default) asks for it only when the upstream is not on a loopback
address, where compressing costs more CPU time than the bytes it saves (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import zstandard
from aiohttp import web

from fleetsync.errors import FleetsyncError

ENCODING = "zstd"
#: zstd level of the blob stream. Measured (bench/compress_cost.py): on the generated corpus level 1
#: compresses as well as 3 (5.6x) at 2.6x the speed; on a text/image mix 3 saves 6% more bytes at 14% less speed.
LEVEL = 1
#: Groups at least this large are compressed in a worker thread (zstd releases the GIL).
THREAD_MIN = 256 << 10
#: Compressed input fed to the decoder per step (bounds how much is decoded at once).
DECODE_STEP = 64 << 10
MODES = ("auto", "on", "off")


def wants_zstd(accept_encoding: str | None) -> bool:
    """True if an Accept-Encoding header value accepts zstd (and not with q=0)."""
    for item in (accept_encoding or "").split(","):
        token, _, params = item.strip().partition(";")
        if token.strip().lower() != ENCODING:
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def is_loopback(url: str) -> bool:
    """True if the URL's host is a loopback address (a name counts if every address it resolves to is)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addrs = {i[4][0] for i in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def resolve(mode: str, upstream: str) -> bool:
    """Whether to ask an upstream for compressed streams: `on`, `off`, or `auto` (on unless loopback)."""
    if mode not in MODES:
        raise ValueError(f"compression mode {mode!r} must be one of {', '.join(MODES)}")
    if mode == "auto":
        return not is_loopback(upstream)
    return mode == "on"


def request_headers(enabled: bool) -> dict[str, str]:
    """Headers a client adds to a blob batch request."""
    return {"Accept-Encoding": ENCODING} if enabled else {"Accept-Encoding": "identity"}


class StreamEncoder:
    """Writes a response body, zstd-compressed when the request asked for it; counts bytes on the wire."""

    def __init__(self, request: web.Request, level: int = LEVEL) -> None:
        self.enabled = wants_zstd(request.headers.get("Accept-Encoding"))
        self._z = zstandard.ZstdCompressor(level=level).compressobj() if self.enabled else None
        self.wire_bytes = 0
        self.raw_bytes = 0
        self.resp: web.StreamResponse | None = None

    def headers(self) -> dict[str, str]:
        """Response headers to set before prepare()."""
        return {"Content-Encoding": ENCODING} if self.enabled else {}

    def _compress(self, data: bytes) -> bytes:
        assert self._z is not None
        return self._z.compress(data) + self._z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    async def write(self, resp: web.StreamResponse, data: bytes) -> int:
        """Write one group of frames (flushed, so the client can decode it now); returns wire bytes."""
        self.raw_bytes += len(data)
        if self._z is not None:
            if len(data) >= THREAD_MIN:
                data = await asyncio.get_running_loop().run_in_executor(None, self._compress, data)
            else:
                data = self._compress(data)
        if data:
            await resp.write(data)
        self.wire_bytes += len(data)
        return len(data)

    async def finish(self, resp: web.StreamResponse) -> int:
        """End the zstd stream (if any) and the response; returns the wire bytes of the trailer."""
        tail = self._z.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH) if self._z is not None else b""
        if tail:
            await resp.write(tail)
        self.wire_bytes += len(tail)
        await resp.write_eof()
        return len(tail)


class DecodingReader:
    """readexactly() over a response body, decoding zstd when the response says so; counts wire bytes."""

    def __init__(self, resp: aiohttp.ClientResponse, where: str = "blob stream") -> None:
        self._content = resp.content
        enc = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if enc not in ("identity", "", ENCODING):
            raise FleetsyncError(f"{where}: unsupported Content-Encoding {enc!r}")
        self.compressed = enc == ENCODING
        self._d = zstandard.ZstdDecompressor().decompressobj() if self.compressed else None
        self._buf = bytearray()
        self._pos = 0
        self.wire_bytes = 0
        self.where = where

    async def _fill(self, need: int) -> None:
        """Decode more until at least `need` bytes are buffered."""
        assert self._d is not None
        while len(self._buf) - self._pos < need:
            chunk = await self._content.read(DECODE_STEP)
            if not chunk:
                raise FleetsyncError(f"{self.where}: compressed stream ended early "
                                     f"({len(self._buf) - self._pos} of {need} bytes)")
            self.wire_bytes += len(chunk)
            try:
                out = self._d.decompress(chunk)
            except zstandard.ZstdError as e:
                raise FleetsyncError(f"{self.where}: corrupt zstd stream: {e}") from e
            if self._pos:
                del self._buf[:self._pos]
                self._pos = 0
            self._buf += out

    async def readexactly(self, n: int) -> bytes:
        """Exactly n decoded bytes (FleetsyncError / IncompleteReadError if the stream ends first)."""
        if self._d is None:
            data = await self._content.readexactly(n)
            self.wire_bytes += len(data)
            return data
        if n == 0:
            return b""
        await self._fill(n)
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        return out


def describe(enabled: bool, upstream: str, mode: str) -> str:
    """One log line saying what was negotiated and why."""
    why = "loopback upstream" if mode == "auto" and not enabled else mode
    return f"blob stream compression {'zstd' if enabled else 'off'} for {upstream} ({why})"


__all__: list[Any] = ["StreamEncoder", "DecodingReader", "wants_zstd", "resolve", "is_loopback", "request_headers"]
