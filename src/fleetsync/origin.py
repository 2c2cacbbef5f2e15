"""The origin process: detector -> indexer -> journal, served over the upstream HTTP API."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from fleetsync import paths
from fleetsync.detect import Detector, HintSink, TracingSink
from fleetsync.detect.inotify import InotifyDetector
from fleetsync.detect.scan import ScanDetector
from fleetsync.index.hot import MISS_BYTES, HotBlobs
from fleetsync.index.indexer import Indexer
from fleetsync.journal import DEFAULT_RETAIN
from fleetsync.journal.sqlite import SqliteJournal
from fleetsync.ops import publish
from fleetsync.transport.server import ServerState, start_server

log = logging.getLogger("fleetsync.origin")


class Origin:
    """Watches ROOT, journals every change, serves the feed and content."""

    def __init__(self, root: str, state_dir: str, *, settle: float = 0.2, token: str | None = None,
                 retain: int = DEFAULT_RETAIN, allow_empty: bool = False,
                 ignore: list[str] | None = None, detector: str = "auto", scan_interval: float = 1.0,
                 scan_rate: float = 5000.0, reconcile_rate: float = 0.0) -> None:
        if not os.path.isdir(root):
            raise SystemExit(f"fleetsync origin: root {root!r} is not a directory")
        self.root = os.path.abspath(root)
        self.journal = SqliteJournal(os.path.join(state_dir, "origin.db"), durable=True, content_index=False)
        rules = paths.IgnoreRules(tuple(ignore) if ignore is not None else paths.DEFAULT_IGNORE)
        self.hot = HotBlobs()
        self.missed = HotBlobs(MISS_BYTES)
        self.indexer = Indexer(self.root, self.journal, settle=settle, ignore=rules, allow_empty=allow_empty,
                               on_commit=self._committed, scan_rate=reconcile_rate, hot=self.hot)
        self.scan_interval, self.scan_rate = scan_interval, scan_rate
        self.fallback_scan: ScanDetector | None = None
        self._detecting = False
        self.detector = self._make_detector(detector)
        self.indexer.close_events = self.detector.name != "scan"
        self.retain = retain
        self.started = time.time()
        self.server = ServerState(self.journal, self.root, token=token, role="origin",
                                  extra_status=self._status, extra_routes=publish.routes(self.indexer, token),
                                  hot=self.hot, missed=self.missed)
        self._stop = asyncio.Event()

    def _make_detector(self, kind: str) -> Detector:
        """Build the detector backend for --detector kind (see `select_detector` for 'auto')."""
        if kind in ("auto", "fanotify"):
            choice, why = select_detector(kind, lambda: _fanotify_check(self.root))
            if choice == "fanotify":
                made = _try_fanotify(self.root, strict=kind == "fanotify")
                if not isinstance(made, str):
                    return made
                why = made
            if kind == "fanotify":
                raise SystemExit(f"fleetsync origin: fanotify unavailable: {why}")
            log.info("fanotify unavailable: %s; using inotify", why)
        if kind in ("auto", "inotify"):
            try:
                det = InotifyDetector(self.root)
                det.on_unwatched = self._unwatched
                return det
            except OSError as e:
                if kind == "inotify":
                    raise SystemExit(f"fleetsync origin: inotify unavailable: {e}") from e
                log.warning("inotify unavailable (%s); using the portable scanner", e)
        return ScanDetector(self.root, self.journal.db_path, interval=self.scan_interval, rate=self.scan_rate)

    def _unwatched(self, rel: bytes) -> None:
        """inotify could not watch rel: cover it with the scanner so nothing goes silent."""
        if self.fallback_scan is None:
            # The scanner shares the detector's live set of unwatched subtrees (kept up to date
            # when they are moved or deleted).
            det = self.detector
            assert isinstance(det, InotifyDetector)
            self.fallback_scan = ScanDetector(self.root, self.journal.db_path, interval=self.scan_interval,
                                              rate=self.scan_rate, scopes=det.unwatched)
            if self._detecting:
                self.fallback_scan.start(self._sink())

    def _sink(self) -> HintSink:
        """Where detectors send hints: the indexer (through a logging wrapper with debug logging on)."""
        if logging.getLogger("fleetsync.hints").isEnabledFor(logging.DEBUG):
            return TracingSink(self.indexer)
        return self.indexer

    def _committed(self, n: int) -> None:
        self.server.notify()

    def _status(self) -> dict[str, Any]:
        return {"root": self.root, "pending": self.indexer.busy(), "paused": self.indexer.paused,
                "entries": self.journal.count(), "detector": self.detector.name,
                "unwatched": len(getattr(self.detector, "unwatched", ())),
                "overflows": getattr(self.detector, "overflows", 0),
                "scan": {"running": self.indexer.scanning, "checked": self.indexer.scan_checked,
                         "differ": self.indexer.scan_differ, "walks": self.indexer.walks,
                         "fallbacks": getattr(self.detector, "fallback_rescans", 0)},
                "hot_blobs": {"items": len(self.hot), "bytes": self.hot.nbytes, "hits": self.hot.hits,
                              "misses": self.hot.misses},
                "kept_on_miss": {"items": len(self.missed), "bytes": self.missed.nbytes, "hits": self.missed.hits},
                "prehash": {"hashed": self.indexer.prehashed, "used": self.indexer.prehash_used},
                "uptime": round(time.time() - self.started, 1)}

    def stop(self) -> None:
        """Ask run() to return."""
        self._stop.set()

    async def run(self, host: str, port: int) -> None:
        """Start watching and serving; reconcile with the manifest; run until stop()."""
        first = self.indexer.initial_scan_needed()
        # Serve what the journal already holds right away; the watch walk (one inotify watch per
        # directory) runs in a worker thread meanwhile, and the rescan below covers its window.
        runner = await start_server(self.server, host, port)
        log.info("origin serving %s on http://%s:%d (journal %s, seq %d)", self.root, host, port,
                 self.journal.journal_id[:8], self.journal.head())
        log.info("change detection: %s", self.detector.name)
        prewatch = getattr(self.detector, "prewatch", None)
        if prewatch is not None:
            self.indexer.scanning += 1  # reported as pending until the watches are in place
            try:
                await asyncio.get_running_loop().run_in_executor(None, prewatch)
            finally:
                self.indexer.scanning -= 1
        self.detector.start(self._sink())
        self._detecting = True
        if self.fallback_scan is not None:
            self.fallback_scan.start(self._sink())
        self.indexer.drain = self.detector.drain
        log.info("%s %s", "indexing" if first else "reconciling", self.root)
        self.indexer.rescan(b"")
        tasks = [asyncio.create_task(self.indexer.run(self._stop)), asyncio.create_task(self._housekeeping())]
        try:
            await self._stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await runner.cleanup()
            self.detector.close()
            self.indexer.close()
            if self.fallback_scan is not None:
                self.fallback_scan.close()
            self.journal.close()

    async def _housekeeping(self) -> None:
        last: tuple[int, int] = (-1, -1)
        while True:
            await asyncio.sleep(2.0)
            ix = self.indexer
            if ix.scanning and (ix.records_written, ix.scan_checked) != last:
                log.info("scanning: %d entries checked, %d differ from the manifest, %d records written, "
                         "%d pending", ix.scan_checked, ix.scan_differ, ix.records_written, len(ix.pending))
                last = (ix.records_written, ix.scan_checked)
            self.journal.compact(self.retain)
            self.hot.expire()
            self.missed.expire()


def select_detector(kind: str, fanotify_check: Callable[[], tuple[bool, str]]) -> tuple[str | None, str | None]:
    """The backend for --detector kind and why fanotify was not chosen (None: chosen, or not asked for).

    'auto' picks fanotify when `fanotify_check` passes (root with CAP_SYS_ADMIN, Linux >= 5.9, a
    root filesystem with file handles, a filesystem mark that can be set), else inotify; the
    caller logs the reason. An explicit 'fanotify' that is unavailable gives (None, reason).
    """
    if kind not in ("auto", "fanotify"):
        return kind, None
    ok, why = fanotify_check()
    if ok:
        return "fanotify", None
    return ("inotify" if kind == "auto" else None), why


def _fanotify_check(root: str) -> tuple[bool, str]:
    """fanotify_available(root), or (False, reason) if the backend cannot even be imported."""
    try:
        from fleetsync.detect.fanotify import fanotify_available
    except ImportError as e:  # pragma: no cover - module missing
        return False, f"fanotify backend not importable: {e}"
    return fanotify_available(root)


def _try_fanotify(root: str, *, strict: bool) -> Detector | str:
    """A started-up fanotify detector, or the reason it cannot be used (with strict=False: for 'auto').

    Under 'auto' a failing fanotify_init/fanotify_mark, or another filesystem mounted below the
    root (which the filesystem mark would not see), means inotify instead.
    """
    from fleetsync.detect.fanotify import FanotifyDetector

    try:
        det = FanotifyDetector(root)
    except OSError as e:
        if strict:
            raise SystemExit(f"fleetsync origin: fanotify unavailable: {e}") from e
        return str(e)
    mounts = det.submounts()
    if mounts and not strict:
        det.close()
        return f"{len(mounts)} other filesystem(s) mounted below the root ({mounts[0]!r}, ...) that a " \
               "filesystem mark does not see"
    return det


def run_origin(root: str, state: str, listen: tuple[str, int], **kw: Any) -> None:
    """Run an origin until SIGINT/SIGTERM."""
    async def main() -> None:
        o = Origin(root, state, **kw)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, o.stop)
        await o.run(*listen)

    asyncio.run(main())
