"""Portable scanner: change detection without inotify/fanotify (AIX, BSD, NFS-mounted sources).

Two incremental passes, run in a background thread:

* **structure** — lstat every known directory; only a directory whose inode or ctime changed since
  the scanner last listed it is listed again, and its names are compared with the manifest
  (adds, deletes, renames; every symlink in it is checked, a same-name replacement changes no
  name). Unchanged directories are pruned: one lstat, no readdir.
* **edits** — lstat the manifest's files in path order, at most `rate` per second, resuming where
  the previous pass stopped; a size/mtime/ctime/inode difference becomes a hint.

The same class covers subtrees that inotify could not watch (watch limit reached): give it
`scopes`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time
from collections.abc import Callable

from fleetsync import paths
from fleetsync.detect import HintSink
from fleetsync.entry import DIR, LINK
from fleetsync.journal.sqlite import SqliteJournal

log = logging.getLogger("fleetsync.detect.scan")


class ScanDetector:
    """Polls the tree incrementally and feeds a HintSink."""

    name = "scan"

    def __init__(self, root: str | bytes, db_path: str, *, interval: float = 1.0, rate: float = 5000.0,
                 scopes: set[bytes] | None = None) -> None:
        self.root = os.fsencode(os.path.abspath(root))
        self.db_path = db_path
        self.interval = interval
        self.rate = rate
        self.scopes = scopes if scopes is not None else {b""}
        self._listed: dict[bytes, tuple[int, int]] = {}
        self._edit_cursor = b""
        self._hinted: dict[bytes, tuple[int, int, int, int] | None] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._post: Callable[..., object] = lambda *a: None
        self.passes = 0
        self.stats_calls = 0

    def start(self, sink: HintSink) -> None:
        """Start the polling thread; hints are delivered on the running loop."""
        loop = asyncio.get_running_loop()
        self._post = lambda fn, *a, **kw: loop.call_soon_threadsafe(lambda: fn(*a, **kw))
        self._sink = sink
        self._thread = threading.Thread(target=self._run, name="scan-detector", daemon=True)
        self._thread.start()

    def _scopes(self) -> list[bytes]:
        """A copy of the (possibly shared, live) scope set."""
        while True:
            try:
                return list(self.scopes)
            except RuntimeError:  # changed size during iteration (another thread): retry
                continue

    def drain(self) -> None:
        """Nothing is queued: the scanner posts hints as it finds them."""

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- passes ----------------------------------------------------------------------------------
    def _run(self) -> None:
        reader = SqliteJournal(self.db_path, durable=False)
        try:
            # First pass: remember every directory's identity without hinting (start-up reconcile
            # already compared the tree with the manifest).
            for scope in self._scopes():
                self._structure(reader, scope, prime=True)
            while not self._stop.wait(self.interval):
                t0 = time.monotonic()
                for scope in self._scopes():
                    self._structure(reader, scope)
                budget = max(int(self.rate * self.interval), 100)
                self._edits(reader, budget)
                self.passes += 1
                log.debug("scan pass %d in %.3fs", self.passes, time.monotonic() - t0)
        except Exception:  # noqa: BLE001 - a dead scanner must be loud
            log.exception("scanner failed; rescanning everything")
            self._post(self._sink.rescan, b"")
        finally:
            reader.close()

    def _lstat(self, rel: bytes) -> os.stat_result | None:
        self.stats_calls += 1
        try:
            return os.lstat(os.path.join(self.root, rel) if rel else self.root)
        except OSError:
            return None

    def _structure(self, reader: SqliteJournal, scope: bytes, prime: bool = False) -> None:
        stack = [scope]
        while stack and not self._stop.is_set():
            d = stack.pop()
            st = self._lstat(d)
            if st is None or not stat.S_ISDIR(st.st_mode):
                self._listed.pop(d, None)
                if d and not prime:
                    self._post(self._sink.removed, d)
                continue
            ident = (st.st_ino, st.st_ctime_ns)
            if self._listed.get(d) == ident:
                # Unchanged directory: descend using the manifest's subdirectories, no readdir.
                stack.extend(paths.join(d, n) for n in reader.children(d, kind=DIR))
                continue
            self._listed[d] = ident
            try:
                with os.scandir(os.path.join(self.root, d) if d else self.root) as it:
                    names: dict[bytes, bool] = {}
                    links: set[bytes] = set()
                    for de in it:
                        names[de.name] = de.is_dir(follow_symlinks=False)
                        if de.is_symlink():
                            links.add(de.name)
            except OSError:
                continue
            if not prime:
                known = set(reader.children(d))
                # A symlink replaced under the same name (by another symlink, or a file by a
                # symlink and back) leaves the names as they were, and the edit pass only looks
                # at regular files: every symlink of a changed directory is checked.
                links |= set(reader.children(d, kind=LINK))
                for n, is_dir in names.items():
                    p = paths.join(d, n)
                    if n not in known:
                        self._post(self._sink.rescan if is_dir else self._sink.changed, p)
                    elif n in links:
                        self._post(self._sink.changed, p)
                for n in known - set(names):
                    self._post(self._sink.removed, paths.join(d, n))
                if d:
                    self._post(self._sink.changed, d)
            stack.extend(paths.join(d, n) for n, is_dir in names.items() if is_dir)

    def _edits(self, reader: SqliteJournal, budget: int) -> None:
        rows = reader.db.execute(
            "SELECT path, size, mtime, ino, ctime FROM manifest WHERE kind='f' AND path > ? ORDER BY path LIMIT ?",
            (self._edit_cursor, budget)).fetchall()
        if len(rows) < budget:
            self._edit_cursor = b""
            # A full cycle ended: forget hints for vanished paths (their rows are gone by now).
            self._hinted = {p: sig for p, sig in self._hinted.items()
                            if sig is not None or reader.get(p) is not None}
        scopes = self._scopes()
        for path, size, mtime, ino, ctime in rows:
            if not any(paths.is_under(path, s) for s in scopes):
                continue
            st = self._lstat(path)
            sig = None if st is None else (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            if sig == (size, mtime, ino, ctime):
                self._hinted.pop(path, None)
            elif self._hinted.get(path, 0) != sig:
                # Hint once per distinct state: re-hinting an unchanged difference on every pass
                # would keep postponing the settle deadline forever.
                self._hinted[path] = sig
                self._post(self._sink.removed if st is None else self._sink.changed, path)
        if rows and len(rows) == budget:
            self._edit_cursor = rows[-1][0]
