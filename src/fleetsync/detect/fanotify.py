"""fanotify detector: one filesystem-wide mark (FAN_REPORT_DFID_NAME), filtered to the root in user space.

No per-directory watches: a single `FAN_MARK_FILESYSTEM` mark reports every change on the root's
filesystem as (directory file handle, name). The handle is turned back into a path with
`open_by_handle_at` + readlink of /proc/self/fd/N (cached, each hit re-validated with one lstat),
and events outside the root are dropped. Needs root (CAP_SYS_ADMIN, CAP_DAC_READ_SEARCH) and
Linux >= 5.9; uses `FAN_RENAME` (>= 5.17) to report a rename as one event and
`FAN_REPORT_TARGET_FID` (>= 5.17) to locate directories that were deleted before their events
were read. Everything goes through ctypes on glibc; there are no per-directory limits to hit.

Resolving a handle is not always possible at once. A directory deleted before its events are
read is located from the delete events (its parent's handle + name; exact with TARGET_FID), and an
event whose directory cannot be located yet waits up to LIMBO_WAIT for the delete that explains
it (usually one outside the root: dropped). Decoding a *live* directory whose dentry was evicted
can fail with ESTALE/ENOMEM while it is being renamed (measured on ext4), so those are retried.
Only then does an event fall back to a rescan of where its directory was last seen, or of the
whole root: a hint may be redundant, never missing.

Handles resolve to *current* paths, which already include the renames queued after an event.
The indexer reads hints in stream order and carries pending hints along with every move, so each
hint must name the path as it was at its own event, or a later rename is applied to it twice (lost
whenever a name is reused: X/f written, then X->T, Y->X, T->Y). Each batch resolves every handle
once, then undoes the batch's later directory renames (known exactly from FAN_RENAME, walked from
the last one back) to get the path at each event; scans, which walk the disk at once, go to the
current path. A rename can be visible before its event is queued, so the hints of the previous
batch touched by a directory move are sent again after it (a redundant hint costs one lstat). A
directory that appears is both rescanned and hinted (the rescan walks at once and can miss it if a
parent moves right after; the hint is carried along by the move). Where a path at an event cannot
be rebuilt exactly (a parent deleted since, an unlocatable later rename, a limbo retry) a rename is
sent as a removal plus an arrival.

The detector keeps the root directory open (it is the mount fd for `open_by_handle_at`), so the
kernel defers the root's own DELETE_SELF; losing the root is recognised from the DELETE/RENAME
record in its parent (or a deleted ancestor), which compares the full path with the root's.

Known limits (shared with inotify unless noted): a change made through a hard link that lives
outside the root is reported under the outside path; filesystems mounted below the root are not
covered by the mark (fanotify only; logged at start-up and listed in `unwatched`).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import stat
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleetsync.detect import HintSink

log = logging.getLogger("fleetsync.detect.fanotify")

# -- constants from <linux/fanotify.h> and <fcntl.h> ---------------------------------------------
FAN_MODIFY = 0x00000002
FAN_ATTRIB = 0x00000004
FAN_CLOSE_WRITE = 0x00000008
FAN_MOVED_FROM = 0x00000040
FAN_MOVED_TO = 0x00000080
FAN_CREATE = 0x00000100
FAN_DELETE = 0x00000200
FAN_DELETE_SELF = 0x00000400
FAN_MOVE_SELF = 0x00000800
FAN_Q_OVERFLOW = 0x00004000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000

FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_REPORT_FID = 0x00000200
FAN_REPORT_DIR_FID = 0x00000400
FAN_REPORT_NAME = 0x00000800
FAN_REPORT_TARGET_FID = 0x00001000
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_REPORT_DFID_NAME_TARGET = FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_REPORT_TARGET_FID

FAN_MARK_ADD = 0x00000001
FAN_MARK_IGNORED_SURV_MODIFY = 0x00000040
FAN_MARK_FLUSH = 0x00000080
FAN_MARK_FILESYSTEM = 0x00000100
FAN_MARK_IGNORE = 0x00000400

FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3
FAN_EVENT_INFO_TYPE_OLD_DFID_NAME = 10
FAN_EVENT_INFO_TYPE_NEW_DFID_NAME = 12

FANOTIFY_METADATA_VERSION = 3
FAN_NOFD = -1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128

#: Events every mark asks for; renames are added as FAN_RENAME or FAN_MOVED_FROM|FAN_MOVED_TO.
BASE_MASK = (FAN_CREATE | FAN_DELETE | FAN_MODIFY | FAN_CLOSE_WRITE | FAN_ATTRIB | FAN_DELETE_SELF
             | FAN_MOVE_SELF | FAN_ONDIR)
MIN_KERNEL = (5, 9)
#: What the kernel drops for a directory known to lie outside the root (FAN_MARK_IGNORE, Linux >= 6.0):
#: events on the files in it. Renames and moves are never ignored: one may bring the directory
#: into the root, and then every ignore mark is flushed before its content is rescanned. Events
#: on subdirectories (no FAN_ONDIR) are not ignored either: the deletion of a subdirectory is what
#: locates the events read from inside it once it is gone (otherwise those events could not be
#: placed, and each became a rescan of the whole root: a busy neighbour's `rm -r` cost a walk).
IGNORE_MASK = FAN_CREATE | FAN_DELETE | FAN_MODIFY | FAN_CLOSE_WRITE | FAN_ATTRIB | FAN_EVENT_ON_CHILD
#: Ignore marks at most (each pins a directory inode in memory until the marks are flushed).
IGNORE_MAX = 4096

_META = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata (24 bytes)
_INFO_HDR = struct.Struct("=BBH")  # struct fanotify_event_info_header
_FH_HDR = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type
_FSID_LEN = 8
READ_SIZE = 256 * 1024
#: While events keep coming (the previous read was less than this ago), the next read waits
#: DRAIN_DELAY so that events arriving meanwhile share one wake-up; after a quiet spell it is
#: immediate. A busy neighbour on the filesystem then costs ~1/DRAIN_DELAY wake-ups per second
#: instead of one per event (their renames cannot be dropped by an ignore mark).
BUSY_WINDOW = 0.05
DRAIN_DELAY = 0.02
#: Upper bound of events read by one drain() (the default kernel queue holds 16384).
MAX_EVENTS_PER_DRAIN = 65536
CACHE_MAX = 16384
#: Directories known to lie outside the root (and not to hold it): their events are dropped at once.
OUTSIDE_MAX = 16384
#: What a directory known to lie outside the root resolves to (no path: never inside any root).
OUTSIDE = b"\0outside"
#: open_by_handle_at attempts for a directory that may still exist (see _Resolver.resolve).
OPEN_ATTEMPTS = 4
#: readlink + lstat rounds before a directory that keeps moving is given up on.
VERIFY_ATTEMPTS = 4
#: How long an event whose directory cannot be located waits for the delete event that explains it.
LIMBO_WAIT = 0.2
LIMBO_MAX = 10000
#: A directory that arrived with content is rescanned again if a move carries it within this time.
YOUNG = 5.0
YOUNG_MAX = 4096


class _Deferred(Exception):
    """The event's directory cannot be located yet: retry it after the next read."""
GONE_MAX = 65536
#: Hints of one batch (more after a read that hit MAX_EVENTS_PER_DRAIN) kept to be sent again
#: after a directory move read in the next batch; past this, a move rescans both its sides.
RECENT_MAX = 65536


# -- libc ----------------------------------------------------------------------------------------
_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    """glibc with the fanotify and file-handle functions typed (loaded on first use)."""
    global _LIBC
    if _LIBC is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        lib.fanotify_init.restype = ctypes.c_int
        lib.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                      ctypes.c_char_p]
        lib.fanotify_mark.restype = ctypes.c_int
        lib.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                          ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.name_to_handle_at.restype = ctypes.c_int
        lib.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.open_by_handle_at.restype = ctypes.c_int
        _LIBC = lib
    return _LIBC


def _oserror(what: str) -> OSError:
    """OSError for the last failed libc call, with what was being attempted."""
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def fanotify_init(flags: int) -> int:
    """fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | flags, O_RDONLY | O_LARGEFILE)."""
    fd = _libc().fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | flags,
                               os.O_RDONLY | os.O_LARGEFILE)
    if fd < 0:
        raise _oserror(f"fanotify_init(flags={flags:#x})")
    return fd


def fanotify_mark_filesystem(fd: int, mask: int, path: bytes) -> None:
    """Add a FAN_MARK_FILESYSTEM mark with mask on the filesystem holding path."""
    if _libc().fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, AT_FDCWD, path) != 0:
        raise _oserror(f"fanotify_mark(FAN_MARK_FILESYSTEM, mask={mask:#x}) on {path!r}")


def name_to_handle(fd: int) -> bytes:
    """The file handle (struct file_handle bytes, as fanotify reports them) of the open file fd."""
    buf = ctypes.create_string_buffer(_FH_HDR.size + MAX_HANDLE_SZ)
    _FH_HDR.pack_into(buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    if _libc().name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH) != 0:
        raise _oserror(f"name_to_handle_at(fd {fd})")
    nbytes, _ = _FH_HDR.unpack_from(buf, 0)
    return buf.raw[:_FH_HDR.size + nbytes]


def open_by_handle(mount_fd: int, handle: bytes, flags: int = os.O_PATH) -> int:
    """open_by_handle_at(mount_fd, handle, flags | O_CLOEXEC); raises OSError (ESTALE when gone)."""
    fd = _libc().open_by_handle_at(mount_fd, handle, flags | os.O_CLOEXEC)
    if fd < 0:
        raise _oserror("open_by_handle_at")
    return fd


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running kernel (or of a `uname -r` string)."""
    m = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def fd_path(fd: int) -> bytes:
    """The path of an open fd as the kernel reports it (readlink /proc/self/fd/N)."""
    return os.readlink(b"/proc/self/fd/%d" % fd)


# -- availability --------------------------------------------------------------------------------
def fanotify_precheck(platform: str, euid: int, kernel: tuple[int, int]) -> str | None:
    """Why a system with these properties cannot use the fanotify backend (None: worth trying)."""
    if not platform.startswith("linux"):
        return f"not Linux ({platform})"
    if euid != 0:
        return f"not root (euid {euid}); fanotify filesystem marks need CAP_SYS_ADMIN"
    if kernel < MIN_KERNEL:
        return f"kernel {kernel[0]}.{kernel[1]} < {MIN_KERNEL[0]}.{MIN_KERNEL[1]}"
    return None


def fanotify_available(root: str | bytes) -> tuple[bool, str]:
    """(True, detail) if the fanotify backend can watch root, else (False, human-readable reason)."""
    kv = kernel_version() if sys.platform.startswith("linux") else (0, 0)
    why = fanotify_precheck(sys.platform, os.geteuid(), kv)
    if why is not None:
        return False, why
    broot = os.fsencode(root)
    try:
        _libc()
    except (OSError, AttributeError) as e:
        return False, f"glibc lacks fanotify/file-handle functions: {e}"
    try:
        rfd = os.open(broot, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open root {broot!r}: {e.strerror}"
    fan = -1
    try:
        try:
            fan = fanotify_init(FAN_REPORT_DFID_NAME)
        except OSError as e:
            return False, f"fanotify_init(FAN_REPORT_DFID_NAME) failed: {e.strerror}"
        try:
            handle = name_to_handle(rfd)
        except OSError as e:
            return False, f"filesystem does not support file handles: {errno.errorcode.get(e.errno, e.errno)} " \
                          f"({os.strerror(e.errno or 0)})"
        try:
            fanotify_mark_filesystem(fan, FAN_CREATE | FAN_DELETE | FAN_ONDIR, fd_path(rfd))
        except OSError as e:
            return False, f"fanotify_mark(FAN_MARK_FILESYSTEM) on {broot!r} failed: " \
                          f"{errno.errorcode.get(e.errno, e.errno)} ({os.strerror(e.errno or 0)})"
        try:
            os.close(open_by_handle(rfd, handle))
        except OSError as e:
            return False, f"open_by_handle_at failed on {broot!r}: {e.strerror}"
    finally:
        os.close(rfd)
        if fan >= 0:
            os.close(fan)
    return True, f"fanotify on Linux {kv[0]}.{kv[1]}"


# -- event parsing -------------------------------------------------------------------------------
@dataclass(slots=True)
class FanEvent:
    """One parsed fanotify event: mask plus the file-handle records it carried."""

    mask: int
    pid: int
    dfid: bytes | None = None  # directory handle (DFID_NAME / DFID)
    name: bytes | None = None  # entry name in dfid (b"." for events on the directory itself)
    fid: bytes | None = None  # the object's own handle (FID; the child for dirent events)
    old: tuple[bytes, bytes] | None = None  # FAN_RENAME: (old dir handle, old name)
    new: tuple[bytes, bytes] | None = None  # FAN_RENAME: (new dir handle, new name)


def parse_events(buf: bytes) -> list[FanEvent]:
    """Parse the fanotify_event_metadata records (and their fid info records) read from the fd."""
    out: list[FanEvent] = []
    off, end = 0, len(buf)
    while off < end:
        if end - off < _META.size:
            raise ValueError(f"truncated fanotify event at offset {off} ({end - off} bytes left)")
        ev_len, vers, _, meta_len, mask, fd, pid = _META.unpack_from(buf, off)
        if vers != FANOTIFY_METADATA_VERSION:
            raise ValueError(f"fanotify metadata version {vers}, expected {FANOTIFY_METADATA_VERSION}")
        if ev_len < meta_len or meta_len < _META.size or off + ev_len > end:
            raise ValueError(f"bad fanotify event lengths at offset {off}: event_len={ev_len} "
                             f"metadata_len={meta_len} buffer={end}")
        if fd >= 0:  # not expected in FID mode; never leak it
            os.close(fd)
        if not mask & (FAN_DELETE_SELF | FAN_MOVE_SELF | FAN_Q_OVERFLOW) and ev_len > meta_len \
                and buf[off + meta_len] == FAN_EVENT_INFO_TYPE_FID:
            # No directory record: an inode event such as the link-count ATTRIB of a file renamed
            # over anywhere on the filesystem. Nothing to do with it (the directory events carry
            # every change by name), so skip it without building it.
            off += ev_len
            continue
        ev = FanEvent(mask, pid)
        pos, ev_end = off + meta_len, off + ev_len
        while pos + _INFO_HDR.size <= ev_end:
            itype, _, ilen = _INFO_HDR.unpack_from(buf, pos)
            if ilen < _INFO_HDR.size or pos + ilen > ev_end:
                raise ValueError(f"bad fanotify info record length {ilen} (type {itype}) at offset {pos}")
            if itype in (FAN_EVENT_INFO_TYPE_FID, FAN_EVENT_INFO_TYPE_DFID_NAME, FAN_EVENT_INFO_TYPE_DFID,
                         FAN_EVENT_INFO_TYPE_OLD_DFID_NAME, FAN_EVENT_INFO_TYPE_NEW_DFID_NAME):
                h0 = pos + _INFO_HDR.size + _FSID_LEN
                nbytes, _ = _FH_HDR.unpack_from(buf, h0)
                h1 = h0 + _FH_HDR.size + nbytes
                if h1 > pos + ilen:
                    raise ValueError(f"file handle of {nbytes} bytes overruns info record of {ilen} bytes")
                handle = bytes(buf[h0:h1])
                nm = bytes(buf[h1:pos + ilen]).split(b"\0", 1)[0]
                if itype == FAN_EVENT_INFO_TYPE_FID:
                    ev.fid = handle
                elif itype == FAN_EVENT_INFO_TYPE_DFID_NAME:
                    ev.dfid, ev.name = handle, nm
                elif itype == FAN_EVENT_INFO_TYPE_DFID:
                    ev.dfid, ev.name = handle, None
                elif itype == FAN_EVENT_INFO_TYPE_OLD_DFID_NAME:
                    ev.old = (handle, nm)
                else:
                    ev.new = (handle, nm)
            pos += ilen
        out.append(ev)
        off += ev_len
    return out


def paths_join(base: bytes, name: bytes) -> bytes:
    """Join a root-relative directory (b"" = root) and a name."""
    return name if not base else base + b"/" + name


def _join_abs(d: bytes, name: bytes) -> bytes:
    return b"/" + name if d == b"/" else d + b"/" + name


# Where a directory handle was found: on disk now, rebuilt from delete events, or only last seen there.
LIVE, GONE, STALE = "live", "gone", "stale"


class _Resolver:
    """Directory file handle -> absolute path, cached; every cache hit is re-checked with lstat.

    `inside(path)` says whether a path lies in the root: only those paths are verified (lstat must
    find the same directory there). A live directory that is not reachable through the root's
    mount (a bind mount of a subdirectory) reads back as an escaped path such as "/": it cannot
    be inside the root, so it is reported as-is (outside) and never cached.
    """

    def __init__(self, mount_fd: int, inside: Callable[[bytes], bool],
                 holds_root: Callable[[bytes], bool] = lambda p: True,
                 on_outside: Callable[[bytes], None] = lambda h: None,
                 on_forget: Callable[[], None] = lambda: None) -> None:
        self.mount_fd = mount_fd
        self.inside = inside
        self.holds_root = holds_root
        #: Called with the handle of each directory newly known to lie outside, and when they are forgotten.
        self.on_outside = on_outside
        self.on_forget = on_forget
        self.cache: dict[bytes, tuple[bytes, int, int]] = {}
        #: Handles of live directories outside the root that are not the root's ancestors. Only a
        #: directory rename can bring one (or a directory below it) into the root, so every batch
        #: with a directory rename that may end inside the root clears it first (`forget_outside`).
        self.outside: dict[bytes, None] = {}
        self.outside_hits = 0
        self.failures = 0
        self.retries = 0
        self.reasons: collections.Counter[str] = collections.Counter()
        self._warned = False

    def resolve(self, handle: bytes, *, known_gone: bool = False) -> bytes | None:
        """Current absolute path of the directory, or None if it no longer exists (or cannot be opened).

        ESTALE/ENOMEM do not prove the directory is gone: decoding a handle whose dentry was
        evicted reconnects it through its parents and can lose a race with a concurrent rename
        (measured on ext4). Such failures are retried unless the directory is known deleted.
        A directory known to lie outside the root resolves to OUTSIDE without a system call.
        """
        if handle in self.outside:
            self.outside_hits += 1
            return OUTSIDE
        hit = self.cache.get(handle)
        if hit is not None:
            try:
                st = os.lstat(hit[0])
                if (st.st_dev, st.st_ino) == (hit[1], hit[2]) and stat.S_ISDIR(st.st_mode):
                    return hit[0]
            except OSError:
                pass
        attempts = 1 if known_gone else OPEN_ATTEMPTS
        verify_left = VERIFY_ATTEMPTS  # the directory may move between readlink and lstat
        while True:
            try:
                fd = open_by_handle(self.mount_fd, handle, os.O_PATH)
            except OSError as e:
                attempts -= 1
                if e.errno in (errno.ESTALE, errno.ENOENT, errno.ENOMEM):
                    if attempts > 0:
                        self.retries += 1
                        continue
                    return self._fail(errno.errorcode.get(e.errno, "?"))
                if not self._warned:
                    self._warned = True
                    log.error("fanotify: cannot resolve directory handles (%s); falling back to rescans", e)
                return self._fail(errno.errorcode.get(e.errno or 0, "?"))
            try:
                st = os.fstat(fd)
                if st.st_nlink == 0 or not stat.S_ISDIR(st.st_mode):
                    return self._fail("deleted")
                path = fd_path(fd)
            except OSError as e:
                return self._fail(f"fstat/readlink: {errno.errorcode.get(e.errno or 0, '?')}")
            finally:
                os.close(fd)
            if not self.inside(path):
                if not self.holds_root(path):
                    if len(self.outside) >= OUTSIDE_MAX:
                        del self.outside[next(iter(self.outside))]  # oldest first
                    self.outside[handle] = None
                    self.on_outside(handle)
                return path
            try:
                st2 = os.lstat(path)
                same = (st2.st_dev, st2.st_ino) == (st.st_dev, st.st_ino)
            except OSError:
                same = False
            if same:
                if len(self.cache) >= CACHE_MAX:
                    self.cache.clear()
                self.cache[handle] = (path, st.st_dev, st.st_ino)
                return path
            verify_left -= 1
            if verify_left <= 0:
                return self._fail("moving")
            self.retries += 1

    def _fail(self, reason: str) -> None:
        self.failures += 1
        self.reasons[reason] += 1
        return None

    def forget_outside(self, events: list[FanEvent]) -> None:
        """Clear the outside-the-root cache if a directory may have moved into the root in events.

        A directory renamed under a parent that is not known to be outside (and does not resolve
        to a path outside now) may have entered the root, and with it every directory below it:
        their handles must be resolved again.
        """
        if not self.outside:
            return
        for ev in events:
            if not ev.mask & FAN_ONDIR:
                continue
            if ev.mask & FAN_RENAME and ev.new is not None:
                parent = ev.new[0]
            elif ev.mask & FAN_MOVED_TO and ev.dfid is not None:
                parent = ev.dfid
            else:
                continue
            if parent in self.outside:
                continue
            # Where the new parent is now: still outside (a busy neighbour renaming its own
            # directories) keeps the cache; inside the root, or not locatable, clears it.
            where = self.resolve(parent)
            if where is not None and (where == OUTSIDE or not self.inside(where) and not self.holds_root(where)):
                continue
            self.outside.clear()
            self.on_forget()
            return

    def last_known(self, handle: bytes) -> bytes | None:
        """Where the directory was when it was last resolved (may be stale)."""
        hit = self.cache.get(handle)
        return hit[0] if hit is not None else None


class FanotifyDetector:
    """Watches a root through one fanotify filesystem mark and feeds a HintSink."""

    name = "fanotify"

    def __init__(self, root: str | bytes, *, use_rename: bool = True, use_target_fid: bool = True) -> None:
        self.root = os.fsencode(os.path.abspath(os.fsdecode(root)))
        self._fd = -1
        self._root_fd = -1
        self._sink: HintSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._draining = False
        self._gone: dict[bytes, tuple[bytes, bytes]] = {}
        self._fallbacks: set[bytes] = set()
        self._last_move: tuple[bytes, bytes] | None = None
        self._limbo: list[tuple[FanEvent, float]] = []
        self._pos = -1  # index of the event being dispatched in the current batch (-1: from limbo)
        #: Directory renames of the current batch, last first: (index, old path before it, new path
        #: after it, exchange); (index, None, None, False) when a side could not be located.
        self._undo: list[tuple[int, bytes | None, bytes | None, bool]] = []
        self._undo_idx: list[int] = []  # -index of each _undo entry (ascending, for bisect)
        self._memo: dict[bytes, tuple[bytes, str]] = {}  # handle -> (path, LIVE/GONE) for this batch
        self._at_memo: dict[tuple[bytes, int], bytes] = {}
        self._gone_at: dict[bytes, int] = {}  # directory handle -> index of its delete in this batch
        #: Hints sent during this batch: (kind, path, writing, closed); kind "scan" for a directory
        #: that arrived or moved (a hint records only the directory itself, a rescan its content).
        self._emitted: list[tuple[str, bytes, bool, bool]] = []
        self._prev_emitted: list[tuple[str, bytes, bool, bool]] = []  # ... during the previous one(s)
        self._capped = False  # the last read stopped at MAX_EVENTS_PER_DRAIN (more events were queued)
        self._prev_overflow = False
        self._prev_index: dict[bytes, list[int]] | None = None  # path and each ancestor -> _prev_emitted indexes
        self._limbo_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._last_drain = -1.0
        self._young: dict[bytes, float] = {}  # root-relative dir -> when it arrived with content
        self._final = True
        self.overflows = 0
        self.events = 0
        self.read_events = 0  # including those dropped at once (outside the root)
        self.fallback_rescans = 0
        self.reemitted = 0
        self.unwatched: set[bytes] = set()
        try:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.root_abs = fd_path(self._root_fd)  # canonical: the form readlink gives for handles
            self.root_handle = name_to_handle(self._root_fd)
            self._fd, self.target_fid = self._init_group(use_target_fid)
            self.mask, self.has_rename = self._add_mark(use_rename)
        except OSError as e:
            self.close()
            raise OSError(e.errno, f"fanotify detector for {self.root!r}: {e.strerror}") from e
        except BaseException:
            self.close()
            raise
        #: Kernel ignore marks on directories outside the root (0 once unsupported: -1).
        self.ignored_dirs = 0
        self._res = _Resolver(self._root_fd, lambda p: self._rel(p) is not None, self._covers_root,
                              self._ignore_dir, self._unignore_all)

    # -- setup -----------------------------------------------------------------------------------
    @staticmethod
    def _init_group(use_target_fid: bool) -> tuple[int, bool]:
        if use_target_fid:
            try:
                return fanotify_init(FAN_REPORT_DFID_NAME_TARGET), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                log.info("fanotify: FAN_REPORT_TARGET_FID unsupported (kernel < 5.17); deleted "
                         "directories fall back to rescans")
        return fanotify_init(FAN_REPORT_DFID_NAME), False

    def _add_mark(self, use_rename: bool) -> tuple[int, bool]:
        # With FAN_RENAME the MOVED_FROM/MOVED_TO pair would only repeat the same rename as a
        # removal plus an arrival, so it is asked for only when FAN_RENAME is not available.
        moves = [FAN_RENAME] if use_rename else []
        moves.append(FAN_MOVED_FROM | FAN_MOVED_TO)
        last: OSError | None = None
        for mv in moves:
            for extra in (FAN_EVENT_ON_CHILD, 0):
                mask = BASE_MASK | mv | extra
                if mv == FAN_RENAME and self.target_fid:
                    # Self events are only needed to pair a deleted directory with its parent's
                    # DELETE (TARGET_FID gives the child's handle there) and for the root (seen
                    # in its parent's DELETE/RENAME too). Every file renamed over or deleted
                    # anywhere on the filesystem would add one, and no ignore mark can drop them.
                    mask &= ~(FAN_DELETE_SELF | FAN_MOVE_SELF)
                try:
                    fanotify_mark_filesystem(self._fd, mask, self.root_abs)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    last = e
                    continue
                return mask, bool(mask & FAN_RENAME)
        assert last is not None
        raise last

    def _ignore_dir(self, handle: bytes) -> None:
        """Have the kernel drop the events of a directory outside the root (busy neighbours cost nothing)."""
        if self.ignored_dirs < 0 or self._fd < 0:
            return
        if self.ignored_dirs >= IGNORE_MAX:
            self._unignore_all()  # bounds pinned inodes (and marks of since-deleted directories)
        try:
            fd = open_by_handle(self._root_fd, handle, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            if _libc().fanotify_mark(self._fd, FAN_MARK_ADD | FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY,
                                     IGNORE_MASK, fd, None) == 0:
                self.ignored_dirs += 1
            elif ctypes.get_errno() == errno.EINVAL:
                log.info("fanotify: FAN_MARK_IGNORE unsupported (kernel < 6.0); events outside the root "
                         "are dropped after they are read")
                self.ignored_dirs = -1
        finally:
            os.close(fd)

    def _unignore_all(self) -> None:
        """Remove every ignore mark (a directory may have moved into the root)."""
        if self.ignored_dirs > 0 and self._fd >= 0:
            if _libc().fanotify_mark(self._fd, FAN_MARK_FLUSH, 0, AT_FDCWD, None) != 0:
                # Not seen in practice; the root is rescanned so nothing already changed is lost.
                log.error("fanotify: %s; rescanning the root, restart the origin if a directory was "
                          "moved into it from elsewhere on the filesystem",
                          _oserror("fanotify_mark(FAN_MARK_FLUSH) of the ignore marks"))
                self.ignored_dirs = -1
                self._fallback_rescan(b"")
                return
            self.ignored_dirs = 0

    def submounts(self) -> list[bytes]:
        """Mount points below the root: other filesystems, which the mark does not cover."""
        return self._submounts()

    def _submounts(self) -> list[bytes]:
        """Mount points below the root (other filesystems are not covered by the mark)."""
        prefix = self.root_abs.rstrip(b"/") + b"/"
        out: list[bytes] = []
        try:
            with open("/proc/self/mountinfo", "rb") as f:
                for line in f:
                    fields = line.split(b" ")
                    if len(fields) < 5:
                        continue
                    mp = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
                    if mp.startswith(prefix):
                        out.append(mp)
        except OSError:
            pass
        return out

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, sink: HintSink) -> None:
        """Start reading events on the running loop (no tree walk: the mark covers the filesystem)."""
        if self._fd < 0:
            raise RuntimeError(f"fanotify detector for {self.root!r} is closed")
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        for mp in self._submounts():
            log.warning("fanotify: %r is another filesystem mounted below the root; changes there are "
                        "not seen (use the inotify detector for such trees)", mp)
            rel = self._rel(mp)
            if rel:
                self.unwatched.add(rel)
        self._loop.add_reader(self._fd, self._readable)
        self._reading = True
        log.info("fanotify: watching %r (filesystem mark, mask %#x, FAN_RENAME %s, target fid %s)",
                 self.root_abs, self.mask, "yes" if self.has_rename else "no",
                 "yes" if self.target_fid else "no")

    def _readable(self) -> None:
        """Events are queued: read them now after a quiet spell; while busy, poll every DRAIN_DELAY."""
        assert self._loop is not None
        now = self._loop.time()
        if now - self._last_drain > BUSY_WINDOW:
            self._last_drain = now
            self.drain()
            return
        # Busy: stop waking up per event; read on a timer until a read finds the queue empty.
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._drain_timer is None:
            self._drain_timer = self._loop.call_later(DRAIN_DELAY, self._poll)

    def _poll(self) -> None:
        self._drain_timer = None
        if self._fd < 0 or self._loop is None:
            return
        before = self.read_events
        self._last_drain = self._loop.time()
        self.drain()
        if self.read_events != before:
            self._drain_timer = self._loop.call_later(DRAIN_DELAY, self._poll)
        elif not self._reading:
            self._loop.add_reader(self._fd, self._readable)
            self._reading = True

    def close(self) -> None:
        """Stop watching and release the descriptors (idempotent)."""
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self._limbo_timer is not None:
            self._limbo_timer.cancel()
            self._limbo_timer = None
        self._limbo.clear()
        if self._fd >= 0:
            if self._loop is not None and self._reading:
                try:
                    self._loop.remove_reader(self._fd)
                except (RuntimeError, ValueError):  # loop already closed
                    pass
                self._reading = False
            os.close(self._fd)
            self._fd = -1
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def fileno(self) -> int:
        """The fanotify descriptor (-1 once closed)."""
        return self._fd

    # -- reading ---------------------------------------------------------------------------------
    def drain(self) -> None:
        """Read and dispatch all queued events (no-op before start, after close, or when re-entered)."""
        if self._sink is None or self._fd < 0 or self._draining:
            return
        self._draining = True
        try:
            events = self._read_all()
            capped = len(events) >= MAX_EVENTS_PER_DRAIN
            self.read_events += len(events)
            out = self._res.outside
            if out:
                # A busy neighbour's file renames (which no ignore mark can drop): both directories
                # are known to lie outside, so the rename cannot touch the root.
                events = [ev for ev in events
                          if not (ev.mask & FAN_RENAME and not ev.mask & FAN_ONDIR and ev.old is not None
                                  and ev.new is not None and ev.old[0] in out and ev.new[0] in out)]
            if events:  # hints sent since the last read become "the previous batch" (see _moved)
                # A rename done while the previous batch was handled is read now, or later when
                # the read before this one stopped at the cap: then the window reaches back further.
                prev = self._emitted
                if self._capped and not self._prev_overflow:
                    prev = self._prev_emitted + prev
                self._prev_overflow = len(prev) > RECENT_MAX or (self._capped and self._prev_overflow)
                self._prev_emitted = [] if self._prev_overflow else prev
                self._emitted = []
                self._prev_index = None
                self._capped = capped
            self._fallbacks.clear()
            self._res.forget_outside(events)
            self._memo.clear()
            self._at_memo.clear()
            self._collect_gone(events)
            self._plan_renames(events)
            now = time.monotonic()
            if self._limbo:
                # Older than anything just read: retry them first, now that their deletes may be known.
                waiting, self._limbo = self._limbo, []
                crowded = len(waiting) >= LIMBO_MAX
                self._pos = -1
                for ev, t0 in waiting:
                    self._run(ev, t0, final=crowded or now - t0 >= LIMBO_WAIT)
            for i, ev in enumerate(events):
                self.events += 1
                self._pos = i
                self._run(ev, now, final=False)
            if self._limbo and self._limbo_timer is None and self._loop is not None:
                self._limbo_timer = self._loop.call_later(LIMBO_WAIT, self._limbo_due)
        finally:
            self._draining = False

    def _limbo_due(self) -> None:
        self._limbo_timer = None
        self.drain()

    def _run(self, ev: FanEvent, t0: float, *, final: bool) -> None:
        """Dispatch one event; park it in limbo if its directory cannot be located yet (unless final)."""
        self._final = final
        try:
            self._dispatch(ev)
        except _Deferred:
            self._limbo.append((ev, t0))
        except Exception:  # noqa: BLE001 - one bad event must not lose the others
            log.exception("fanotify: failed to dispatch event mask %#x; rescanning", ev.mask)
            self._fallback_rescan(b"")
        finally:
            self._final = True

    def _read_all(self) -> list[FanEvent]:
        events: list[FanEvent] = []
        while len(events) < MAX_EVENTS_PER_DRAIN:
            try:
                buf = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                log.error("fanotify read failed: %s; rescanning the whole root", e)
                self._fallback_rescan(b"")
                break
            if not buf:
                break
            try:
                events.extend(parse_events(buf))
            except ValueError as e:
                log.error("fanotify: unparsable events (%s); rescanning the whole root", e)
                self._fallback_rescan(b"")
        return events

    def _collect_gone(self, events: list[FanEvent]) -> None:
        """Remember where deleted directories were: directory handle -> (parent handle, name).

        With FAN_REPORT_TARGET_FID the parent's DELETE event carries the child's handle. Without
        it, an rmdir queues the directory's DELETE_SELF (handle, ".") right before the parent's
        DELETE; a wrong pairing (concurrent rmdirs) is harmless: whatever happened inside a
        deleted directory is covered by the removal hint of the directory itself.
        """
        prev: FanEvent | None = None
        self._gone_at.clear()
        for i, ev in enumerate(events):
            parent, name, child = ev.dfid, ev.name, None
            if parent is not None and name and name != b"." and ev.mask & FAN_ONDIR and ev.mask & FAN_DELETE:
                if ev.fid is not None:
                    child = ev.fid
                elif prev is not None and prev.dfid is not None and prev.name == b"." \
                        and prev.mask & FAN_DELETE_SELF and prev.dfid != parent:
                    child = prev.dfid
            if child is not None and parent is not None and name is not None:
                if len(self._gone) >= GONE_MAX:
                    self._gone.clear()
                self._gone[child] = (parent, name)
                self._gone_at[child] = i
            prev = ev

    def _plan_renames(self, events: list[FanEvent]) -> None:
        """Where each directory renamed in this batch was just before and just after its rename.

        Handles resolve to *current* paths, which already include every rename queued later in the
        batch. The indexer reads hints in stream order and carries its pending hints along with
        each move, so a hint must name the path as of its own event, or a later rename would be
        applied to it twice (X/f written, then X->T, Y->X, T->Y: the current path Y/f would be
        carried to X/f by the move Y->X). Walking the renames from the last one back, each
        rename's paths are its current paths with the renames after it undone; `_at` undoes them
        for any other event. The two renames of a RENAME_EXCHANGE are undone together, as a swap.
        """
        undo: list[tuple[int, bytes | None, bytes | None, bool]] = []
        if self.has_rename:
            i = len(events) - 1
            while i >= 0:
                ev = events[i]
                if not (ev.mask & FAN_RENAME and ev.mask & FAN_ONDIR) or ev.old is None or ev.new is None:
                    i -= 1
                    continue
                swap = False
                if i > 0:
                    pv = events[i - 1]
                    swap = bool(pv.mask & FAN_RENAME and pv.mask & FAN_ONDIR and pv.old == ev.new
                                and pv.new == ev.old and (pv.fid is None or pv.fid != ev.fid))
                idx = i - 1 if swap else i
                self._undo = undo  # holds only renames after this one while it is being filled
                o, ohow = self._locate_at(ev.old[0], idx, planning=True)  # _final is set: never defers
                n, nhow = self._locate_at(ev.new[0], idx, planning=True)
                if o is None or n is None or ohow == STALE or nhow == STALE:
                    undo.append((idx, None, None, False))
                else:
                    undo.append((idx, _join_abs(o, ev.old[1]), _join_abs(n, ev.new[1]), swap))
                i = idx - 1
        self._undo = undo
        self._undo_idx = [-u[0] for u in undo]

    @staticmethod
    def _undo_after(path: bytes, undo: list[tuple[int, bytes | None, bytes | None, bool]], pos: int,
                    before: int | None = None) -> bytes:
        """path with the directory renames between event pos and event `before` (or the end) undone."""
        for idx, old, new, swap in undo:
            if before is not None and idx >= before:
                continue
            if idx <= pos:
                break
            if old is None or new is None:
                continue  # not located: sent as removal/rescan, never as a move the indexer applies
            if path == new or path.startswith(new + b"/"):
                path = old + path[len(new):]
            elif swap and (path == old or path.startswith(old + b"/")):
                path = new + path[len(old):]
        return path

    def _at(self, path: bytes) -> bytes:
        """The current absolute path of a live directory as it was at the event being dispatched."""
        # _undo is ordered by descending index: entries after the event are a prefix of it.
        k = bisect.bisect_left(self._undo_idx, -self._pos)
        if k == 0:
            return path
        key = (path, k)
        hit = self._at_memo.get(key)
        if hit is None:
            hit = self._undo_after(path, self._undo[:k], self._pos)
            if len(self._at_memo) < CACHE_MAX:
                self._at_memo[key] = hit
        return hit

    def _locate_at(self, handle: bytes, pos: int, depth: int = 0, *,
                   planning: bool = False) -> tuple[bytes | None, str]:
        """Absolute path of a directory handle as it was at event pos, and how it was found.

        A live directory's current path has the later renames undone. A deleted directory has no
        current path (its parent's path now + its name may lie under another directory renamed
        to that name since), so it is anchored at the event that recorded it (its delete, or the
        earlier event the delete was merged into): its parent's path there plus its name, with
        the renames between that event and pos undone (or, when pos is later, applied).
        """
        g = self._gone.get(handle)
        if g is None or depth >= 256:
            p, how = self._locate(handle, depth)
            if p is None or how == STALE:
                return p, how
            if planning or pos != self._pos:
                return self._undo_after(p, self._undo, pos), how
            return self._at(p), how
        c = self._gone_at.get(handle, -1)
        if c <= pos and planning:
            return None, STALE  # the renames between c and pos are not known yet
        parent, how = self._locate_at(g[0], c, depth + 1, planning=planning)
        if parent is None or how == STALE:
            return self._locate(handle, depth)
        path = _join_abs(parent, g[1])
        if c > pos:
            return self._undo_after(path, self._undo, pos, before=c), GONE
        for idx, old, new, swap in reversed(self._undo):  # ascending: apply (c, pos]
            if idx <= c or old is None or new is None:
                continue
            if idx > pos:
                break
            if path == old or path.startswith(old + b"/"):
                path = new + path[len(old):]
            elif swap and (path == new or path.startswith(new + b"/")):
                path = old + path[len(new):]
        return path, GONE

    def _uncertain(self, pos: int) -> bool:
        """True if a directory rename at or after pos could not be located (not undone in paths)."""
        for idx, old, _, _ in self._undo:
            if idx < pos:
                break
            if old is None:
                return True
        return False

    # -- resolution ------------------------------------------------------------------------------
    def _locate(self, handle: bytes, depth: int = 0) -> tuple[bytes | None, str]:
        """Current absolute path of a directory handle and how it was found (LIVE, GONE or STALE).

        Resolved once per batch (memo), so every event of a batch sees the same namespace.
        """
        hit = self._memo.get(handle)
        if hit is not None:
            return hit
        g = self._gone.get(handle)
        if g is None:  # a handle seen deleted never comes back (handles carry a generation)
            p = self._res.resolve(handle)
            if p is not None:
                self._memo[handle] = (p, LIVE)
                return p, LIVE
        if g is not None and depth < 256:
            parent, how = self._locate(g[0], depth + 1)
            if parent is not None:
                if how != STALE:
                    self._memo[handle] = (_join_abs(parent, g[1]), GONE)
                return _join_abs(parent, g[1]), (GONE if how != STALE else STALE)
        if not self._final:
            raise _Deferred
        last = self._res.last_known(handle)
        if last is not None:
            return last, STALE
        return None, STALE

    def _rel(self, full: bytes) -> bytes | None:
        """Root-relative path of an absolute path, or None when it is outside the root."""
        r = self.root_abs
        if full == r:
            return b""
        if not full.startswith(b"/"):
            return None  # OUTSIDE (a directory known to lie elsewhere)
        if r == b"/":
            return full[1:]
        if full.startswith(r + b"/"):
            return full[len(r) + 1:]
        return None

    def _covers_root(self, full: bytes) -> bool:
        """True if full is the root directory or one of its ancestors."""
        r = self.root_abs
        return full == r or r.startswith(full.rstrip(b"/") + b"/")

    def _fallback_rescan(self, rel: bytes) -> None:
        """Rescan rel once per drain: an event whose location could not be established exactly."""
        if rel in self._fallbacks or b"" in self._fallbacks:
            return
        self._fallbacks.add(rel)
        self.fallback_rescans += 1
        assert self._sink is not None
        self._sink.rescan(rel)

    def _unlocatable(self, dirabs: bytes | None, what: str) -> bytes | None:
        """A directory handle could not be resolved exactly: rescan where it was last seen, or the root.

        Returns the root-relative last-known path of the directory (None when unknown or outside),
        so the caller can also send the event's own hint there: a pending hint is checked after
        the indexer has committed earlier moves, a rescan compares with the manifest right away.
        """
        rel = self._rel(dirabs) if dirabs is not None else None
        if dirabs is not None and rel is None:
            log.debug("fanotify: %s: directory last seen outside the root at %r", what, dirabs)
            return None
        log.debug("fanotify: %s: directory handle unresolvable; rescanning %r", what, rel or b"")
        self._fallback_rescan(rel or b"")
        return rel

    # -- hints ---------------------------------------------------------------------------------
    def _remember(self, kind: str, rel: bytes, writing: bool = False, closed: bool = False) -> None:
        """Keep a hint of this batch, to be sent again after a directory move read in the next one."""
        if len(self._emitted) <= RECENT_MAX:
            self._emitted.append((kind, rel, writing, closed))

    def _changed(self, rel: bytes, *, writing: bool = False, closed: bool = False) -> None:
        assert self._sink is not None
        self._sink.changed(rel, writing=writing, closed=closed)
        self._remember("changed", rel, writing, closed)

    def _removed(self, rel: bytes) -> None:
        assert self._sink is not None
        self._sink.removed(rel)
        self._remember("removed", rel)

    def _moved(self, old: bytes, new: bytes, is_dir: bool) -> None:
        """Send an exact move; a directory move also re-sends the previous batch's hints it touches.

        The previous batch was resolved *before* this batch was read, but a rename can already be
        visible in the paths (its dentry moves before its event is queued): hints of that batch
        under `old` may then be carried to the wrong place by this move, and a move there may
        have named a source the indexer did not know yet. Sending them again after the move
        (hints are only checked, never trusted) makes either case converge.
        """
        assert self._sink is not None
        self._sink.moved(old, new, is_dir)
        self._remember("removed", old)
        self._remember("scan" if is_dir else "changed", new, False, True)
        if not is_dir or self._pos < 0:
            return
        if self._prev_overflow:
            self._sink.rescan(old)
            self._sink.rescan(new)
            return
        if not self._prev_emitted:
            return
        if self._prev_index is None:
            self._prev_index = {}
            for i, (_, rel, _, _) in enumerate(self._prev_emitted):
                p = rel
                while p:
                    self._prev_index.setdefault(p, []).append(i)
                    p = p.rpartition(b"/")[0]
        for i in sorted(set(self._prev_index.get(old, ())) | set(self._prev_index.get(new, ()))):
            kind, rel, writing, closed = self._prev_emitted[i]
            self.reemitted += 1
            if kind == "removed":
                self._sink.removed(rel)
            elif kind == "scan":
                # A directory placed there may have been resolved under a name this move takes
                # over: the move replaces what the indexer holds there, so walk it again.
                under_old = rel == old or rel.startswith(old + b"/")
                self._sink.rescan(new + rel[len(old):] if under_old else rel)  # (walks where it is now)
                self._sink.changed(rel, closed=True)  # (a pending hint: moves carry it)
            else:
                self._sink.changed(rel, writing=writing, closed=closed)

    # -- directories that appear -----------------------------------------------------------------
    def _dir_appeared(self, rel: bytes, *, with_content: bool, now_at: bytes | None = b"\0") -> None:
        """A directory appeared at rel: scan it, and keep a pending hint for the entry itself.

        rel is the path at the event (hints are read in stream order); the scan walks the disk at
        once, so it goes to where the directory is now (`now_at`, None when it has left the root
        since). A move of an ancestor right after the scan can still make the walk look under
        the old name; the pending hint is carried along by the move. Entries created inside a
        new directory have events of their own; a directory that arrived with content (moved
        in) has none, so it is rescanned again if a move carries it while young.
        """
        assert self._sink is not None
        cur = rel if now_at == b"\0" else now_at
        if cur is not None:
            self._sink.rescan(cur)
        self._changed(rel)
        self._remember("scan", rel)
        if with_content:
            now = time.monotonic()
            if len(self._young) >= YOUNG_MAX:
                self._young = {q: t for q, t in self._young.items() if now - t < YOUNG}
            if len(self._young) < YOUNG_MAX:
                self._young[rel] = now

    def _dir_moved(self, old: bytes, new: bytes) -> None:
        """Follow young directories through a move of old to new; rescan them at their new place."""
        if not self._young:
            return
        assert self._sink is not None
        now = time.monotonic()
        for q in [q for q in self._young if q == old or q.startswith(old + b"/")]:
            t = self._young.pop(q)
            if now - t < YOUNG:
                q2 = new + q[len(old):]
                self._young[q2] = t
                self._sink.rescan(q2)

    def _dir_left(self, old: bytes) -> None:
        for q in [q for q in self._young if q == old or q.startswith(old + b"/")]:
            del self._young[q]

    # -- dispatch --------------------------------------------------------------------------------
    def _dispatch(self, ev: FanEvent) -> None:
        sink = self._sink
        assert sink is not None
        m = ev.mask
        if m & FAN_Q_OVERFLOW:
            self._last_move = None
            self.overflows += 1
            log.warning("fanotify queue overflow: rescanning the whole root")
            self._fallback_rescan(b"")
            return
        if m & FAN_RENAME:
            if ev.old is None or ev.new is None:
                log.warning("fanotify: FAN_RENAME without old/new records; rescanning the whole root")
                self._fallback_rescan(b"")
            else:
                move, self._last_move = self._last_move, None
                self._rename(ev, move)
            return
        if ev.dfid is None:
            # FID-only: a self event on a non-directory; its directory-entry events carry the path.
            if m & (FAN_DELETE_SELF | FAN_MOVE_SELF) and ev.fid == self.root_handle:
                sink.root_lost("root directory was deleted or moved")
            return
        if ev.name is None or ev.name == b".":
            self._self_event(ev)  # (the MOVE_SELF of a rename does not break exchange pairing)
            return
        self._last_move = None
        dirabs, how = self._locate(ev.dfid)
        if dirabs == OUTSIDE:
            return  # a directory elsewhere on the filesystem
        is_dir = bool(m & FAN_ONDIR)
        if dirabs is None or how == STALE:
            last = self._unlocatable(dirabs, f"event {m:#x} on {ev.name!r}")
            if last is not None:
                self._child_event(m, paths_join(last, ev.name), is_dir)
            return
        full = _join_abs(dirabs, ev.name)  # now: decides whether the root itself is affected
        if m & (FAN_DELETE | FAN_MOVED_FROM) and is_dir and self._covers_root(full):
            sink.root_lost(f"root directory (or its parent) {full!r} was deleted or moved away")
            return
        cur = self._rel(full)
        if cur == b"":  # a directory appeared at the root's path: the old root was replaced
            sink.root_lost(f"root path {full!r} now names a different directory")
            return
        at, ahow = self._locate_at(ev.dfid, self._pos)  # at the event: what the hint must name
        rel = self._rel(_join_abs(at, ev.name)) if at is not None and ahow != STALE else None
        if self._pos >= 0 and (ahow == STALE or self._uncertain(self._pos + 1)):
            # A rename after this event could not be located, so this path may be off: also
            # compare where the entry is now with the manifest.
            if cur is not None:
                assert self._sink is not None
                self._sink.rescan(cur)
        if rel is None or rel == b"":
            return
        self._child_event(m, rel, is_dir, cur)

    def _self_event(self, ev: FanEvent) -> None:
        """An event on a directory itself (name "."): only the root's loss and attribute changes matter."""
        sink = self._sink
        assert sink is not None and ev.dfid is not None
        if ev.mask & (FAN_DELETE_SELF | FAN_MOVE_SELF) and ev.dfid == self.root_handle:
            sink.root_lost("root directory was deleted or moved")
            return
        # Other directories' DELETE_SELF/MOVE_SELF: the DELETE/RENAME in the parent carries the
        # path. A merged ATTRIB (chmod, then rename before the read) must still be reported.
        if ev.mask & FAN_ATTRIB:
            hit = self._memo.get(ev.dfid)
            dirabs = hit[0] if hit is not None else self._res.resolve(ev.dfid, known_gone=ev.dfid in self._gone)
            if dirabs is None:
                return  # the directory is gone; its removal is reported in its parent
            at = self._at(dirabs) if ev.dfid not in self._gone else self._locate_at(ev.dfid, self._pos)[0]
            rel = self._rel(at) if at is not None else None
            if rel is not None:
                self._changed(rel)

    def _child_event(self, m: int, rel: bytes, is_dir: bool, cur: bytes | None = b"\0") -> None:
        """Hints for one (possibly merged) event on the entry rel, in the order that leaves the right state.

        rel is the entry's path at the event; `cur` where it is now (for scans), if different.
        """
        if m & (FAN_DELETE | FAN_MOVED_FROM):
            self._removed(rel)
            if is_dir:
                self._dir_left(rel)
        if is_dir:
            if m & (FAN_CREATE | FAN_MOVED_TO):
                self._dir_appeared(rel, with_content=bool(m & FAN_MOVED_TO), now_at=cur)
            elif m & FAN_ATTRIB:
                self._changed(rel)
            return
        if m & (FAN_CLOSE_WRITE | FAN_MOVED_TO):
            self._changed(rel, closed=True)
        elif m & (FAN_CREATE | FAN_MODIFY):
            self._changed(rel, writing=True)
        elif m & FAN_ATTRIB:
            self._changed(rel)

    def _rename(self, ev: FanEvent, prev: tuple[bytes, bytes] | None) -> None:
        """FAN_RENAME: old and new directory + name in one event."""
        sink = self._sink
        assert sink is not None and ev.old is not None and ev.new is not None
        is_dir = bool(ev.mask & FAN_ONDIR)
        odir, ohow = self._locate(ev.old[0])
        ndir, nhow = self._locate(ev.new[0])
        old_full = _join_abs(odir, ev.old[1]) if odir is not None else None
        new_full = _join_abs(ndir, ev.new[1]) if ndir is not None else None
        if is_dir and old_full is not None and ohow != STALE and self._covers_root(old_full):
            sink.root_lost(f"root directory (or its parent) {old_full!r} was renamed to {new_full!r}")
            return
        if new_full is not None and nhow != STALE and self._rel(new_full) == b"":
            sink.root_lost(f"root path {new_full!r} was replaced by a rename")
            return
        # The paths at this event (later renames of the batch undone), which the hints must name.
        oat = self._locate_at(ev.old[0], self._pos)[0] if odir is not None and ohow != STALE else None
        nat = self._locate_at(ev.new[0], self._pos)[0] if ndir is not None and nhow != STALE else None
        old_rel = self._rel(_join_abs(oat, ev.old[1])) if oat is not None else None
        new_rel = self._rel(_join_abs(nat, ev.new[1])) if nat is not None else None
        new_cur = self._rel(new_full) if new_full is not None and nhow != STALE else None
        if ohow == STALE:
            last = self._unlocatable(odir, f"rename from {ev.old[1]!r}")
            if last is not None:
                self._removed(paths_join(last, ev.old[1]))
        if nhow == STALE:
            last = self._unlocatable(ndir, f"rename to {ev.new[1]!r}")
            if last is not None:
                p = paths_join(last, ev.new[1])
                if is_dir:
                    self._dir_appeared(p, with_content=True)
                else:
                    self._changed(p, closed=True)
        if new_rel == b"" or old_rel == b"":
            new_rel = None if new_rel == b"" else new_rel
            old_rel = None if old_rel == b"" else old_rel
        if old_rel is not None and new_rel is not None and (self._pos < 0 or GONE in (ohow, nhow)
                                                            or self._uncertain(self._pos)):
            # Retried from limbo (renames dispatched since make an exact move unsafe), a parent
            # deleted since (its path at this event is rebuilt from delete events, best effort),
            # or a directory rename from here on could not be located: a removal plus an
            # arrival, both checked after the moves the indexer knows.
            self._removed(old_rel)
            if is_dir:
                self._dir_left(old_rel)
                self._dir_appeared(new_rel, with_content=True, now_at=new_cur)
            else:
                self._changed(new_rel, closed=True)
        elif old_rel is not None and new_rel is not None:
            self._moved(old_rel, new_rel, is_dir)
            if is_dir:
                self._dir_moved(old_rel, new_rel)
            self._last_move = (old_rel, new_rel)
            if prev == (new_rel, old_rel):
                # The inverse of the previous rename: RENAME_EXCHANGE swaps both names, so the two
                # moves alone would lose one side. Verify both paths from the disk.
                sink.rescan(old_rel)
                sink.rescan(new_rel)
        elif old_rel is not None:
            self._removed(old_rel)
            if is_dir:
                self._dir_left(old_rel)
        elif new_rel is not None:
            if is_dir:
                self._dir_appeared(new_rel, with_content=True, now_at=new_cur)
            else:
                self._changed(new_rel, closed=True)
