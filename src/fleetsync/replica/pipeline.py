"""Pipelined fetch → write → place for one batch of small blobs.

The blob stream is read on the event loop; each verified blob is handed to worker threads that
hash it, write it to an unnamed temp file in the root directory and give it its mode and mtime;
the applier then links each temp file into place in record order (`place`). Network, disk writes
and directory operations overlap, and at most `max_bytes` of content waits in memory for a writer.

Workers only ever use the root's descriptor (never the directory cache, which the applier may
drop after a move or delete), so they cannot race with the applier's renames and deletions.
Nothing becomes visible before its hash was checked, and nothing is durable or acknowledged
before the caller's `syncfs` and cursor commit, so a crash anywhere leaves only unlinked temp
files (which vanish) and a batch to replay.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from fleetsync import paths
from fleetsync.entry import Entry
from fleetsync.errors import FleetsyncError
from fleetsync.replica.fsops import ConfinedRoot, verify_digest
from fleetsync.transport.client import UpstreamClient
from fleetsync.transport.wire import CHANGED, GONE, OK

#: Content bytes received but not yet written by a worker (bounds memory).
MAX_PENDING_BYTES = 8 << 20
#: Written temp files waiting to be linked (bounds open descriptors).
MAX_PENDING_FILES = 512
#: place() status: this item did not ask for the blob or it was released; fetch it singly.
MISSING = -1


class RetryLater(FleetsyncError):
    """A transient condition (content changing at the source); retry the batch after a pause."""


@dataclass(eq=False)
class _Want:
    digest: bytes
    entry: Entry
    last: int
    multi: bool
    outcome: asyncio.Future[int]
    temp: asyncio.Future[tuple[int, bytes | None]] | None = None
    data: bytes | None = None
    used: bool = False
    expired: bool = False
    users: set[int] = field(default_factory=set)
    near: bytes | None = None
    hint: bytes | None = None


class BlobPipeline:
    """Fetches a set of small blobs and writes them on worker threads while the caller places them in order."""

    def __init__(self, fs: ConfinedRoot, client: UpstreamClient, pool: Executor | None, upstream: str,
                 on_bytes: Callable[[int], None]) -> None:
        self.fs = fs
        self.client = client
        self.pool = pool
        self.upstream = upstream
        self.on_bytes = on_bytes
        self.wants: dict[bytes, _Want] = {}
        self._expire: dict[int, list[_Want]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._bytes = 0
        self._files = 0
        self._waiting = 0

    # -- set-up ----------------------------------------------------------------------------------
    def want(self, digest: bytes, e: Entry, index: int, path: bytes | None = None) -> None:
        """Declare that the item at `index` (in placing order) needs blob `digest`; call in index order."""
        w = self.wants.get(digest)
        if w is None:
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            w = self.wants[digest] = _Want(digest, e, index, False, fut)
            w.near = paths.parent(path) if path else None
            w.hint = path
        else:
            w.multi = True
            self._expire[w.last].remove(w)
            w.last = index
        w.users.add(index)
        self._expire.setdefault(index, []).append(w)

    def hint_of(self, digest: bytes) -> bytes | None:
        """The path the blob was requested at (GONE means: not there any more, maybe elsewhere)."""
        w = self.wants.get(digest)
        return w.hint if w is not None else None

    def __contains__(self, digest: object) -> bool:
        return digest in self.wants

    def start(self) -> None:
        """Start streaming the wanted blobs."""
        if self.wants and self._task is None:
            self._task = asyncio.create_task(self._fetch())

    # -- producer --------------------------------------------------------------------------------
    def _has_room(self, nbytes: int) -> bool:
        # The file bound is waived while the applier waits for a blob: production order is placing
        # order, so the blob it waits for is (or precedes) the next one produced.
        return ((self._bytes == 0 or self._bytes + nbytes <= MAX_PENDING_BYTES)
                and (self._files < MAX_PENDING_FILES or self._waiting > 0))

    async def _room(self, nbytes: int) -> None:
        while not self._has_room(nbytes):
            self._wake.clear()
            await self._wake.wait()
        self._bytes += nbytes
        self._files += 1

    def _release(self, nbytes: int = 0, files: int = 0) -> None:
        self._bytes -= nbytes
        self._files -= files
        self._wake.set()

    async def _fetch(self) -> None:
        try:
            async for digest, status, data in self.client.blobs(list(self.wants),
                                                                [w.hint for w in self.wants.values()]):
                w = self.wants[digest]
                if status != OK:
                    w.outcome.set_result(status)
                    continue
                self.on_bytes(len(data))
                if w.expired:
                    w.outcome.set_result(OK)
                    continue
                n = len(data)
                await self._room(n)
                if w.expired:
                    self._release(n, 1)
                    w.outcome.set_result(OK)
                    continue
                loop = asyncio.get_running_loop()
                if self.pool is None:
                    # Inline: written as it arrives, while the upstream keeps sending into the socket.
                    w.temp = loop.create_future()
                    try:
                        w.temp.set_result(self.fs.make_root_temp(data, w.entry, w.near))
                    except Exception as err:  # noqa: BLE001 - surfaces in place()
                        w.temp.set_exception(err)
                    self._release(n)
                else:
                    w.temp = loop.run_in_executor(self.pool, self.fs.make_root_temp, data, w.entry, w.near)
                    w.temp.add_done_callback(lambda _f, n=n: self._release(n))
                if w.multi:
                    w.data = data
                w.outcome.set_result(OK)
        except BaseException as e:
            err = e if isinstance(e, Exception) else FleetsyncError(f"blob stream from {self.upstream} stopped")
            for w in self.wants.values():
                if not w.outcome.done():
                    w.outcome.set_exception(err)
            raise

    # -- consumer --------------------------------------------------------------------------------
    async def place(self, digest: bytes, index: int, path: bytes, e: Entry) -> int:
        """Put blob `digest` at path with e's mode and mtime; returns OK, GONE, TOO_LARGE or MISSING.

        Raises RetryLater if the upstream reports the content changed since it was recorded.
        """
        w = self.wants.get(digest)
        if w is None or index not in w.users or w.expired:
            return MISSING
        if not w.outcome.done():
            self._waiting += 1
            self._wake.set()
            try:
                await w.outcome
            finally:
                self._waiting -= 1
        status = w.outcome.result()
        if status == CHANGED:
            raise RetryLater(f"blob {digest.hex()[:12]}… changed at {self.upstream} since it was recorded; retrying")
        if status != OK:
            return status
        if w.temp is not None and not w.used:
            w.used = True
            try:
                fd, tmp = await w.temp
            finally:
                self._release(files=1)
            try:
                if (e.mode, e.mtime_ns) != (w.entry.mode, w.entry.mtime_ns):
                    os.fchmod(fd, e.mode)
                    os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            except BaseException:
                self.fs.abort_temp(self.fs.fd, tmp, fd)
                raise
            self.fs.link_root_temp(path, fd, tmp)
            return OK
        if w.data is not None:
            verify_digest(w.data, e, f"blob from {self.upstream}")
            self.fs.write_file(path, w.data, e)
            return OK
        return MISSING

    def passed(self, index: int) -> None:
        """The caller is done with the item at `index`: release blobs no later item needs."""
        for w in self._expire.pop(index, ()):
            w.expired = True
            w.data = None
            if w.temp is not None and not w.used:
                w.used = True
                w.temp.add_done_callback(self._discard)

    def _discard(self, fut: asyncio.Future[tuple[int, bytes | None]]) -> None:
        self._release(files=1)
        if fut.cancelled() or fut.exception() is not None:
            return
        fd, tmp = fut.result()
        self.fs.abort_temp(self.fs.fd, tmp, fd)

    async def close(self, ok: bool) -> None:
        """Finish the stream (drained if ok, else cancelled) and discard every temp file not placed."""
        for i in list(self._expire):
            self.passed(i)
        if self._task is not None:
            if not ok:
                self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001 - the applier already saw the error, or cancelled it
                if ok:
                    raise
        for w in self.wants.values():
            if w.outcome.done() and not w.outcome.cancelled():
                w.outcome.exception()  # mark retrieved
            if w.temp is not None:
                try:
                    await asyncio.shield(w.temp)
                except BaseException:  # noqa: BLE001 - discarded anyway
                    pass
        await asyncio.sleep(0)  # let done-callbacks run
