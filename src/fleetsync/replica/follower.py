"""The replica: bootstrap from a snapshot, then follow the feed, fetch, verify and apply batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import stat
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import BrokenExecutor, Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from fleetsync import paths
from fleetsync.entry import DELETE, DIR, FILE, LINK, MOVE, PUT, Entry, Record, Row
from fleetsync.errors import FleetsyncError, ResyncNeeded, UnsafePath
from fleetsync.journal import DEFAULT_RETAIN
from fleetsync.journal.sqlite import SnapshotStage, SqliteJournal
from fleetsync.replica import bulk
from fleetsync.replica.fsops import ConfinedRoot, verify_digest
from fleetsync.replica.pipeline import BlobPipeline, RetryLater
from fleetsync.transport import chunks
from fleetsync.transport import compress as zstd_stream
from fleetsync.transport.client import BlobChanged, BlobGone, FeedPage, UpstreamClient
from fleetsync.transport.wire import BATCH_BLOB_MAX, CHANGED, GONE, OK

log = logging.getLogger("fleetsync.replica")

#: Upper bound of small-blob bytes in one applied batch (streamed to disk, not held in memory).
BATCH_BYTES = 64 << 20
FEED_LIMIT = 5000
#: Threads writing fetched blobs to temp files; 0 = write each blob on the event loop as it arrives.
WRITERS = int(os.environ.get("FLEETSYNC_WRITERS", "0"))
#: Bootstrap batches fetched and written concurrently.
BOOTSTRAP_CONCURRENCY = 2
#: A fresh bootstrap of at least this many entries hands its small files to worker processes (bulk.py).
BULK_MIN_ENTRIES = int(os.environ.get("FLEETSYNC_BULK_MIN_ENTRIES", "5000"))
#: Connections one large blob may take when they break mid-transfer (each resumes with Range).
RESUME_TRIES = 8
#: Seconds without a new feed page after which the old versions of applied files are unlinked.
CLEANUP_IDLE = 0.2
#: Seconds between background flushes of the filesystem while a bootstrap or resync writes content,
#: so that the disk writes while the CPU fetches and the final flush has only the tail left.
BACKGROUND_FLUSH = 0.5
#: Applied records beyond `retain` that may pile up before one compaction drops them all.
RETAIN_SLACK = 1000


@dataclass
class Stats:
    """Counters a replica reports in its status."""

    batches: int = 0
    records: int = 0
    files_written: int = 0
    files_reused: int = 0
    bytes_fetched: int = 0
    bootstraps: int = 0
    #: Largest peak RSS (bytes) of a bootstrap worker process (bulk.py); 0 if none ran.
    bootstrap_worker_peak_rss: int = 0


@dataclass
class _Plan:
    skip: set[int] = field(default_factory=set)
    #: (hash, path) pairs the upstream no longer has at that path: a later record supersedes them.
    gone: set[tuple[bytes, bytes]] = field(default_factory=set)
    local: dict[bytes, bytes] = field(default_factory=dict)
    #: Manifest entries (before this batch) of every path a file record of the batch names.
    known: dict[bytes, Entry] = field(default_factory=dict)


@dataclass(eq=False)
class _Placed:
    """A batch applied to the tree whose flush runs on a thread and whose cursor is not yet committed."""

    recs: list[Record]
    trash: str | None
    sync: asyncio.Future[float]
    written: int
    fetched: int
    #: Monotonic times: batch start, plan done, records placed.
    times: tuple[float, float, float]


class _Concurrent:
    """At most `limit` coroutines running at once; the first failure is raised by add() or drain()."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.tasks: list[asyncio.Task[None]] = []

    async def add(self, coro: Awaitable[None]) -> None:
        """Start coro, after waiting for the oldest running one if the limit is reached."""
        while len(self.tasks) >= self.limit:
            await self.tasks.pop(0)
        self.tasks.append(asyncio.ensure_future(coro))

    async def drain(self) -> None:
        """Wait for every started coroutine, in start order."""
        while self.tasks:
            await self.tasks.pop(0)

    async def cancel(self) -> None:
        """Cancel what is still running and wait for it to end."""
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            try:
                await t
            except BaseException:  # noqa: BLE001 - the first error was already raised
                pass
        self.tasks.clear()


class _BackgroundFlush:
    """Flushes a root's filesystem on a thread every `interval` s until stopped (errors: the final flush's)."""

    def __init__(self, fs: ConfinedRoot, interval: float) -> None:
        self.fs = fs
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._running: asyncio.Future[None] | None = None

    def start(self) -> None:
        """Begin flushing in the background."""
        if self.interval > 0:
            self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            self._running = loop.run_in_executor(None, self.fs.sync)
            try:
                await asyncio.shield(self._running)
            except OSError as e:
                log.debug("background flush: %s", e)

    async def stop(self) -> None:
        """Stop, after a flush in progress has returned (the root's descriptor stays in use until then)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._running is not None:
            with contextlib.suppress(OSError):
                await self._running


class Replica:
    """Follows one upstream and keeps `root` equal to it."""

    def __init__(self, root: str, state_dir: str, upstream: str, replica_id: str, *,
                 token: str | None = None, poll_wait: float = 20.0, bwlimit: float | None = None,
                 compress: str = "auto", retain: int = DEFAULT_RETAIN, bootstrap_workers: int | None = None) -> None:
        """Open (or create) the replica's state; nothing is fetched before run().

        retain: applied records kept for this replica's own followers when it relays (a follower
        further behind resyncs from a snapshot); older ones are compacted.
        bootstrap_workers: processes that fetch and write a fresh bootstrap's small files
        (bulk.py); None: one per CPU, at most 4; 0: none, all in this process.
        """
        self.fs = ConfinedRoot(root)
        self.journal = SqliteJournal(os.path.join(state_dir, "replica.db"), durable=False)
        self.client = UpstreamClient(upstream, replica_id=replica_id, token=token, bwlimit=bwlimit,
                                     compress=zstd_stream.resolve(compress, upstream))
        log.info(zstd_stream.describe(self.client.compress, upstream, compress))
        self._pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="fleetsync-write") if WRITERS else None
        self.bootstrap_workers = bulk.default_workers() if bootstrap_workers is None else bootstrap_workers
        if not bulk.usable(self.client.base, bwlimit=bwlimit):
            self.bootstrap_workers = 0
        #: Worker processes of the fresh bootstrap under way (None otherwise).
        self._bulk: Executor | None = None
        self.upstream = upstream
        self.id = replica_id
        self.poll_wait = poll_wait
        self.retain = retain
        self.stats = Stats()
        self.last_error: str | None = None
        self.last_contact: float = 0.0
        self.upstream_head = 0
        self._stop = asyncio.Event()
        self._sweep = self.journal.meta("inflight") is not None
        #: Directories that may still hold replaced versions under temp names (after a crash).
        self._sweep_dirs = {b"" if d == "." else bytes.fromhex(d) for d in (self.journal.meta("trash") or "").split()}
        self.on_applied: list[Callable[[], None]] = []
        #: The batch being flushed (run() overlaps its flush with fetching the next batch).
        self._placed: _Placed | None = None
        #: Seqs of a batch whose content is fetched before the previous batch's commit.
        self._early: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the follow loop to end."""
        self._stop.set()

    async def close(self) -> None:
        """Release resources (a batch already placed is committed once its flush returns)."""
        if self._placed is not None:
            try:
                await self._make_durable()
            except Exception as e:  # noqa: BLE001 - its records are applied again on the next start
                log.warning("replica %s: committing the last batch on close: %s", self.id, e)
        await self.client.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.journal.close()
        self.fs.close()

    def status(self) -> dict[str, Any]:
        """Replica-specific status fields."""
        return {"upstream": self.upstream, "id": self.id, "upstream_seq": self.upstream_head,
                "last_error": self.last_error, "last_contact": self.last_contact,
                "stats": self.stats.__dict__}

    async def run(self) -> None:
        """Follow the upstream until stop(); errors are logged, reported upstream and retried."""
        backoff = 0.2
        while not self._stop.is_set():
            try:
                if self.journal.meta("bootstrapped") is None:
                    await self.resync(bootstrap=True)
                page = await self._next_page()
                self.last_contact = time.time()
                self.upstream_head = page.head
                if page.journal_id != self.journal.journal_id:
                    raise ResyncNeeded(f"upstream {self.upstream} has journal {page.journal_id[:8]}…, "
                                       f"we follow {self.journal.journal_id[:8]}…")
                recs = page.records
                while recs:
                    n = await self._apply(recs)
                    recs = recs[n:]
                self.last_error = None
                backoff = 0.2
            except ResyncNeeded as e:
                log.warning("resync needed: %s", e)
                try:
                    await self.resync(bootstrap=False)
                except Exception as e2:  # noqa: BLE001 - reported and retried
                    await self._failed(f"resync: {e2}", backoff)
                    backoff = min(backoff * 2, 5.0)
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, asyncio.TimeoutError, FleetsyncError, OSError) as e:
                await self._failed(f"{type(e).__name__}: {e}", backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as e:  # noqa: BLE001 - a bug must not stop serving; it is logged loudly
                log.exception("replica %s: unexpected error", self.id)
                await self._failed(f"internal error {type(e).__name__}: {e}", backoff)
                backoff = min(backoff * 2, 5.0)

    async def _next_page(self) -> FeedPage:
        """The next feed page, asked for while the last batch flushes (which commits as soon as it can).

        Old versions waiting to be unlinked go once no page came for CLEANUP_IDLE s.
        """
        after = self._placed.recs[-1].seq if self._placed is not None else self.journal.head()
        task = asyncio.ensure_future(self.client.feed(after, limit=FEED_LIMIT, wait=self.poll_wait,
                                                      error=self.last_error))
        try:
            if self._placed is not None:
                # A page that comes first is returned at once: its content is fetched while the
                # flush goes on (see _apply); otherwise the batch commits without waiting for it.
                await asyncio.wait({task, self._placed.sync}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    return task.result()
                await self._make_durable()
            while self.fs.deferred:
                done, _ = await asyncio.wait({task}, timeout=CLEANUP_IDLE)
                if done:
                    break
                self.fs.start_cleanup()  # False while an earlier cleanup still runs: try again later
            return await task
        finally:
            if not task.done():
                task.cancel()

    async def _settle(self) -> None:
        """Commit the batch being flushed, if any; a failure only means its records are applied again."""
        if self._placed is not None:
            try:
                await self._make_durable()
            except Exception as e:  # noqa: BLE001 - the cursor stays before the batch
                log.error("replica %s: flushing or committing a batch: %s (it is applied again)", self.id, e)

    async def _failed(self, msg: str, delay: float) -> None:
        await self._settle()
        if msg != self.last_error:
            log.error("replica %s: %s", self.id, msg)
        self.last_error = msg
        try:
            await asyncio.wait_for(self._stop.wait(), delay * (0.5 + random.random()))
        except asyncio.TimeoutError:
            pass

    # -- bootstrap / resync ----------------------------------------------------------------------
    async def resync(self, *, bootstrap: bool) -> None:
        """Make the tree equal to the upstream's manifest snapshot (diff, not re-download)."""
        await self._settle()
        self.fs.flush_trash(strict=False)
        self._cleanup_done()
        t0 = time.monotonic()
        jid, seq, chunks = await self.client.snapshot()
        log.info("%s from %s at seq %d", "bootstrapping" if bootstrap else "resyncing", self.upstream, seq)
        stage = SnapshotStage(self.journal, seq)
        n = 0
        buf: list[Row] = []
        async for rows in chunks:
            buf += rows
            if len(buf) >= 5000:  # one staging transaction per 5,000 rows
                stage.add_rows(buf)
                n += len(buf)
                buf = []
        stage.add_rows(buf)
        n += len(buf)
        t1 = time.monotonic()
        fresh = bootstrap and self.journal.empty()
        extras: list[bytes] = []
        found = False
        if fresh:
            # What the root holds before anything is written and the snapshot lacks (everything
            # written from now on is in it); an empty root needs no look at the disk per file.
            keep = paths.IgnoreRules(())
            for p, _ in self.fs.walk():
                found = True
                if not keep.ignored(p) and not stage.contains(p):
                    extras.append(p)
        workers = self.bootstrap_workers if fresh and not found and n >= BULK_MIN_ENTRIES else 0
        if workers:
            # An empty root: worker processes write the small files (bulk.py), the parent the rest.
            log.info("bootstrap into an empty root: %d worker processes write the small files", workers)
            self._bulk = bulk.start_pool(workers)
        batches = _Concurrent(max(BOOTSTRAP_CONCURRENCY, workers + 1))
        flusher = _BackgroundFlush(self.fs, BACKGROUND_FLUSH)
        flusher.start()
        try:
            await self._resync_walk(stage, fresh, batches, look=not fresh or found)
            await batches.drain()
        finally:
            await batches.cancel()
            await flusher.stop()
            if self._bulk is not None:
                # Waits for shares still being written, so that none lands after this resync
                # (or the next one) has looked at its paths.
                self._bulk.shutdown(wait=True, cancel_futures=True)
                self._bulk = None
        # Deletions last, after the new content is in place.
        if not fresh:
            extras = stage.manifest_extras()
        for p in sorted(extras):
            if not stage.contains(p):
                self.fs.delete(p)
        self.fs.flush_trash()
        t2 = time.monotonic()
        self.fs.sync()
        t3 = time.monotonic()
        stage.install(seq, jid)
        self.stats.bootstraps += 1
        log.info("synchronized with %s at seq %d (%d entries; snapshot %.1f s, content %.1f s, flush %.1f s, "
                 "manifest %.1f s)", self.upstream, seq, n, t1 - t0, t2 - t1, t3 - t2, time.monotonic() - t3)

    async def _resync_walk(self, stage: SnapshotStage, fresh: bool, batches: "_Concurrent", look: bool = True) -> None:
        """Put every staged entry in place; file content is fetched in concurrent batches.

        look=False: the root was empty, so no file can already be in place.
        """
        pending: list[tuple[bytes, Entry]] = []
        pending_bytes = 0
        for p, e in stage.iter():
            if not fresh and stage.unchanged(p, e) and self._looks_applied(p, e):
                continue
            if e.kind == FILE:
                # A fresh bootstrap has an empty manifest: no content is known locally by hash.
                if look and self._settle_local_file(p, e, by_hash=not fresh):
                    continue
                pending.append((p, e))
                pending_bytes += min(e.size, BATCH_BLOB_MAX)
                if pending_bytes >= BATCH_BYTES or len(pending) >= 5000:
                    await batches.add(self._fetch_and_write(pending))
                    pending, pending_bytes = [], 0
            elif e.kind == DIR:
                self.fs.put_dir(p, e)
            else:
                self.fs.put_link(p, e)
        await batches.add(self._fetch_and_write(pending))

    def _looks_applied(self, p: bytes, e: Entry) -> bool:
        st = self.fs.lstat(p)
        if st is None:
            return False
        if e.kind == FILE:
            return stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns \
                and stat.S_IMODE(st.st_mode) == e.mode
        if e.kind == DIR:
            return stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == e.mode
        return stat.S_ISLNK(st.st_mode)

    def _settle_local_file(self, p: bytes, e: Entry, by_hash: bool = True) -> bool:
        """Use content already on disk (at p, or elsewhere by hash); True if p is now correct."""
        if self.fs.matches(p, e):
            self.fs.set_attrs(p, e)
            self.stats.files_reused += 1
            return True
        if not by_hash:
            return False
        for src in self.journal.paths_with_hash(e.hash):
            if src != p and self.fs.copy_file(src, p, e):
                self.stats.files_reused += 1
                return True
        return False

    def _pipeline(self) -> BlobPipeline:
        return BlobPipeline(self.fs, self.client, self._pool, self.upstream, self._count_fetched)

    def _count_fetched(self, n: int) -> None:
        self.stats.bytes_fetched += n

    async def _fetch_and_write(self, items: list[tuple[bytes, Entry]]) -> None:
        """Fetch content for (path, entry) pairs and place it; gone content is skipped.

        A resync's paths are independent of each other (their directories are in place before),
        so each small blob is written and linked at every path that wants it as it arrives: no
        per-blob futures or placing order as in BlobPipeline, which a record batch needs.
        """
        if not items:
            return
        by_hash: dict[bytes, list[tuple[bytes, Entry]]] = {}
        singly: list[tuple[bytes, Entry]] = []
        for p, e in items:
            assert e.hash is not None
            if e.size <= BATCH_BLOB_MAX:
                by_hash.setdefault(e.hash, []).append((p, e))
            else:
                singly.append((p, e))
        if by_hash and self._bulk is not None:
            up = bulk.Upstream(self.client.base, self.client.headers, self.client.compress)
            try:
                res = await asyncio.get_running_loop().run_in_executor(
                    self._bulk, bulk.fetch_share, up, self.fs.root, list(by_hash.values()))
            except BrokenExecutor as e:
                raise FleetsyncError(f"bootstrap from {self.upstream}: a worker process died ({e})") from e
            self.stats.bytes_fetched += res.bytes
            self.client.bytes_received += res.bytes
            self.stats.files_written += res.files
            self.stats.bootstrap_worker_peak_rss = max(self.stats.bootstrap_worker_peak_rss, res.peak_rss)
            singly.extend(res.left)
        elif by_hash:
            fs = self.fs
            async for digest, status, data in self.client.blobs(list(by_hash), [t[0][0] for t in by_hash.values()]):
                targets = by_hash[digest]
                if status == OK:
                    self.stats.bytes_fetched += len(data)
                    verify_digest(data, targets[0][1], f"blob from {self.upstream}")
                    for p, e in targets:
                        fs.write_file(p, data, e)
                    self.stats.files_written += len(targets)
                elif status == CHANGED:
                    raise RetryLater(f"blob {digest.hex()[:12]}… changed at {self.upstream} since it was "
                                     "recorded; retrying")
                elif status == GONE:
                    # Gone where it was asked for (the first path); maybe still at the others.
                    singly.extend(targets[1:])
                else:
                    singly.extend(targets)
        for p, e in singly:
            await self._fetch_large(p, e)

    async def _fetch_large(self, p: bytes, e: Entry) -> bool:
        """Stream one blob into a temp file in the root and link it in at p; False if gone upstream.

        The temp file lives in the root directory, so no cached directory descriptor is held
        across the transfer (a concurrent delete or move may drop them).
        """
        assert e.hash is not None
        fd, tmp = self.fs.open_root_temp()
        try:
            before = self.client.bytes_received
            if not await chunks.try_delta(self.client, self.fs, p, e, fd):
                await self._blob_resuming(p, e, fd)
            self.stats.bytes_fetched += self.client.bytes_received - before
            os.fchmod(fd, e.mode)
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        except BlobGone:
            self.fs.abort_temp(self.fs.fd, tmp, fd)
            return False
        except BlobChanged as err:
            self.fs.abort_temp(self.fs.fd, tmp, fd)
            raise RetryLater(str(err)) from err
        except BaseException:
            self.fs.abort_temp(self.fs.fd, tmp, fd)
            raise
        self.fs.link_root_temp(p, fd, tmp)
        self.stats.files_written += 1
        return True

    async def _blob_resuming(self, p: bytes, e: Entry, fd: int) -> None:
        """Stream a large blob into fd; after a broken connection, resume with Range from what fd holds.

        Up to RESUME_TRIES connections per blob, so a link that drops every few megabytes still
        delivers a large file instead of restarting it from byte 0 at every retry of the batch.
        """
        assert e.hash is not None
        delay = 0.2
        for attempt in range(1, RESUME_TRIES + 1):
            try:
                await self.client.blob_to_fd(e.hash, e.size, fd, hint=p)
                return
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as err:
                if attempt == RESUME_TRIES:
                    raise
                have = os.lseek(fd, 0, os.SEEK_END)
                log.info("fetching %s (%s…, %d bytes) from %s: %s; resuming at byte %d (try %d of %d)",
                         p[:80], e.hash.hex()[:12], e.size, self.upstream, type(err).__name__, have,
                         attempt + 1, RESUME_TRIES)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- steady state ----------------------------------------------------------------------------
    def _cut(self, records: list[Record]) -> list[Record]:
        total = 0
        for i, r in enumerate(records):
            if r.op == PUT and r.entry is not None and r.entry.kind == FILE:
                total += min(r.entry.size, BATCH_BLOB_MAX)
                if total > BATCH_BYTES and i > 0:
                    return records[:i]
        return records

    @staticmethod
    def _skips(recs: list[Record]) -> set[int]:
        """Indexes of file records a later record of the batch overwrites (never written)."""
        skip: set[int] = set()
        overwritten: set[bytes] = set()
        for i in range(len(recs) - 1, -1, -1):
            r = recs[i]
            if r.op == MOVE:
                overwritten.clear()
                continue
            if r.op == PUT and r.entry is not None and r.entry.kind == FILE and r.path in overwritten:
                skip.add(i)
            overwritten.add(r.path)
        return skip

    def _plan(self, recs: list[Record], skip: set[int]) -> _Plan:
        plan = _Plan(skip=skip)
        moves = [(i, r.old_path, r.path) for i, r in enumerate(recs) if r.op == MOVE and r.old_path is not None]
        # One query for the batch's manifest rows (the manifest changes only at the batch's commit).
        plan.known = self.journal.get_many([r.path for r in recs if r.entry is not None and r.entry.kind == FILE])
        elsewhere: dict[bytes, Entry] = {}  # content not found at its own paths: the manifest is asked
        for i, r in enumerate(recs):
            e = r.entry
            if i in plan.skip or e is None or e.kind != FILE or e.hash in plan.local:
                continue
            # Where could this content already sit on disk? Its own path, where later moves take it,
            # or any path the manifest says holds the same hash.
            cands = [r.path]
            cur = r.path
            for j, old, new in moves:
                if j > i and paths.is_under(cur, old):
                    cur = paths.rebase(cur, old, new)
                    cands.append(cur)
            for c in cands:
                if self.fs.matches(c, e):
                    plan.local[e.hash] = c
                    elsewhere.pop(e.hash, None)
                    break
            else:
                assert e.hash is not None
                elsewhere.setdefault(e.hash, e)
        # One query for all of them (a statement per record cost a new file ~25 µs of the plan).
        for h, cs in self.journal.paths_with_hashes(list(elsewhere)).items():
            for c in cs:
                m = plan.known.get(c) or self.journal.get(c)
                st = self.fs.lstat(c)
                if m and st and stat.S_ISREG(st.st_mode) and st.st_size == m.size and st.st_mtime_ns == m.mtime_ns:
                    plan.local[h] = c
                    break
        return plan

    async def apply_batch(self, records: list[Record]) -> int:
        """Apply a prefix of records durably; returns how many were applied."""
        n = await self._apply(records)
        await self._make_durable()
        return n

    def _small_blob(self, r: Record) -> bool:
        e = r.entry
        return e is not None and e.kind == FILE and e.size <= BATCH_BLOB_MAX

    async def _apply(self, records: list[Record]) -> int:
        """Apply a prefix of records to the tree and start flushing it; returns how many.

        The previous batch, if still flushing, is committed first: the plan needs its manifest.
        Its flush overlaps with streaming this batch's content into unnamed temp files, which
        become visible only when placed after that commit. Those blobs are asked for before the
        plan, so content the plan would have found on disk may cross the wire: bandwidth, not
        correctness, is at stake.
        """
        recs = self._cut(records)
        skip = self._skips(recs)
        fetched0, written0 = self.stats.bytes_fetched, self.stats.files_written
        pipe: BlobPipeline | None = None
        if self._placed is not None:
            pipe = self._pipeline()
            for i, r in enumerate(recs):
                if i not in skip and self._small_blob(r):
                    assert r.entry is not None and r.entry.hash is not None
                    pipe.want(r.entry.hash, r.entry, i, r.path)
            self._early = f"{recs[0].seq}-{recs[-1].seq}"
            pipe.start()
            try:
                await self._make_durable()
            except BaseException:
                await pipe.close(False)
                raise
            finally:
                self._early = None
        t0 = time.monotonic()
        if self._sweep or self._sweep_dirs:
            # Named temps (filesystems without O_TMPFILE) are written in the root, then renamed;
            # replaced versions wait under temp names until the batch after theirs.
            dirs = set(self._sweep_dirs)
            if self._sweep:
                dirs |= {b""} | {paths.parent(p) for r in recs for p in (r.path, r.old_path) if p}
            for d in dirs:
                self.fs.sweep_temps(d)
            self._sweep, self._sweep_dirs = False, set()
        self.journal.set_meta("inflight", f"{recs[0].seq}-{recs[-1].seq}")
        plan = self._plan(recs, skip)
        t_plan = time.monotonic()
        if pipe is None:
            pipe = self._pipeline()
            for i, r in enumerate(recs):
                e = r.entry
                if (i not in skip and self._small_blob(r) and e is not None and e.hash not in plan.local
                        and not self._unchanged_on_disk(r, plan)):
                    assert e.hash is not None
                    pipe.want(e.hash, e, i, r.path)
            # Content streams in and is written by worker threads while records are applied in order.
            pipe.start()
        moved = False
        ok = False
        try:
            for i, r in enumerate(recs):
                if i in plan.skip:
                    continue
                try:
                    moved |= await self._apply_one(r, plan, moved, pipe, i)
                except UnsafePath as e:
                    raise FleetsyncError(f"applying record {r.seq} ({r.op} {r.path[:80]!r}): {e}") from e
                pipe.passed(i)
            ok = True
        finally:
            await pipe.close(ok)
            if not ok:
                self.fs.flush_trash(strict=False)
        # The old versions of replaced and deleted files (no longer at any served path) are
        # unlinked after the cursor commit, once the replica is idle (see run) or when many wait:
        # freeing their blocks is not on the path of the changes still arriving. The commit
        # records every directory that may still hold one, so a restart after a crash sweeps them.
        dirs = self.fs.defer_trash()
        self._cleanup_done()
        t_apply = time.monotonic()
        self._placed = _Placed(recs, " ".join(sorted(d.hex() or "." for d in dirs)) or None,
                               asyncio.get_running_loop().run_in_executor(None, self._timed_sync),
                               self.stats.files_written - written0, self.stats.bytes_fetched - fetched0,
                               (t0, t_plan, t_apply))
        return len(recs)

    def _timed_sync(self) -> float:
        """Flush the root's filesystem (on a thread); returns when it finished (monotonic)."""
        self.fs.sync()
        return time.monotonic()

    async def _make_durable(self) -> None:
        """Wait for the placed batch's flush, then commit its records and cursor."""
        p = self._placed
        if p is None:
            return
        try:
            t_sync = await asyncio.shield(p.sync)
        except BaseException:
            if p.sync.done():  # the flush failed: the batch is applied again
                self._placed = None
            raise
        self._placed = None
        t_commit = time.monotonic()
        # A batch whose content is already streaming in may leave temp files behind a crash.
        self.journal.apply_records(p.recs, meta={"inflight": self._early, "trash": p.trash})
        t0, t_plan, t_apply = p.times
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch %d-%d: %d records, %d files written, %d bytes fetched; plan %.1f ms, fetch and apply "
                      "%.1f ms, flush %.1f ms, commit %.1f ms (begun %.1f ms after the flush)", p.recs[0].seq,
                      p.recs[-1].seq, len(p.recs), p.written, p.fetched, (t_plan - t0) * 1e3,
                      (t_apply - t_plan) * 1e3, (t_sync - t_apply) * 1e3, (time.monotonic() - t_commit) * 1e3,
                      (t_commit - t_sync) * 1e3)
        if self.fs.cleanup_due:
            self.fs.start_cleanup()
        self._compact()
        self.stats.batches += 1
        self.stats.records += len(p.recs)
        for cb in self.on_applied:
            cb()

    def _compact(self) -> None:
        """Drop applied records beyond `retain`, once RETAIN_SLACK of them have piled up."""
        j = self.journal
        if j.head() - j.min_seq() + 1 >= self.retain + RETAIN_SLACK:
            n = j.compact(self.retain)
            log.debug("replica %s: compacted %d records (kept from seq %d)", self.id, n, j.min_seq())

    def _cleanup_done(self) -> None:
        """Report an error of a finished background cleanup, once."""
        err, self.fs.cleanup_error = self.fs.cleanup_error, None
        if err is not None:
            log.warning("replica %s: removing replaced versions: %s (left under .fleetsync.*.tmp names, "
                        "which every walk ignores)", self.id, err)

    def _unchanged_on_disk(self, r: Record, plan: _Plan) -> bool:
        """Manifest says path already has this content and the disk agrees (a mode/mtime-only change)."""
        e = r.entry
        assert e is not None
        m = plan.known.get(r.path)
        if m is None or m.kind != FILE or m.hash != e.hash:
            return False
        st = self.fs.lstat(r.path)
        return bool(st and stat.S_ISREG(st.st_mode) and st.st_size == m.size and st.st_mtime_ns == m.mtime_ns)

    async def _apply_one(self, r: Record, plan: _Plan, moved: bool, pipe: BlobPipeline, i: int) -> bool:
        """Apply one record; returns True if it moved something (manifest shortcuts no longer hold)."""
        e = r.entry
        if r.op == DELETE:
            self.fs.delete(r.path, defer=True)
            return False
        if r.op == MOVE:
            assert r.old_path is not None
            if self.fs.lstat(r.old_path) is not None:
                self.fs.rename(r.old_path, r.path)
                if e is not None and e.kind in (FILE, DIR):
                    self.fs.set_attrs(r.path, e)
                return True
            have = self.fs.kind(r.path)
            if e is None or have == e.kind:
                if e is not None and e.kind != LINK:
                    self.fs.set_attrs(r.path, e)
                return True
            if e.kind == DIR:
                raise ResyncNeeded(f"move {r.old_path[:80]!r} -> {r.path[:80]!r}: source directory missing")
            await self._put(r.path, e, plan, moved, pipe, i)
            return True
        assert e is not None
        await self._put(r.path, e, plan, moved, pipe, i)
        return False

    async def _put(self, p: bytes, e: Entry, plan: _Plan, moved: bool, pipe: BlobPipeline, i: int) -> None:
        if e.kind == DIR:
            self.fs.put_dir(p, e)
            return
        if e.kind == LINK:
            self.fs.put_link(p, e)
            return
        assert e.hash is not None
        if (e.hash, p) in plan.gone:
            return
        if not moved and self._unchanged_on_disk(Record(0, PUT, p, e), plan):
            self.fs.set_attrs(p, e)
            return
        src = plan.local.get(e.hash)
        if src == p and self.fs.matches(p, e):
            self.fs.set_attrs(p, e)
            self.stats.files_reused += 1
            return
        st = await pipe.place(e.hash, i, p, e)
        if st == OK:
            self.stats.files_written += 1
            return
        if st == GONE and pipe.hint_of(e.hash) == p:
            plan.gone.add((e.hash, p))
            return
        if src is not None and self.fs.copy_file(src, p, e):
            self.stats.files_reused += 1
            return
        if not await self._fetch_large(p, e):
            plan.gone.add((e.hash, p))
