"""Recursive inotify watcher: one watch per directory, added on mkdir/move-in, dropped on move-out."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections.abc import Callable

from inotify_simple import INotify
from inotify_simple import flags as F

from fleetsync import paths
from fleetsync.detect import HintSink

log = logging.getLogger("fleetsync.detect.inotify")

MASK = (F.CREATE | F.MODIFY | F.CLOSE_WRITE | F.ATTRIB | F.DELETE | F.MOVED_FROM | F.MOVED_TO
        | F.DELETE_SELF | F.MOVE_SELF | F.ONLYDIR | F.DONT_FOLLOW | F.EXCL_UNLINK)
PAIR_WAIT = 0.02
#: A directory whose watch is younger than this is rescanned after it is moved.
YOUNG = 5.0


class InotifyDetector:
    """Watches a root recursively with inotify and feeds a HintSink."""

    name = "inotify"

    def __init__(self, root: str | bytes) -> None:
        self.root = os.fsencode(root)
        self.ino = INotify(nonblocking=True)
        self.wd_path: dict[int, bytes] = {}
        self.path_wd: dict[bytes, int] = {}
        self.unwatched: set[bytes] = set()
        #: Unpaired IN_MOVED_FROM by cookie: (path, is_dir, the moved directory's watches then).
        self._moves: dict[int, tuple[bytes, bool, frozenset[int]]] = {}
        self._lost: set[bytes] = set()
        self._prewatched = False
        self._added_at: dict[int, float] = {}
        self._sink: HintSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self.overflows = 0
        #: Called with a relative directory that could not be watched (watch limit reached).
        self.on_unwatched: Callable[[bytes], None] = lambda rel: None

    # -- watches ---------------------------------------------------------------------------------
    def watch_tree(self, rel: bytes) -> int:
        """Add watches on rel and every directory below it; returns how many were added."""
        n = 0
        stack = [rel]
        while stack:
            d = stack.pop()
            if not self._add(d):
                continue
            n += 1
            full = os.path.join(self.root, d) if d else self.root
            try:
                with os.scandir(full) as it:
                    for de in it:
                        if de.is_dir(follow_symlinks=False):
                            stack.append(paths.join(d, de.name))
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
        return n

    def _add(self, rel: bytes) -> bool:
        full = os.path.join(self.root, rel) if rel else self.root
        try:
            wd = self.ino.add_watch(full, MASK)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                log.warning("inotify watch limit reached at %r: raise fs.inotify.max_user_watches "
                            "(sysctl); this subtree is covered by rescans meanwhile", rel)
                self.unwatched.add(rel)
                self.on_unwatched(rel)
                return False
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                # Gone by the time we got to it: deleted, or an ancestor was renamed and the
                # event's path is stale. If a rename of an ancestor follows, watch it there.
                if len(self._lost) >= 4096:
                    self._lost.clear()  # bounded: these are only stale names of deleted dirs
                self._lost.add(rel)
                return False
            if e.errno in (errno.EACCES, errno.ELOOP):
                return False
            raise
        old = self.wd_path.get(wd)
        if old is not None and old != rel:
            self.path_wd.pop(old, None)
        self.wd_path[wd] = rel
        self.path_wd[rel] = wd
        self._added_at[wd] = time.monotonic()
        return True

    def _drop_tree(self, rel: bytes) -> None:
        if self._lost:
            self._lost = {q for q in self._lost if not paths.is_under(q, rel)}
        self.unwatched.difference_update({u for u in self.unwatched if paths.is_under(u, rel)})
        for p in [p for p in self.path_wd if paths.is_under(p, rel)]:
            wd = self.path_wd.pop(p)
            self.wd_path.pop(wd, None)
            try:
                self.ino.rm_watch(wd)
            except OSError:
                pass

    def _rebase_tree(self, old: bytes, new: bytes) -> None:
        moved_scopes = {u for u in self.unwatched if paths.is_under(u, old)}
        if moved_scopes:
            self.unwatched.difference_update(moved_scopes)
            self.unwatched.update(paths.rebase(u, old, new) for u in moved_scopes)
        moved = [(p, wd) for p, wd in self.path_wd.items() if paths.is_under(p, old)]
        for p, _ in moved:
            del self.path_wd[p]
        for p, wd in moved:
            np = paths.rebase(p, old, new)
            self.path_wd[np] = wd
            self.wd_path[wd] = np

    # -- lifecycle -------------------------------------------------------------------------------
    def prewatch(self) -> None:
        """Add watches for the whole tree before start() (may run in a worker thread; events queue up)."""
        n = self.watch_tree(b"")
        self._prewatched = True
        log.info("inotify: watching %d directories", n)

    def start(self, sink: HintSink) -> None:
        """Add watches for the whole tree (unless prewatch() did) and read events on the running loop."""
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        if not self._prewatched:
            self.prewatch()
        self._loop.add_reader(self.ino.fileno(), self.drain)

    def close(self) -> None:
        """Stop watching."""
        if self._loop is not None:
            self._loop.remove_reader(self.ino.fileno())
        self.ino.close()

    # -- events ----------------------------------------------------------------------------------
    def drain(self) -> None:
        """Read and dispatch all queued events."""
        while True:
            try:
                events = self.ino.read(timeout=0)
            except OSError as e:
                log.error("inotify read failed: %s; rescanning", e)
                events = []
                self._sink.rescan(b"")  # type: ignore[union-attr]
            if not events:
                break
            for ev in events:
                self._dispatch(ev)
        if self._moves and self._loop is not None and self._flush_handle is None:
            self._flush_handle = self._loop.call_later(PAIR_WAIT, self._flush_moves)

    def _flush_moves(self) -> None:
        self._flush_handle = None
        self.drain()
        moves, self._moves = self._moves, {}
        for old, is_dir, wds in moves.values():
            if is_dir:
                self._drop_moved_out(old, wds)
            self._sink.removed(old)  # type: ignore[union-attr]

    def _subtree_wds(self, rel: bytes) -> frozenset[int]:
        return frozenset(wd for p, wd in self.path_wd.items() if paths.is_under(p, rel))

    def _drop_moved_out(self, old: bytes, wds: frozenset[int]) -> None:
        """Drop the watches of a directory that moved away from `old` (out of the tree, or to a
        place watched too late for its IN_MOVED_TO): only `wds`, its watches when it left, and
        only those still keyed under `old`. By now the name may hold another directory (moved in,
        or made again) whose watches are keyed there, and the one that left may have been
        re-keyed where it went (listing its new parent returned its existing watches)."""
        if self._lost:
            self._lost = {q for q in self._lost if not paths.is_under(q, old)}
        self.unwatched.difference_update({u for u in self.unwatched if paths.is_under(u, old)})
        for wd in wds:
            q = self.wd_path.get(wd)
            if q is None or not paths.is_under(q, old):
                continue
            del self.wd_path[wd]
            if self.path_wd.get(q) == wd:
                del self.path_wd[q]
            try:
                self.ino.rm_watch(wd)
            except OSError:
                pass

    def _dir_moved(self, old: bytes, new: bytes) -> bool:
        """Re-key watch state for a directory renamed inside the root; True if it must be rescanned.

        Watches already keyed under `new` are kept: a rename can only replace an empty directory
        (whose watch ends with its IN_IGNORED), and a directory that appeared above `new` may have
        been listed after this rename, so that adding its watches returned, and re-keyed, the
        moved subtree's own watches (dropping them here left it unwatched).
        """
        self._rebase_tree(old, new)
        # Unpaired moves out of the moved directory now live under its new name.
        for ck, (q, qdir, wds) in list(self._moves.items()):
            if paths.is_under(q, old):
                self._moves[ck] = (paths.rebase(q, old, new), qdir, wds)
        # Directories created inside it that we failed to watch under the old name.
        lost = {q for q in self._lost if paths.is_under(q, old)}
        self._lost -= lost
        for q in lost:
            self.watch_tree(paths.rebase(q, old, new))
        # A directory watched only moments ago may have gained entries before its watch existed,
        # and the scan that would have found them looked under the old name.
        now = time.monotonic()
        young = any(now - self._added_at.get(wd, 0.0) < YOUNG
                    for q, wd in self.path_wd.items() if paths.is_under(q, new))
        return bool(lost) or young

    def _appeared(self, p: bytes, is_dir: bool, writing: bool) -> None:
        """A new name: watch and scan a directory; hint a file (still being written after a create)."""
        assert self._sink is not None
        if is_dir:
            self.watch_tree(p)
            self._sink.rescan(p)
        else:
            self._sink.changed(p, writing=writing, closed=not writing)

    def _dispatch(self, ev) -> None:  # noqa: ANN001 - inotify_simple.Event
        sink = self._sink
        assert sink is not None
        mask = ev.mask
        if mask & F.Q_OVERFLOW:
            self.overflows += 1
            self._lost.clear()
            log.warning("inotify queue overflow: rescanning the whole root")
            sink.rescan(b"")
            return
        d = self.wd_path.get(ev.wd)
        if mask & F.IGNORED:
            if d is not None:
                self.wd_path.pop(ev.wd, None)
                if self.path_wd.get(d) == ev.wd:
                    del self.path_wd[d]
            return
        if d is None:
            return
        if mask & (F.DELETE_SELF | F.MOVE_SELF | F.UNMOUNT):
            if d == b"":
                sink.root_lost("root directory was deleted, moved or unmounted")
            return
        name = os.fsencode(ev.name) if isinstance(ev.name, str) else ev.name
        if not name:
            if mask & F.ATTRIB:
                sink.changed(d)
            return
        p = paths.join(d, name)
        is_dir = bool(mask & F.ISDIR)
        if mask & F.MOVED_FROM:
            self._moves[ev.cookie] = (p, is_dir, self._subtree_wds(p) if is_dir else frozenset())
            return
        if mask & F.MOVED_TO:
            src = self._moves.pop(ev.cookie, None)
            if src is not None:
                rescan = is_dir and self._dir_moved(src[0], p)
                sink.moved(src[0], p, is_dir)
                if rescan:
                    sink.rescan(p)
            else:
                self._appeared(p, is_dir, writing=False)  # moved in from outside the root
            return
        if mask & F.CREATE:
            self._appeared(p, is_dir, writing=True)
            return
        if mask & F.DELETE:
            if is_dir:
                self._drop_tree(p)
            sink.removed(p)
            return
        if mask & F.CLOSE_WRITE:
            sink.changed(p, closed=True)
        elif mask & F.MODIFY:
            sink.changed(p, writing=True)
        elif mask & F.ATTRIB:
            sink.changed(p)


def is_dir_at(root: bytes, rel: bytes) -> bool:
    """True if rel is a directory (not a symlink) under root."""
    try:
        return stat.S_ISDIR(os.lstat(os.path.join(root, rel)).st_mode)
    except OSError:
        return False
