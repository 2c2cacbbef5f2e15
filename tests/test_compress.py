"""zstd negotiation and the compressed blob stream (encoder and decoder over a real HTTP connection)."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest
import zstandard
from aiohttp import web

from fleetsync.errors import FleetsyncError
from fleetsync.transport import compress
from fleetsync.transport.compress import DecodingReader, StreamEncoder


@pytest.mark.parametrize("value, want", [
    ("zstd", True), ("gzip, zstd", True), ("ZSTD;q=0.5", True), ("zstd;q=0", False),
    ("gzip", False), ("identity", False), (None, False), ("", False), ("zstdx", False),
])
def test_accept_encoding_parsing(value: str | None, want: bool) -> None:
    assert compress.wants_zstd(value) is want


def test_auto_mode_is_off_for_loopback_only() -> None:
    for url in ("http://127.0.0.1:8470", "http://localhost:1", "http://[::1]:80", "http://127.9.9.9"):
        assert compress.is_loopback(url), url
        assert compress.resolve("auto", url) is False
        assert compress.resolve("on", url) is True
    for url in ("http://10.1.2.3:8470", "http://192.0.2.7", "http://[2001:db8::1]:80"):
        assert not compress.is_loopback(url), url
        assert compress.resolve("auto", url) is True
        assert compress.resolve("off", url) is False
    with pytest.raises(ValueError, match="compression mode"):
        compress.resolve("maybe", "http://127.0.0.1")


def groups(seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    text = b"".join(b"body{margin:%d} .c%d{color:#%06x}\n" % (i, i, i) for i in range(20000))
    return [text[:300_000], rng.randbytes(70_000), b"", text * 2, rng.randbytes(5) * 1000]


async def serve(handler: web.RequestHandler) -> tuple[web.AppRunner, str]:  # type: ignore[type-arg]
    app = web.Application()
    app.router.add_get("/s", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/s"


@pytest.fixture
async def stream_url() -> AsyncIterator[tuple[str, dict[str, int]]]:
    seen: dict[str, int] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        enc = StreamEncoder(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", **enc.headers()})
        await resp.prepare(request)
        for g in groups():
            await enc.write(resp, g)
        await enc.finish(resp)
        seen["wire"], seen["raw"] = enc.wire_bytes, enc.raw_bytes
        return resp

    runner, url = await serve(handler)
    try:
        yield url, seen
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("zstd", [False, True])
async def test_stream_round_trip(stream_url: tuple[str, dict[str, int]], zstd: bool) -> None:
    url, seen = stream_url
    want = b"".join(groups())
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(url, headers=compress.request_headers(zstd)) as resp:
            r = DecodingReader(resp)
            assert r.compressed is zstd
            got = bytearray()
            # Odd read sizes cross group and zstd block boundaries.
            sizes = [1, 7, 4096, 100_000, 13]
            i = 0
            while len(got) < len(want):
                n = min(sizes[i % len(sizes)], len(want) - len(got))
                got += await r.readexactly(n)
                i += 1
            assert await r.readexactly(0) == b""
    assert bytes(got) == want
    assert seen["raw"] == len(want)
    assert r.wire_bytes == seen["wire"]
    if zstd:
        assert seen["wire"] < len(want) * 0.6
    else:
        assert seen["wire"] == len(want)


async def test_truncated_and_corrupt_streams_are_errors() -> None:
    payload = zstandard.ZstdCompressor().compress(os.urandom(1000) * 50)

    async def truncated(request: web.Request) -> web.Response:
        return web.Response(body=payload[: len(payload) // 2], headers={"Content-Encoding": "zstd"})

    async def corrupt(request: web.Request) -> web.Response:
        return web.Response(body=b"\x28\xb5\x2f\xfd" + b"\xff" * 200, headers={"Content-Encoding": "zstd"})

    async def gzip(request: web.Request) -> web.Response:
        return web.Response(body=b"x", headers={"Content-Encoding": "gzip"})

    for handler, match in ((truncated, "ended early"), (corrupt, "corrupt zstd"), (gzip, "unsupported Content-Encoding")):
        runner, url = await serve(handler)
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as s:
                async with s.get(url) as resp:
                    with pytest.raises(FleetsyncError, match=match):
                        r = DecodingReader(resp, "test stream")
                        await r.readexactly(50_000)
        finally:
            await runner.cleanup()
