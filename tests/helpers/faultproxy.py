"""A fault-injecting TCP proxy for tests: latency, stalls and connection resets between two real peers.

It runs its own event loop on a thread, so synchronous tests (subprocess clusters) can steer it:

    with FaultProxy(upstream_port) as px:
        px.delay = 0.02          # seconds added before each forwarded chunk
        px.reset_after = 64_000  # reset each new connection after this many bytes to the client
        px.stall()               # hold every byte in both directions ...
        px.resume()              # ... until resumed
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from types import TracebackType


class FaultProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<upstream_port>, with faults set on the attributes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        #: Seconds to sleep before forwarding each chunk (either direction).
        self.delay = 0.0
        #: Reset a connection (RST) once it has sent this many bytes to the client; None = never.
        self.reset_after: int | None = None
        #: Connections accepted, and connections this proxy reset.
        self.connections = 0
        self.resets = 0
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)

    # -- control (any thread) ------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        """Listen on an ephemeral loopback port (sets `port`)."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stall(self) -> None:
        """Stop forwarding (connections stay open; data waits)."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        """Forward again."""
        self._loop.call_soon_threadsafe(self._flowing.set)

    def reset_all(self) -> int:
        """Reset every open connection now; returns how many."""
        return asyncio.run_coroutine_threadsafe(self._reset_all(), self._loop).result(10)

    def close(self) -> None:
        """Stop listening, drop every connection and end the thread."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- the loop ----------------------------------------------------------------------------
    async def _start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()

    async def _reset_all(self) -> int:
        n = 0
        for w in list(self._writers):
            self._rst(w)
            n += 1
        return n

    def _rst(self, w: asyncio.StreamWriter) -> None:
        """Abort with SO_LINGER 0: the peer sees ECONNRESET, not an orderly end."""
        sock = w.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        w.transport.abort()
        self._writers.discard(w)

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            self._rst(cw)
            return
        self._writers |= {cw, uw}

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, to_client: bool) -> None:
            sent = 0
            try:
                while data := await r.read(16384):
                    await self._flowing.wait()
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    limit = self.reset_after  # read per chunk: applies to connections already open
                    if to_client and limit is not None and sent + len(data) > limit:
                        w.write(data[:max(limit - sent, 0)])
                        self.resets += 1
                        self._rst(cw)
                        self._rst(uw)
                        return
                    w.write(data)
                    sent += len(data)
                    await w.drain()
                if w.can_write_eof():
                    w.write_eof()
            except (ConnectionError, OSError, RuntimeError):
                pass

        try:
            await asyncio.gather(pump(cr, uw, False), pump(ur, cw, True))
        finally:
            for w in (cw, uw):
                if w in self._writers:
                    self._writers.discard(w)
                    w.close()
