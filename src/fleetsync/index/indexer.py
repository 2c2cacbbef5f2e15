"""The indexer: settles hints, verifies them against the disk and the manifest, commits records.

Every journal write on the origin goes through `Indexer.process_ready`, one batch at a time, so
records are ordered exactly as the indexer observed the tree. Hints are never trusted: a path is
lstat'ed (confined, no symlink following) and hashed when its size/mtime/inode/ctime changed; a
result is dropped if a new event for the path arrived while it was being hashed.

A small file whose writer closed it is hashed at once, on a thread of its own, while its settle
window runs (the "pre-hash"). When the window ends and lstat still shows exactly what was hashed
(inode, size, mtime, ctime) with no event for the path since, that digest is used: the batch's
observation is then an lstat per path, and the reading and hashing happened while the origin
had nothing else to do (the replicas wait for the batch's commit).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Set as AbstractSet
from dataclasses import dataclass

from fleetsync import paths
from fleetsync.entry import DELETE, DIR, FILE, LINK, MOVE, PUT, Entry, entry_from_stat, kind_of
from fleetsync.errors import RootVanished
from fleetsync.hashing import hash_fd_keep
from fleetsync.index.hot import HOT_ITEM_MAX, HotBlobs
from fleetsync.journal.sqlite import Change, LocalStat, SqliteJournal
from fleetsync.replica.fsops import ConfinedRoot

log = logging.getLogger("fleetsync.index")

BATCH = 2000
MAX_PENDING_SCAN = 20000
#: How long (and how many) paths found gone are remembered for a directory move reported late.
VANISHED_KEEP = 10.0
VANISHED_MAX = 20000
#: Signal a broken lease would send (ignored by default; the lease is dropped at once anyway).
_LEASE_SIGNAL = signal.SIGURG
#: Directory moves remembered for the hints of running rescans (each hint is checked against all).
SCAN_MOVES_MAX = 256
#: Pre-hashes queued or running at most (past it, a closed file is hashed when it settles).
PREHASH_QUEUE = 4096


@dataclass(slots=True)
class Pending:
    """A hint waiting to settle."""

    deadline: float
    writing: bool
    first: float
    removed: bool = False
    #: Hinted by a walk only (no event): its content is not kept for replicas (see HotBlobs).
    walked: bool = False
    #: Which hint this is: a pre-hash applies only to the hint it was started for.
    gen: int = 0
    #: The digest as hashed right after the writer closed the file (None: not pre-hashed).
    pre: "_Pre | None" = None


@dataclass(slots=True)
class _Pre:
    """A pre-hash: the file's stat identity when hashed and its digest (small files' content went to the hot cache)."""

    key: tuple[int, int, int, int]
    digest: bytes


def _key(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass(slots=True)
class _Obs:
    path: bytes
    st: os.stat_result | None
    entry: Entry | None = None
    local: LocalStat | None = None
    unstable: bool = False
    hashed: bool = False
    #: A writer had the file open when it was looked at (None: could not tell).
    busy: bool | None = None


def open_for_write(fd: int) -> bool | None:
    """Does any process have the file behind fd (opened read-only) open for writing? None: cannot tell.

    A read lease is refused (EAGAIN) while the file is open for writing anywhere, including an
    open(O_TRUNC) still inside the kernel: that one has no descriptor in /proc yet and, on ext4,
    shows size 0 with the old mtime and ctime until its truncate finishes. A granted lease is
    dropped at once. Needs the file's owner or CAP_LEASE and leases enabled (fs.leases-enable).
    """
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, _LEASE_SIGNAL)  # not SIGIO: its default action kills
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        if e.errno == errno.EAGAIN:
            return True
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass  # closing the descriptor drops it too
    return False


class Indexer:
    """Origin-side hint sink and record producer."""

    def __init__(self, root: str, journal: SqliteJournal, *, settle: float = 0.2, open_timeout: float = 60.0,
                 ignore: paths.IgnoreRules | None = None, allow_empty: bool = False, scan_rate: float = 0.0,
                 on_commit: Callable[[int], None] | None = None, close_events: bool = True,
                 hot: HotBlobs | None = None) -> None:
        self.root = os.fsencode(os.path.abspath(root))
        #: Where the content of small files just hashed is kept for the replicas (None: not kept).
        self.hot = hot
        self.fs = ConfinedRoot(self.root, cache=False)
        self.j = journal
        self.settle = settle
        self.open_timeout = open_timeout
        #: False when the detector cannot report closes (the scanner): then every settled file is
        #: also checked for open descriptors before it is recorded.
        self.close_events = close_events
        self.ignore = ignore or paths.IgnoreRules()
        self.allow_empty = allow_empty
        self.on_commit = on_commit or (lambda n: None)
        self.pending: dict[bytes, Pending] = {}
        self.paused: str | None = None
        self.scanning = 0
        self.drain: Callable[[], None] = lambda: None
        self._moves: list[Change] = []
        st = os.stat(self.root)
        self._root_id = (st.st_dev, st.st_ino)
        self._wake = asyncio.Event()
        self._shadow: dict[bytes, Entry | None] = {}
        #: Unchanged files of the batch whose stat identity moved on (a rename changes the ctime),
        #: refreshed in the batch's commit so they are not hashed again next time.
        self._touched: list[tuple[bytes, LocalStat]] = []
        #: Manifest rows read for the batch being computed (None: not in the manifest).
        self._fetched: dict[bytes, Entry | None] = {}
        self._inflight = 0
        #: Paths of the batch being observed: a move read meanwhile re-hints them at their new place
        #: (and rescans those the manifest holds as directories).
        self._flight: list[bytes] = []
        self._flight_dirs: set[bytes] = set()
        #: Paths recently found gone (path -> (when, was a directory in the manifest)): a directory
        #: move read later than it happened (an event delayed in the detector) re-hints them too.
        self._vanished: dict[bytes, tuple[float, bool]] = {}
        #: Directory moves read while a rescan runs: its hints in transit may name the old place.
        self._scan_moves: list[tuple[bytes, bytes]] = []
        #: Rescans asked for while detector moves wait to be committed: they start after them.
        self._deferred_walks: list[bytes] = []
        #: Paths being walked by a rescan -> whether another walk was asked for meanwhile.
        self._walks: dict[bytes, bool] = {}
        self._held: set[tuple[int, int]] | None = None
        #: What the last /proc walk saw held open, even where it could not read every process.
        self._held_seen: set[tuple[int, int]] = set()
        self._held_at = -1.0
        self.records_written = 0
        self.scan_rate = scan_rate
        self.scan_checked = 0
        self.scan_differ = 0
        #: Rescan walks started (start-up reconcile, overflows, directories that arrived, fallbacks).
        self.walks = 0
        self._gen = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pre_q: deque[tuple[bytes, int]] = deque()
        self._pre_wake = threading.Event()
        self._pre_thread: threading.Thread | None = None
        self._pre_stop = False
        self._pre_queued = 0
        #: Files pre-hashed, and how many of those digests a batch used.
        self.prehashed = 0
        self.prehash_used = 0

    # -- HintSink --------------------------------------------------------------------------------
    def changed(self, path: bytes, *, writing: bool = False, closed: bool = False) -> None:
        """A path may have changed."""
        if self.ignore.ignored(path):
            return
        now = time.monotonic()
        self._gen += 1
        p = self.pending.get(path)
        if p is None:
            p = self.pending[path] = Pending(now + self.settle, writing and not closed, now, gen=self._gen)
        else:
            p.deadline = now + self.settle
            p.removed = False
            p.walked = False
            p.gen = self._gen
            p.pre = None
            if closed:
                p.writing = False
            elif writing:
                p.writing = True
        if closed and not p.writing and self.close_events:
            self._prehash(path, p.gen)
        self._wake.set()

    # -- pre-hash --------------------------------------------------------------------------------
    def _prehash(self, path: bytes, gen: int) -> None:
        """Queue a file its writer just closed for the pre-hash thread (if the queue has room)."""
        if self._loop is None or self._pre_stop or self._pre_queued >= PREHASH_QUEUE:
            return
        if self._pre_thread is None:
            self._pre_thread = threading.Thread(target=self._pre_worker, args=(self._loop,),
                                                name="fleetsync-prehash", daemon=True)
            self._pre_thread.start()
        self._pre_queued += 1
        self._pre_q.append((path, gen))
        self._pre_wake.set()

    def _pre_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        """The pre-hash thread: hash what is queued, hand results to the loop a chunk at a time."""
        while not self._pre_stop:
            self._pre_wake.wait()
            self._pre_wake.clear()
            out: list[tuple[bytes, int, _Pre | None]] = []
            while self._pre_q and not self._pre_stop:
                path, gen = self._pre_q.popleft()
                try:
                    pre = self._prehash_one(path, gen)
                except Exception:  # noqa: BLE001 - only an optimisation: the batch hashes the file
                    log.debug("pre-hash of %r failed", path, exc_info=True)
                    pre = None
                out.append((path, gen, pre))
                if len(out) >= 64 or not self._pre_q:
                    try:
                        loop.call_soon_threadsafe(self._prehashed, out)
                    except RuntimeError:  # the loop is closed
                        return
                    out = []

    def _prehash_one(self, path: bytes, gen: int) -> _Pre | None:
        """Read and hash path now if it is still this hint's, small, and no writer holds it (a worker thread)."""
        p = self.pending.get(path)
        if p is None or p.gen != gen:
            return None  # touched again, or taken by a batch meanwhile
        item_max = self.hot.item_max if self.hot is not None else HOT_ITEM_MAX
        st = self.fs.lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > item_max:
            return None
        read = self._read_file(path, st, item_max if self.hot is not None else -1)
        if read is None or read[2]:
            return None  # changed while read, or another writer has it open: the batch looks again
        digest, data, _ = read
        if data is not None and self.hot is not None:
            # Into the hot cache now, under its digest: its one budget bounds content waiting for
            # a batch as well as committed content (an entry is right for its digest whatever
            # happens to the file later; one the batch does not use just ages out).
            self.hot.put(digest, data)
        return _Pre(_key(st), digest)

    def _read_file(self, path: bytes, st: os.stat_result, keep: int) -> tuple[bytes, bytes | None, bool | None] | None:
        """Hash the file lstat'ed as st: (digest, content if at most `keep` bytes, a writer holds it
        open (None: cannot tell)), or None if it cannot be opened or is not what st showed any more."""
        try:
            fd = self.fs.open_read(path)
        except OSError:
            return None
        try:
            digest, n, data = hash_fd_keep(fd, keep, st.st_size)
            # After the content was read: is a writer at work (an open(O_TRUNC) in progress
            # included)? If none is, the stat below shows whether what was read is still there.
            busy = open_for_write(fd)
            st2 = os.fstat(fd)
        finally:
            os.close(fd)
        if n != st.st_size or _key(st2) != _key(st):
            return None
        return digest, data, busy

    def _prehashed(self, results: list[tuple[bytes, int, _Pre | None]]) -> None:
        """On the loop: attach pre-hashes to their hints, unless a hint changed or was taken since."""
        self._pre_queued -= len(results)
        for path, gen, pre in results:
            if pre is None:
                continue
            self.prehashed += 1
            p = self.pending.get(path)
            if p is None or p.gen != gen:
                continue
            p.pre = pre

    def close(self) -> None:
        """Stop the pre-hash thread (queued pre-hashes are dropped)."""
        self._pre_stop = True
        self._pre_wake.set()
        if self._pre_thread is not None:
            self._pre_thread.join(5.0)

    def removed(self, path: bytes) -> None:
        """A path may be gone."""
        if self.ignore.ignored(path):
            return
        now = time.monotonic()
        cur = self.pending.get(path)
        if cur is not None and cur.removed:
            return  # already waiting to verify this removal; a repeat is not new activity
        # Same settle as changes, so a rename seen as delete + create lands in one batch (inode match).
        self._gen += 1
        self.pending[path] = Pending(now + self.settle, False, now, removed=True, gen=self._gen)
        self._wake.set()

    def moved(self, old: bytes, new: bytes, is_dir: bool) -> None:
        """A rename inside the root: becomes one move record if the manifest knows `old` by then."""
        if self.ignore.ignored(new):
            self.removed(old)
            return
        # Carry pending hints along with the rename.
        for p in [p for p in self.pending if paths.is_under(p, old)]:
            self.pending[paths.rebase(p, old, new)] = self.pending.pop(p)
        if is_dir:
            # The batch being observed may look at a path below after this rename happened on
            # disk (gone, and unknown to the manifest if new), or already did: have it looked at
            # again where it is now. (A moved file itself gets its hint below.)
            # A directory the manifest holds is deleted with everything below it when found gone:
            # it is walked again where it is now, not only hinted.
            prefix = old + b"/"
            for p in self._flight:
                if p.startswith(prefix):
                    self._look_again(paths.rebase(p, old, new), p in self._flight_dirs)
            if self._vanished:
                for p in [p for p in self._vanished if p.startswith(prefix)]:
                    _, was_dir = self._vanished.pop(p)
                    self._look_again(paths.rebase(p, old, new), was_dir)
            if self.scanning:
                if len(self._scan_moves) < SCAN_MOVES_MAX:
                    self._scan_moves.append((old, new))
                else:  # every scan hint is checked against these: past the bound, walk the destination
                    self.rescan(new)
        if self.ignore.ignored(old):
            self.changed(new, closed=True)
            return
        # Whether `old` is known is decided when the move is committed, in order with earlier
        # moves (a child of a directory moved a moment ago is known only under its new name).
        self._moves.append(Change(MOVE, new, None, old))
        if is_dir and any(paths.is_under(old, w) or paths.is_under(w, old) for w in self._walks):
            # A running walk compared what is at `old` now with the manifest from before this
            # move (a directory made again under the old name looks unchanged): walk it again.
            self.rescan(old)
        if not is_dir:
            self.changed(new)  # verify the destination once it settles
        self._wake.set()

    def _look_again(self, path: bytes, walk: bool) -> None:
        """Hint path again; also rescan it when it was a directory with entries the manifest held."""
        if walk:
            self.rescan(path)
        self.changed(path)

    def rescan(self, path: bytes) -> None:
        """Compare a subtree with the manifest (hints for everything that differs).

        At most one walk per path runs at a time: a request for a path whose walk is running
        makes it run once more when it ends (it then starts after every request it answers).
        Queue overflows and unlocatable events on a busy filesystem ask for the whole root, often
        several times a second; concurrent walks of a 1M-file root would only compete.
        """
        if path in self._walks:
            if not self._walks[path]:
                self._walks[path] = True
                self.scanning += 1  # the rerun counts as pending work
            return
        if self._moves:
            # A walk compares the disk with the manifest: it starts once the moves already read
            # are committed (a directory made again under a name just moved away would otherwise
            # match the manifest's entry for the old one, which the move then takes away).
            if path not in self._deferred_walks:
                self._deferred_walks.append(path)
                self.scanning += 1
            self._wake.set()
            return
        self._walks[path] = False
        self.scanning += 1
        self.walks += 1
        loop = asyncio.get_running_loop()

        def run() -> None:
            try:
                for hint in self.diff_subtree(path):
                    while len(self.pending) > MAX_PENDING_SCAN:
                        time.sleep(0.01)  # back-pressure: let the indexer catch up
                    loop.call_soon_threadsafe(self._scan_hint, hint)
            except Exception:  # noqa: BLE001 - logged; the next rescan retries
                log.exception("rescan of %r failed", path)
            finally:
                loop.call_soon_threadsafe(self._walk_done, path)

        threading.Thread(target=run, name="rescan", daemon=True).start()

    def _walk_done(self, path: bytes) -> None:
        again = self._walks.pop(path, False)
        self._scan_done()
        if again:
            self.scanning -= 1  # counted when it was asked for; rescan() counts it again
            self.rescan(path)

    def root_lost(self, reason: str) -> None:
        """Pause: the root vanished (invariant 6)."""
        self.paused = reason
        log.error("PAUSED: %s; no changes are propagated until it is back", reason)
        self._wake.set()

    def _scan_hint(self, path: bytes) -> None:
        # A directory move read since the walk started may have happened after the walk listed
        # this path: look there too (a hint is only checked, so a redundant one costs one lstat).
        hints = [path]
        for old, new in self._scan_moves:
            hints += [paths.rebase(h, old, new) for h in hints if paths.is_under(h, old)]
        now = time.monotonic()
        for h in hints:
            if h not in self.pending:
                self.pending[h] = Pending(now, False, now, walked=True)
        self._wake.set()

    def _scan_done(self) -> None:
        self.scanning -= 1
        if not self.scanning:
            self._scan_moves.clear()
        self._wake.set()

    # -- scanning (runs in a thread) -------------------------------------------------------------
    def walk(self, top: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
        """lstat every entry at and under top (no symlink following), in path byte order.

        The order is the manifest's (`ORDER BY path`), so diff_subtree can merge the two streams
        without remembering what it saw: within a directory, a child directory's own entry sorts
        by its name and its subtree by its name + "/".
        """
        st = self.fs.lstat(top) if top else os.lstat(self.root)
        if st is None:
            return
        if top:
            yield top, st
        if not stat.S_ISDIR(st.st_mode):
            return
        stack = [iter(self._listing(top))]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                continue
            p, dst, subtree = item
            if subtree:
                stack.append(iter(self._listing(p)))
            else:
                yield p, dst

    def _listing(self, d: bytes) -> list[tuple[bytes, os.stat_result, bool]]:
        """One directory's entries (and its subdirectories' subtrees) sorted in manifest order."""
        full = os.path.join(self.root, d) if d else self.root
        keyed: list[tuple[bytes, bytes, os.stat_result, bool]] = []
        try:
            with os.scandir(full) as it:
                for de in it:
                    p = paths.join(d, de.name)
                    if self.ignore.ignored(p):
                        continue
                    try:
                        dst = de.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    keyed.append((de.name, p, dst, False))
                    if stat.S_ISDIR(dst.st_mode):
                        keyed.append((de.name + b"/", p, dst, True))
        except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
            log.debug("scan %r: %s", d, e)
        keyed.sort(key=lambda k: k[0])
        return [(p, dst, sub) for _, p, dst, sub in keyed]

    def diff_subtree(self, top: bytes) -> Iterator[bytes]:
        """Paths at or under top whose lstat differs from the manifest, new on disk, or gone from disk.

        One sorted merge of the tree walk with the manifest range (no per-path query, no set of
        seen paths). Runs at most `scan_rate` lstat calls per second (0 = unlimited), counting
        progress in `scan_checked` / `scan_differ` for the logs and status.
        """
        reader = SqliteJournal(self.j.db_path, durable=False)
        t0 = time.monotonic()
        n = 0
        try:
            disk = self.walk(top)
            manifest = reader.iter_local(top)
            d = next(disk, None)
            m = next(manifest, None)
            while d is not None or m is not None:
                if d is not None and (m is None or d[0] < m[0]):  # new on disk
                    hint, d = d[0], next(disk, None)
                elif d is None or (m is not None and m[0] < d[0]):  # gone from disk
                    hint, m = m[0], next(manifest, None)
                else:
                    same = _stat_matches(m[1], m[2], d[1])
                    hint = None if same else d[0]
                    d, m = next(disk, None), next(manifest, None)
                n += 1
                self.scan_checked += 1
                if self.scan_rate and n > self.scan_rate * (time.monotonic() - t0):
                    time.sleep(n / self.scan_rate - (time.monotonic() - t0))
                if hint is not None:
                    self.scan_differ += 1
                    yield hint
        finally:
            reader.close()

    def initial_scan_needed(self) -> bool:
        """True if the manifest is empty (first start)."""
        return self.j.empty()

    # -- processing ------------------------------------------------------------------------------
    def busy(self) -> int:
        """Changes seen but not yet committed (status `pending`)."""
        return len(self.pending) + len(self._moves) + self.scanning + self._inflight

    async def run(self, stop: asyncio.Event) -> None:
        """Process settled hints until stop is set."""
        self._loop = asyncio.get_running_loop()
        while not stop.is_set():
            self._wake.clear()
            try:
                delay = await self.process_ready()
            except Exception:  # noqa: BLE001 - never stop indexing; hints were put back
                log.exception("indexer batch failed; retrying in 1 s")
                delay = 1.0
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
            if self._wake.is_set():
                await asyncio.sleep(0.01)

    def _ready(self, now: float) -> tuple[list[bytes], float]:
        ready: list[bytes] = []
        next_at = 1.0
        held: set[tuple[int, int]] | None = None
        for p, h in self.pending.items():
            due = h.deadline
            if due <= now and not h.removed and (h.writing or not self.close_events):
                # Quiet but no close seen (truncate(2), links, mmap, or a detector that cannot see
                # closes at all): is anyone still holding it open?
                if held is None:
                    held = self._held_open()
                h.writing = self._may_be_open(p, held)
            if h.writing:
                due = max(h.deadline, h.first + self.open_timeout)
            if due <= now:
                ready.append(p)
                if len(ready) >= BATCH:
                    break
            else:
                next_at = min(next_at, due - now)
        return ready, max(next_at, 0.005)

    def _may_be_open(self, path: bytes, held: set[tuple[int, int]] | None) -> bool:
        """Could a writer still be about to close path? Only a regular file some process holds open.

        A symlink or hard link creation reports IN_CREATE without any close event; truncate(2)
        reports IN_MODIFY without one. `held` is None when /proc cannot tell (then assume open).
        """
        st = self.fs.lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return False
        return held is None or (st.st_dev, st.st_ino) in held

    def _held_open(self, fresh: bool = False) -> set[tuple[int, int]] | None:
        """(dev, ino) of every file some process has open, from /proc (cached for 0.5 s unless fresh)."""
        now = time.monotonic()
        if not fresh and now - self._held_at < 0.5:
            return self._held
        self._held_at = now
        held: set[tuple[int, int]] = set()
        try:
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            self._held, self._held_seen = None, set()
            return None
        complete = True
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except PermissionError:
                complete = False
                continue
            except OSError:
                continue
            for fd in fds:
                try:
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    held.add((st.st_dev, st.st_ino))
        self._held = held if complete else None
        self._held_seen = held
        return self._held

    def _check_root(self) -> None:
        try:
            st = os.stat(self.root)
        except OSError as e:
            raise RootVanished(f"origin root {self.root!r} is not accessible: {e}") from e
        if (st.st_dev, st.st_ino) != self._root_id:
            raise RootVanished(f"origin root {self.root!r} was replaced (different device/inode)")
        if not self.allow_empty and not self.j.empty():
            with os.scandir(self.root) as it:
                if not any(not self.ignore.ignored(de.name) for de in it):
                    raise RootVanished(f"origin root {self.root!r} is empty while the manifest has "
                                       f"{self.j.count()} entries (unmounted volume?)")

    async def process_ready(self) -> float:
        """Commit one batch of settled hints; returns seconds until the next hint is due."""
        now = time.monotonic()
        ready, delay = self._ready(now)
        if not ready and not self._moves:
            return delay
        try:
            self._check_root()
        except RootVanished as e:
            if self.paused != str(e):
                log.error("PAUSED: %s; no changes are propagated until it is back", e)
            self.paused = str(e)
            return 1.0
        if self.paused:
            log.warning("resuming: root is back")
            self.paused = None
        moves, self._moves = self._moves, []
        self._commit_moves(moves)
        if self._deferred_walks:
            walks, self._deferred_walks = self._deferred_walks, []
            self.scanning -= len(walks)
            for p in walks:
                self.rescan(p)
        walked = {p for p in ready if self.pending[p].walked}
        due = max((self.pending[p].deadline for p in ready), default=now)
        pre: dict[bytes, _Pre] = {}
        for p in ready:
            h = self.pending.pop(p)
            if h.pre is not None:
                pre[p] = h.pre
        self._inflight = len(ready)
        self._flight = ready
        walks0, walking0 = self.walks, bool(self._walks)
        t_obs = t_changes = now
        try:
            loop = asyncio.get_running_loop()
            ready.sort()
            # Manifest rows are read here, on the journal's own connection (its page cache stays
            # warm for the commit that follows); the worker thread only touches the filesystem.
            known = self.j.get_many_with_local(ready)
            # The manifest rows the batch's records will be computed against, its paths' parents
            # included, read up front (a point query each cost a statement and a WAL read lock).
            fetched: dict[bytes, Entry | None] = dict.fromkeys(ready)
            fetched.update((p, row[0]) for p, row in known.items())
            parents = {a for p in ready for a in _ancestors(p)}.difference(fetched)
            fetched.update(dict.fromkeys(parents))
            fetched.update(self.j.get_many(sorted(parents)))
            self._flight_dirs = {p for p in ready if (e := fetched.get(p)) is not None and e.kind == DIR}
            # Content a walk found (an initial index, a reconcile) is not kept for replicas: nobody
            # waits for it right now, and a large tree's would only churn the cache.
            t_obs = time.monotonic()
            obs = await loop.run_in_executor(None, self._observe, ready, known, walked, pre)
            t_changes = time.monotonic()
            # Anything touched again while we were hashing is not settled: drop the result, keep the hint.
            self.drain()
            obs = [o for o in obs if o.path not in self.pending]
            self._remember_vanished(obs, fetched)
            self._fetched = fetched
            try:
                changes = self._changes(obs, known)
            finally:
                self._fetched = {}
            t_commit = time.monotonic()
            self._commit(changes)
            if log.isEnabledFor(logging.DEBUG):
                t_end = time.monotonic()
                log.debug("batch: %d ready (the last due %.1f ms before), %d changes; read manifest "
                          "%.1f ms, observe %.1f ms, records %.1f ms, commit %.1f ms", len(ready),
                          (now - due) * 1e3, len(changes), (t_obs - now) * 1e3, (t_changes - t_obs) * 1e3,
                          (t_commit - t_changes) * 1e3, (t_end - t_commit) * 1e3)
            if walking0 or self._walks or self.walks != walks0:
                # A rescan walk ran while this batch was observed and committed. It may have listed
                # a path after the batch looked at it (removed or changed since, the event lost in
                # the overflow that asked for the walk) and compared it with the manifest from
                # before the batch's commit: then neither saw the change. What the batch recorded
                # is looked at once more, after its commit.
                for c in changes:
                    for p in (c.path, c.old_path):
                        if p is not None:
                            self.changed(p)
        except BaseException:
            for p in ready:  # nothing of this batch was committed: keep every hint
                self.changed(p)
            raise
        finally:
            self._inflight = 0
            self._flight = []
            self._flight_dirs = set()
        return 0.0 if len(ready) >= BATCH else delay

    def _remember_vanished(self, obs: list[_Obs], fetched: dict[bytes, Entry | None]) -> None:
        """Keep the paths this batch found gone for VANISHED_KEEP seconds (at most VANISHED_MAX)."""
        now = time.monotonic()
        if self._vanished and (len(self._vanished) > VANISHED_MAX
                               or now - next(iter(self._vanished.values()))[0] > VANISHED_KEEP):
            self._vanished = {p: v for p, v in self._vanished.items() if now - v[0] <= VANISHED_KEEP}
            while len(self._vanished) > VANISHED_MAX:
                del self._vanished[next(iter(self._vanished))]
        for o in obs:
            if o.st is None and not o.unstable:
                self._vanished.pop(o.path, None)
                e = fetched.get(o.path)
                self._vanished[o.path] = (now, e is not None and e.kind == DIR)

    def _commit(self, changes: list[Change]) -> None:
        touched, self._touched = self._touched, []
        if changes or touched:
            recs = self.j.commit(changes, touched=touched)
            self.records_written += len(recs)
            if recs:
                self.on_commit(len(recs))

    def _commit_moves(self, moves: list[Change]) -> None:
        """Commit detector renames in order; a rename of something the manifest does not know, or onto a
        directory the manifest holds entries under, is a rescan of its destination.

        A destination directory the manifest lacks (at that point of the batch: an earlier move
        may have made it) is recorded from the disk first. If it is not a directory on disk any
        more (moved on or removed since, or the detector named a place the directory had only
        later), it is not recorded from nothing (a default mode would travel with it): the move's
        source is looked at again and its destination rescanned, each where the later moves of
        the batch took it.
        """
        if not moves:
            return
        unknown: list[Change] = []
        misplaced: list[tuple[Change, bytes, bytes]] = []
        recs = self.j.commit(moves, unresolved=unknown, parent=self._dir_stat, misplaced=misplaced)
        for m in unknown:
            self.rescan(m.path)
        for _, src, dst in misplaced:
            self.changed(src)
            self.rescan(dst)
        if recs:
            self.records_written += len(recs)
            self.on_commit(len(recs))

    def _observe(self, ready: list[bytes], known: dict[bytes, tuple[Entry, LocalStat | None]],
                 walked: AbstractSet[bytes] = frozenset(), pre: dict[bytes, _Pre] | None = None) -> list[_Obs]:
        """lstat (and hash where needed) each ready path against its manifest row; runs in a worker thread.

        Content hashed for paths not in `walked` is kept in the hot cache for the replicas. A
        pre-hash in `pre` stands for reading the file when lstat shows the identity it was taken with.
        """
        pre = pre or {}
        out: list[_Obs] = []
        for p in ready:
            st = self.fs.lstat(p)
            o = _Obs(p, st)
            out.append(o)
            if st is None:
                continue
            k = kind_of(st)
            if k is None:
                o.st = None  # fifos, sockets, devices are not replicated
                continue
            if k == LINK:
                try:
                    o.entry = entry_from_stat(st, target=self.fs.readlink(p))
                except OSError:
                    o.st = None
                continue
            if k == DIR:
                o.entry = entry_from_stat(st)
                continue
            row = known.get(p)
            local = LocalStat(st.st_ino, st.st_ctime_ns)
            o.local = local
            if row is not None and _stat_matches(row[0], row[1], st):
                o.entry = row[0]
                continue
            age = time.time() - st.st_mtime_ns / 1e9
            if 0 <= age < self.settle:
                o.unstable = True  # modified less than a settle window ago: not quiet yet
                continue
            pr = pre.get(p)
            if pr is not None and pr.key == _key(st):
                # Hashed after its writer closed it, not written since (a write would have sent an
                # event, which makes a new hint without this pre-hash): the same content.
                o.entry = entry_from_stat(st, hash_=pr.digest)
                o.hashed = True
                o.busy = False
                self.prehash_used += 1
                if self.hot is not None and p not in walked:
                    self.hot.touch(pr.digest)  # kept since the pre-hash: now as fresh as a read
                continue
            hot = self.hot if p not in walked else None
            read = self._read_file(p, st, hot.item_max if hot is not None else -1)
            if read is None:
                o.unstable = True
                continue
            digest, data, o.busy = read
            if o.busy and time.time_ns() - st.st_ctime_ns < self.open_timeout * 1e9:
                # Held open for writing and changed lately: not complete yet (a writer that holds
                # a file open but stopped changing it is recorded after open_timeout).
                o.unstable = True
                continue
            o.entry = entry_from_stat(st, hash_=digest)
            o.hashed = True
            if data is not None and hot is not None:
                hot.put(digest, data)
        if not self.close_events:
            # No close events (the scanner): a writer may have opened the file (O_TRUNC) before
            # our lstat and stalled for longer than the settle window; a cached view of /proc
            # could predate its open. Where the lease check above could not tell, ask /proc
            # again now that the content was read.
            hashed = [o for o in out if o.hashed and not o.unstable and o.busy is None]
            if hashed:
                # Where /proc could not be read for every process, the files it could see held
                # open still count (a partial view must not turn the check off).
                self._held_open(fresh=True)
                held = self._held_seen
                now_ns = time.time_ns()
                for o in hashed:
                    assert o.st is not None
                    recent = now_ns - o.st.st_ctime_ns < self.open_timeout * 1e9
                    if recent and (o.st.st_dev, o.st.st_ino) in held:
                        o.unstable = True
                    elif recent:
                        # The writer may have written and closed while /proc was being read
                        # (before its process was reached): then the file changed since it was hashed.
                        st = self.fs.lstat(o.path)
                        if st is None or (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) != (
                                o.st.st_size, o.st.st_mtime_ns, o.st.st_ctime_ns, o.st.st_ino):
                            o.unstable = True
        return out

    def _changes(self, obs: list[_Obs], known: dict[bytes, tuple[Entry, LocalStat | None]] | None = None
                 ) -> list[Change]:
        changes: list[Change] = []
        self._touched = []
        # Files of this batch that are gone from disk, by the inode they had: a new path in the
        # same batch with that inode and content is the same file renamed (e.g. while the origin
        # was down), shipped as a move.
        gone_by_ino: dict[int, bytes] = {}
        for o in obs:
            row = (known or {}).get(o.path)
            if o.st is None and not o.unstable and row is not None and row[0].kind == FILE and row[1] is not None:
                gone_by_ino[row[1].ino] = o.path
        # Present paths first (so rename detection by inode sees the old path still in the manifest),
        # then deletions.
        known_dirs: set[bytes] = set()
        for o in obs:
            if o.unstable:
                self.changed(o.path, writing=bool(o.busy))
                continue
            if o.st is None or o.entry is None:
                continue
            if not self._ensure_parents(o.path, changes, known_dirs):
                self.changed(o.path)  # its parent moved or went away since: look again (a move carries it)
                continue
            cur = self.j_get(o.path, changes)
            e = o.entry
            if cur is not None and cur == e:
                row = (known or {}).get(o.path)
                if e.kind == FILE and o.local is not None and (row is None or row[1] != o.local):
                    self._touched.append((o.path, o.local))
                continue
            if cur is None and o.st is not None:
                src = self._renamed_from(o, gone_by_ino)
                if src is not None:
                    ch = Change(MOVE, o.path, e, src, o.local)
                    changes.append(ch)
                    self._apply_shadow(ch)
                    continue
            ch = Change(PUT, o.path, e, local=o.local)
            changes.append(ch)
            self._apply_shadow(ch)
        for o in obs:
            if o.st is None and not o.unstable and self.j_get(o.path, changes) is not None:
                ch = Change(DELETE, o.path)
                changes.append(ch)
                self._apply_shadow(ch)
        self._shadow.clear()
        return changes

    def _apply_shadow(self, ch: Change) -> None:
        """Overlay a computed-but-uncommitted change on the manifest view used by this batch."""
        if ch.op == DELETE:
            self._shadow[ch.path] = None
        elif ch.op == MOVE:
            assert ch.old_path is not None
            self._shadow[ch.old_path] = None
            self._shadow[ch.path] = ch.entry
        else:
            self._shadow[ch.path] = ch.entry

    def j_get(self, path: bytes, changes: list[Change]) -> Entry | None:
        """Manifest entry as it will be after the changes computed so far in this batch."""
        if path in self._shadow:
            return self._shadow[path]
        for anc in _ancestors(path):
            if anc in self._shadow and self._shadow[anc] is None:
                return None
        if path in self._fetched:
            return self._fetched[path]
        return self.j.get(path)

    def _ensure_parents(self, path: bytes, changes: list[Change], known: set[bytes]) -> bool:
        """Record any ancestor directory of path the manifest lacks, before path itself.

        Replicas must never hold a directory the origin's manifest does not know (it could never
        be deleted). An ancestor the manifest lacks that is no longer a directory on disk (moved
        or removed since path was looked at) is not recorded from nothing: a default mode would
        travel with a later move of it. Returns False then, and path is not recorded either.
        """
        for anc in reversed(_ancestors(path)):
            if anc in known:
                continue
            cur = self.j_get(anc, changes)
            if cur is None or cur.kind != DIR:
                e = self._dir_stat(anc)
                if e is None:
                    return False
                ch = Change(PUT, anc, e)
                changes.append(ch)
                self._apply_shadow(ch)
            known.add(anc)
        return True

    def _dir_stat(self, path: bytes) -> Entry | None:
        """The entry of the directory at path as it is on disk (None if it is not a directory now)."""
        st = self.fs.lstat(path)
        return entry_from_stat(st) if st is not None and stat.S_ISDIR(st.st_mode) else None

    def _renamed_from(self, o: _Obs, gone_by_ino: dict[int, bytes]) -> bytes | None:
        """A path gone from disk in this batch that this new path is the same inode (and content) as."""
        assert o.st is not None and o.entry is not None
        if o.entry.kind != FILE:
            return None
        cand = gone_by_ino.get(o.st.st_ino)
        if cand is None or cand == o.path or cand in self._shadow:
            return None
        m = self.j.get(cand)
        if m is None or m.kind != FILE or m.hash != o.entry.hash:
            return None
        return cand


def _ancestors(path: bytes) -> list[bytes]:
    """Proper ancestors of a relative path, deepest first."""
    out = []
    p = paths.parent(path)
    while p:
        out.append(p)
        p = paths.parent(p)
    return out


def _stat_matches(e: Entry, local: LocalStat | None, st: os.stat_result) -> bool:
    """True if an lstat result shows no change from a manifest entry (no hash needed)."""
    k = kind_of(st)
    if k != e.kind or stat.S_IMODE(st.st_mode) != e.mode and k != LINK:
        return False
    if k == FILE:
        return (local is not None and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns
                and st.st_ino == local.ino and st.st_ctime_ns == local.ctime_ns)
    return k == DIR
