"""fanotify detector against the real kernel: hints for changes inside the root, nothing from outside.

Most tests run on a tmpfs mounted for the test (root and an "outside" sibling on the same
filesystem, so the filesystem-wide mark really sees the outside events and the detector must
filter them); one runs on the filesystem of pytest's tmp dir. Everything skips, with the reason
from `fanotify_available`, when the backend cannot run here (not root, old kernel, no file
handles, mounting not permitted).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetsync.detect import HintSink
from fleetsync.detect.fanotify import LIMBO_WAIT, FanotifyDetector, fanotify_available, kernel_version
from tests.helpers.sinks import Call, RecordingSink

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fanotify is Linux-only")

_sink_check: HintSink = RecordingSink()  # RecordingSink must satisfy the protocol


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs with `root/` (watched) and `outside/` (same filesystem, not watched)."""
    if os.geteuid() != 0:
        ok, why = fanotify_available(tmp_path)
        pytest.skip(f"fanotify unavailable: {why}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "fleetsync-test", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the fanotify tests: {r.stderr.strip()}")
    try:
        (mnt / "root").mkdir()
        (mnt / "outside").mkdir()
        ok, why = fanotify_available(mnt / "root")
        if not ok:
            pytest.skip(f"fanotify unavailable on tmpfs: {why}")
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def root(fs: Path) -> Path:
    """The watched root inside the test tmpfs."""
    return fs / "root"


class Watch:
    """A started detector plus its recording sink."""

    def __init__(self, det: FanotifyDetector, sink: RecordingSink, root: Path) -> None:
        self.det, self.sink, self.root = det, sink, root

    async def until(self, pred: Callable[[Call], bool], what: str, timeout: float = 5.0) -> Call:
        """Wait until a recorded call satisfies pred (events arrive through the loop's reader)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for c in self.sink.calls:
                if pred(c):
                    return c
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; calls so far: {self.sink.calls!r}")
            await asyncio.sleep(0.005)

    async def barrier(self) -> None:
        """Write a marker file in the root and wait for its hint: every earlier event has been handled."""
        name = f".barrier-{uuid.uuid4().hex[:8]}".encode()
        with open(os.path.join(os.fsencode(self.root), name), "wb") as f:
            f.write(b"x")
        await self.until(lambda c: c[0] == "changed" and c[1] == name and c[3], f"barrier {name!r}")

    def calls_for(self, path: bytes) -> list[Call]:
        """Recorded calls that mention path."""
        return [c for c in self.sink.calls if c[0] != "root_lost" and path in c[1:3]]


@pytest.fixture
async def make_watch() -> AsyncIterator[Callable[..., Watch]]:
    """Factory: make_watch(root, start=True, **detector options) -> Watch; all closed at teardown."""
    made: list[FanotifyDetector] = []

    def factory(root: Path, start: bool = True, **kw: Any) -> Watch:
        det = FanotifyDetector(root, **kw)
        made.append(det)
        sink = RecordingSink()
        if start:
            det.start(sink)
        return Watch(det, sink, root)

    yield factory
    for d in made:
        d.close()


RENAME_MODES = [pytest.param(True, id="FAN_RENAME"), pytest.param(False, id="MOVED_FROM+MOVED_TO")]


def _w(path: Path | bytes, data: bytes = b"data") -> None:
    with open(path, "wb") as f:
        f.write(data)


# -- availability --------------------------------------------------------------------------------
def test_kernel_version_parsing() -> None:
    assert kernel_version("5.4.0-42-generic") == (5, 4)
    assert kernel_version("6.18.44-fc-v669") == (6, 18)
    assert kernel_version() >= (2, 6)


def test_available_on_tmpfs(root: Path) -> None:
    ok, why = fanotify_available(root)
    assert ok, why


def test_unavailable_without_file_handles(root: Path) -> None:
    ok, why = fanotify_available("/proc")
    assert not ok
    assert "file handles" in why


def test_unavailable_when_not_root(root: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    code = "import os, sys; from fleetsync.detect.fanotify import fanotify_available as f; " \
           "print(f(sys.argv[1]))"
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code,
                        "/"], capture_output=True, text=True, cwd="/")
    if r.returncode != 0:
        pytest.skip(f"cannot run python as nobody here: {r.stderr.strip()[-300:]}")
    assert "(False, 'not root" in r.stdout, r.stdout


def test_detector_error_names_the_root(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="fanotify detector for .*missing"):
        FanotifyDetector(tmp_path / "missing")


# -- basic events --------------------------------------------------------------------------------
async def test_created_written_closed_file(root: Path, make_watch: Callable[..., Watch]) -> None:
    w = make_watch(root)
    _w(root / "a.txt")
    await w.until(lambda c: c == ("changed", b"a.txt", False, True), "changed(a.txt, closed=True)")
    # the last hint for the path says "closed", so the indexer does not wait for more writes
    assert [c for c in w.calls_for(b"a.txt") if c[0] == "changed"][-1][3] is True


async def test_write_without_close_is_writing(root: Path, make_watch: Callable[..., Watch]) -> None:
    w = make_watch(root)
    with open(root / "big.bin", "wb") as f:
        f.write(b"x" * 4096)
        f.flush()
        await w.until(lambda c: c == ("changed", b"big.bin", True, False), "changed(big.bin, writing=True)")
    await w.until(lambda c: c == ("changed", b"big.bin", False, True), "changed(big.bin, closed=True)")


async def test_attrib(root: Path, make_watch: Callable[..., Watch]) -> None:
    _w(root / "f")
    (root / "d").mkdir()
    w = make_watch(root)
    os.chmod(root / "f", 0o600)
    os.chmod(root / "d", 0o700)
    os.chmod(root, 0o711)
    await w.until(lambda c: c == ("changed", b"f", False, False), "changed(f)")
    await w.until(lambda c: c == ("changed", b"d", False, False), "changed(d)")
    await w.until(lambda c: c == ("changed", b"", False, False), "changed(root)")


async def test_mkdir_yields_rescan(root: Path, make_watch: Callable[..., Watch]) -> None:
    w = make_watch(root)
    (root / "sub").mkdir()
    await w.until(lambda c: c == ("rescan", b"sub"), "rescan(sub)")
    (root / "sub" / "deeper").mkdir()
    _w(root / "sub" / "deeper" / "f.html")
    await w.until(lambda c: c == ("rescan", b"sub/deeper"), "rescan(sub/deeper)")
    await w.until(lambda c: c == ("changed", b"sub/deeper/f.html", False, True), "changed(sub/deeper/f.html)")


async def test_delete_yields_removed(root: Path, make_watch: Callable[..., Watch]) -> None:
    (root / "d").mkdir()
    _w(root / "d" / "f")
    w = make_watch(root)
    os.unlink(root / "d" / "f")
    await w.until(lambda c: c == ("removed", b"d/f"), "removed(d/f)")
    os.rmdir(root / "d")
    await w.until(lambda c: c == ("removed", b"d"), "removed(d)")
    assert not [c for c in w.sink.calls if c[0] == "root_lost"]


# -- renames -------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_rename", RENAME_MODES)
async def test_rename_file_within_root(root: Path, make_watch: Callable[..., Watch], use_rename: bool) -> None:
    (root / "d").mkdir()
    _w(root / "old.txt")
    w = make_watch(root, use_rename=use_rename)
    assert w.det.has_rename == use_rename
    os.rename(root / "old.txt", root / "d" / "new.txt")
    if use_rename:
        await w.until(lambda c: c == ("moved", b"old.txt", b"d/new.txt", False), "moved(old.txt -> d/new.txt)")
        await w.barrier()
        assert not [c for c in w.sink.calls if c[0] == "removed"], "FAN_RENAME mode must not add removals"
    else:
        await w.until(lambda c: c == ("removed", b"old.txt"), "removed(old.txt)")
        await w.until(lambda c: c == ("changed", b"d/new.txt", False, True), "changed(d/new.txt, closed)")


@pytest.mark.parametrize("use_rename", RENAME_MODES)
async def test_rename_directory(root: Path, make_watch: Callable[..., Watch], use_rename: bool) -> None:
    (root / "a" / "b").mkdir(parents=True)
    _w(root / "a" / "b" / "f")
    w = make_watch(root, use_rename=use_rename)
    os.rename(root / "a", root / "z")
    if use_rename:
        await w.until(lambda c: c == ("moved", b"a", b"z", True), "moved(a -> z, dir)")
    else:
        await w.until(lambda c: c == ("removed", b"a"), "removed(a)")
        await w.until(lambda c: c == ("rescan", b"z"), "rescan(z)")
    # events inside the moved directory now carry its new path
    _w(root / "z" / "b" / "g")
    await w.until(lambda c: c == ("changed", b"z/b/g", False, True), "changed(z/b/g)")


async def test_rename_across_the_root_boundary(fs: Path, root: Path, make_watch: Callable[..., Watch]) -> None:
    out = fs / "outside"
    _w(out / "in.txt")
    (out / "indir").mkdir()
    _w(root / "leaving.txt")
    (root / "leavingdir").mkdir()
    w = make_watch(root)
    os.rename(out / "in.txt", root / "in.txt")
    os.rename(out / "indir", root / "indir")
    os.rename(root / "leaving.txt", out / "leaving.txt")
    os.rename(root / "leavingdir", out / "leavingdir")
    await w.until(lambda c: c == ("changed", b"in.txt", False, True), "changed(in.txt) for a move-in")
    await w.until(lambda c: c == ("rescan", b"indir"), "rescan(indir) for a dir move-in")
    await w.until(lambda c: c == ("removed", b"leaving.txt"), "removed(leaving.txt) for a move-out")
    await w.until(lambda c: c == ("removed", b"leavingdir"), "removed(leavingdir) for a dir move-out")
    # events in a directory that left the root are no longer reported
    _w(out / "leavingdir" / "later")
    await w.barrier()
    assert not [p for p in w.sink.paths() if p.endswith(b"later")]


async def test_rename_exchange_verifies_both_paths(root: Path, make_watch: Callable[..., Watch]) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("glibc without renameat2")
    _w(root / "x", b"xx")
    _w(root / "y", b"yyy")
    w = make_watch(root)
    if not w.det.has_rename:
        pytest.skip("kernel without FAN_RENAME")
    rename_exchange = 2
    if libc.renameat2(-100, bytes(root / "x"), -100, bytes(root / "y"), rename_exchange) != 0:
        pytest.skip(f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(ctypes.get_errno())}")
    await w.until(lambda c: c == ("rescan", b"x"), "rescan(x) after an exchange")
    await w.until(lambda c: c == ("rescan", b"y"), "rescan(y) after an exchange")


# -- filtering -----------------------------------------------------------------------------------
async def test_events_outside_the_root_are_not_reported(fs: Path, root: Path,
                                                        make_watch: Callable[..., Watch]) -> None:
    out = fs / "outside"
    (fs / "rootlike").mkdir()  # a sibling whose name starts like the root's
    w = make_watch(root)
    _w(out / "o1")
    (out / "od").mkdir()
    _w(out / "od" / "o2")
    os.chmod(out / "o1", 0o600)
    os.rename(out / "o1", out / "od" / "o3")
    os.unlink(out / "od" / "o2")
    shutil.rmtree(out / "od")
    _w(fs / "rootlike" / "o4")
    _w(fs / "top-level-file")
    await w.barrier()
    bad = [c for c in w.sink.calls if c[0] != "changed" or not c[1].startswith(b".barrier-")]
    assert not bad, f"hints for events outside the root: {bad!r}"
    assert w.det.fallback_rescans == 0


async def test_outside_noise_in_deleted_dirs_does_not_rescan_root(
        fs: Path, root: Path, make_watch: Callable[..., Watch]) -> None:
    """Directories created and removed outside the root before their events are read stay silent."""
    w = make_watch(root, start=False)  # the mark exists: events queue until start()
    for i in range(3):
        d = fs / "outside" / f"t{i}" / "a" / "b"
        d.mkdir(parents=True)
        _w(d / "f")
        shutil.rmtree(fs / "outside" / f"t{i}")
    w.det.start(w.sink)
    await w.barrier()
    assert w.sink.calls and all(c[1].startswith(b".barrier-") for c in w.sink.calls), w.sink.calls
    assert w.det.fallback_rescans == 0


@pytest.mark.parametrize("use_target_fid", [pytest.param(True, id="target-fid"),
                                            pytest.param(False, id="no-target-fid")])
async def test_deleted_tree_inside_root_is_reported(root: Path, make_watch: Callable[..., Watch],
                                                    use_target_fid: bool) -> None:
    """Directories deleted before their events are read: rebuilt from delete events, else rescanned.

    Without FAN_REPORT_TARGET_FID (kernels < 5.17) unread events of one process merge (the
    DELETE lands on the earlier CREATE), so the detector may only know a rescan is needed.
    """
    w = make_watch(root, start=False, use_target_fid=use_target_fid)
    (root / "x" / "y" / "z").mkdir(parents=True)
    _w(root / "x" / "y" / "z" / "f")
    shutil.rmtree(root / "x")
    w.det.start(w.sink)
    await w.until(lambda c: c == ("removed", b"x"), "removed(x)")
    await w.barrier()
    rescanned = [c[1] for c in w.sink.calls if c[0] == "rescan"]
    for p in (b"x", b"x/y", b"x/y/z", b"x/y/z/f"):
        covered = ("removed", p) in w.sink.calls or any(
            not r or p == r or p.startswith(r + b"/") for r in rescanned)
        assert covered, f"no hint covers {p!r}: {w.sink.calls!r}"
    if use_target_fid and w.det.target_fid:
        # with the child's fid in each delete event every path is rebuilt exactly, no rescans
        for p in (b"x/y", b"x/y/z", b"x/y/z/f"):
            assert ("removed", p) in w.sink.calls, (p, w.sink.calls)
        assert w.det.fallback_rescans == 0
    assert not [c for c in w.sink.calls if c[0] == "root_lost"]


# -- names ---------------------------------------------------------------------------------------
async def test_non_utf8_and_newline_names_are_exact_bytes(root: Path, make_watch: Callable[..., Watch]) -> None:
    w = make_watch(root)
    broot = bytes(root)
    names = [b"caf\xe9.html", b"new\nline.txt", b"sp ace \xff\xfe", b"n" * 255]
    for n in names:
        _w(broot + b"/" + n)
    d = b"dir\xff\nname"
    os.mkdir(broot + b"/" + d)
    _w(broot + b"/" + d + b"/inner\n\x80")
    for n in names:
        await w.until(lambda c, n=n: c == ("changed", n, False, True), f"changed({n!r})")
    await w.until(lambda c: c == ("rescan", d), f"rescan({d!r})")
    await w.until(lambda c: c == ("changed", d + b"/inner\n\x80", False, True), "changed(inner)")
    os.rename(broot + b"/" + d, broot + b"/" + d + b"\n2")
    await w.until(lambda c: c[0] in ("moved", "rescan") and d + b"\n2" in c, "rename of the odd directory")


# -- the root itself -----------------------------------------------------------------------------
async def test_deleting_the_root_yields_root_lost(root: Path, make_watch: Callable[..., Watch]) -> None:
    (root / "sub").mkdir()
    _w(root / "sub" / "f")
    w = make_watch(root)
    shutil.rmtree(root)
    await w.until(lambda c: c[0] == "root_lost", "root_lost after rm -rf root")


async def test_moving_the_root_yields_root_lost(fs: Path, root: Path, make_watch: Callable[..., Watch]) -> None:
    w = make_watch(root)
    os.rename(root, fs / "moved-root")
    await w.until(lambda c: c[0] == "root_lost", "root_lost after the root was renamed")


async def test_deleting_the_roots_parent_yields_root_lost(fs: Path, make_watch: Callable[..., Watch]) -> None:
    deep = fs / "parent" / "www"
    deep.mkdir(parents=True)
    _w(deep / "index.html")
    w = make_watch(deep, start=False)
    shutil.rmtree(fs / "parent")
    w.det.start(w.sink)
    await w.until(lambda c: c[0] == "root_lost", "root_lost after the root's parent was deleted")


# -- queue overflow and lifecycle ----------------------------------------------------------------
async def test_queue_overflow_rescans_root(fs: Path, root: Path, make_watch: Callable[..., Watch]) -> None:
    try:
        limit = int(Path("/proc/sys/fs/fanotify/max_queued_events").read_text())
    except OSError:
        limit = 16384
    if limit > 100_000:
        pytest.skip(f"fanotify queue limit {limit} is too large to overflow quickly")
    w = make_watch(root, start=False)
    out = fs / "outside" / "many"
    out.mkdir()
    for i in range(limit + 500):  # one (merged) event per new name
        (out / str(i)).touch()
    w.det.start(w.sink)
    await w.until(lambda c: c == ("rescan", b""), "rescan(b'') after FAN_Q_OVERFLOW")
    assert w.det.overflows >= 1


async def test_drain_is_safe_any_time(root: Path, make_watch: Callable[..., Watch]) -> None:
    w = make_watch(root, start=False)
    w.det.drain()  # before start: nothing to deliver to, must not raise or consume
    _w(root / "early")
    w.det.start(w.sink)
    w.det.drain()
    w.det.drain()
    await w.until(lambda c: c == ("changed", b"early", False, True), "event queued before start()")
    w.det.close()
    w.det.close()
    w.det.drain()  # after close: no-op
    assert w.det.fileno() == -1


# -- the filesystem of the test tmp dir (often the system's root filesystem) ---------------------
async def test_on_tmp_path_filesystem(tmp_path: Path, make_watch: Callable[..., Watch]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    ok, why = fanotify_available(root)
    if not ok:
        pytest.skip(f"fanotify unavailable on {tmp_path}: {why}")
    w = make_watch(root)
    _w(tmp_path / "outside" / "noise")
    (root / "d").mkdir()
    _w(root / "d" / "f")
    await w.until(lambda c: c == ("rescan", b"d"), "rescan(d)")
    await w.until(lambda c: c == ("changed", b"d/f", False, True), "changed(d/f)")
    await w.barrier()
    assert not [p for p in w.sink.paths() if b"noise" in p]


async def test_dir_chmod_then_rename_before_read_keeps_attrib(root: Path, make_watch: Callable[..., Watch]) -> None:
    """ATTRIB merged with the directory's MOVE_SELF must still produce a hint that reaches the new name:
    under the name it had at the chmod, carried along by the move that follows (or under the new one)."""
    (root / "d").mkdir()
    w = make_watch(root, start=False)
    os.chmod(root / "d", 0o700)
    os.rename(root / "d", root / "e")
    w.det.start(w.sink)
    await w.until(lambda c: c[0] == "moved", "moved(d -> e)")
    calls = w.sink.calls
    mv = calls.index(("moved", b"d", b"e", True))
    assert ("changed", b"d", False, False) in calls[:mv] or ("changed", b"e", False, False) in calls, calls


async def test_submount_below_root_is_listed_unwatched(root: Path, make_watch: Callable[..., Watch]) -> None:
    sub = root / "mnt"
    sub.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "fleetsync-sub", str(sub)]).returncode != 0:
        pytest.skip("cannot mount a nested tmpfs")
    try:
        w = make_watch(root)
        assert w.det.unwatched == {b"mnt"}
        w.det.close()
    finally:
        subprocess.run(["umount", str(sub)])


async def test_outside_churn_during_inside_renames(fs: Path, root: Path, make_watch: Callable[..., Watch]) -> None:
    """Trees created and deleted next to the root while directories move inside it: exact inside
    hints, nothing from outside, and no fallback rescans (events in directories deleted before
    they were resolved wait for the delete that locates them)."""
    w = make_watch(root)
    for i in range(10):
        (root / f"a{i}" / "b").mkdir(parents=True)
    await w.barrier()

    def outside_churn() -> None:
        for k in range(60):
            t = fs / "outside" / f"t{k % 3}"
            (t / "p" / "q" / "r").mkdir(parents=True)
            for j in range(5):
                (t / "p" / "q" / "r" / f"f{j}").touch()
            shutil.rmtree(t)

    churn = asyncio.create_task(asyncio.to_thread(outside_churn))
    for rnd in range(20):
        for i in range(10):
            src, dst = (f"a{i}", f"x{i}") if rnd % 2 == 0 else (f"x{i}", f"a{i}")
            os.rename(root / src, root / dst)
            _w(root / dst / "b" / f"f{rnd}")
        await asyncio.sleep(0)
    await churn
    await w.barrier()
    assert not [p for p in w.sink.paths() if p.startswith((b"t0", b"t1", b"t2", b"p/"))], "outside events leaked"
    for i in range(10):  # 20 rounds: back at a{i}; the last file was written as x{i}/b/f19 before the move
        assert ("moved", f"x{i}".encode(), f"a{i}".encode(), True) in w.sink.calls
        # reported under the directory's path when the event was read: before or after its move
        assert {("changed", f"{d}{i}/b/f19".encode(), False, True) for d in "xa"} & set(w.sink.calls), i
    assert w.det.fallback_rescans == 0


class ManifestSink(RecordingSink):
    """A sink that keeps the set of paths the way the indexer does: moves of known paths are applied
    at once (they are trusted records) and carry pending hints along; every other hint is checked
    against the disk afterwards. A rescan is an immediate walk in the indexer, so it is *not*
    carried along by later moves; it may run before or after them: `scan_now` walks at once
    and leaves a pending hint for each entry it finds or misses there (like the indexer's
    rescan: hints in transit follow moves read meanwhile), otherwise it walks at settle (as
    if the walk ran just after every move: what a later move took away is not found)."""

    def __init__(self, root: Path, known: set[bytes], *, verify_sources: bool = False,
                 scan_now: bool = False) -> None:
        super().__init__()
        self.root = os.fsencode(root)
        self.known = set(known)
        self.to_check: set[bytes] = set()  # pending hints: follow moves
        self.scans: set[bytes] = set()  # rescans: checked where they were asked for
        self.verify_sources = verify_sources  # also re-check the old side of every move
        self.scan_now = scan_now

    def moved(self, old: bytes, new: bytes, is_dir: bool) -> None:
        super().moved(old, new, is_dir)
        anc = new
        while b"/" in anc:  # like Indexer._commit_moves: missing ancestors of the destination first
            anc = anc.rpartition(b"/")[0]
            if anc not in self.known:
                self.known.add(anc)
                self.to_check.add(anc)  # (recorded from disk, or removed when it is not a directory)
        for p in [p for p in self.to_check if p == old or p.startswith(old + b"/")]:
            self.to_check.discard(p)  # like Indexer.moved: pending hints follow the rename
            self.to_check.add(new + p[len(old):])
        if self.verify_sources:
            self.to_check.add(old)
        if old not in self.known:  # like Indexer.moved: unknown source -> verify the destination
            self.to_check.add(new)
            return
        if not is_dir:
            self.to_check.add(new)  # Indexer.moved verifies a moved file's content
        for p in [p for p in self.known if p == new or p.startswith(new + b"/")]:
            self.known.discard(p)
        for p in [p for p in self.known if p == old or p.startswith(old + b"/")]:
            self.known.discard(p)
            self.known.add(new + p[len(old):])

    def _hint(self, path: bytes) -> None:
        self.to_check.add(path)

    def changed(self, path: bytes, *, writing: bool = False, closed: bool = False) -> None:
        super().changed(path, writing=writing, closed=closed)
        self._hint(path)

    def removed(self, path: bytes) -> None:
        super().removed(path)
        self._hint(path)

    def rescan(self, path: bytes) -> None:
        super().rescan(path)
        self.scans.add(path)
        if self.scan_now:
            self.scans.discard(path)
            full = os.path.join(self.root, path) if path else self.root
            self.to_check.update(p for p in self.known if p == path or p.startswith(path + b"/"))
            if os.path.lexists(full):
                self.to_check.update(self._walk(full) | ({path} if path else set()))

    def settle(self) -> set[bytes]:
        """Verify every hinted path against the disk, walk every rescanned one; return the result.

        Like the indexer: a hint records or removes the entry itself (a directory's removal takes
        what the manifest holds below it, but its content is not walked); a rescan compares the
        whole subtree with the disk.
        """
        for top in sorted(self.to_check | self.scans):
            self._check(top)
        self.to_check.clear()
        self.scans.clear()
        return self.known

    def _check(self, top: bytes) -> None:
        """Bring the entry top (and, for a rescan, everything below it) in line with the disk."""
        if top.startswith(b".barrier-"):
            return
        full = os.path.join(self.root, top) if top else self.root
        scan = top in self.scans
        exists = os.path.lexists(full)
        gone_below = scan or not exists or not os.path.isdir(full) or os.path.islink(full)
        if gone_below:
            for p in [p for p in self.known if p == top or p.startswith(top + b"/")]:
                if not os.path.lexists(os.path.join(self.root, p)):
                    self.known.discard(p)
        if top and exists:
            self.known.add(top)
        if scan and exists:
            self.known |= self._walk(full)

    def _walk(self, full: bytes) -> set[bytes]:
        """Root-relative paths of everything below the directory full (nothing for a non-directory)."""
        return {os.path.relpath(os.path.join(dp, n), self.root)
                for dp, dns, fns in os.walk(full) for n in dns + fns}


def _tree(root: Path) -> set[bytes]:
    broot = os.fsencode(root)
    out: set[bytes] = set()
    for dp, dns, fns in os.walk(broot):
        for n in dns + fns:
            rel = os.path.relpath(os.path.join(dp, n), broot)
            if not rel.startswith(b".barrier-"):
                out.add(rel)
    return out


@pytest.mark.parametrize("late", [pytest.param(True, id="read-late"), pytest.param(False, id="read-live")])
@pytest.mark.parametrize("arrival", ["mkdir", "move-in"])
async def test_new_directory_then_parent_renamed(fs: Path, root: Path, make_watch: Callable[..., Watch],
                                                 arrival: str, late: bool) -> None:
    """A directory appears and its parent is renamed right after: the scan of the new directory
    may walk the old name, so the hints must still lead the indexer to it (and to its content)."""
    (root / "P0" / "X").mkdir(parents=True)
    (fs / "outside" / "B").mkdir()
    _w(fs / "outside" / "B" / "inside.html")
    w = make_watch(root, start=False)
    sink = ManifestSink(root, _tree(root))
    w.sink = sink
    if not late:
        w.det.start(sink)
    if arrival == "mkdir":
        (root / "P0" / "X" / "B").mkdir()
    else:
        os.rename(fs / "outside" / "B", root / "P0" / "X" / "B")
    if not late:
        await w.barrier()  # the arrival is hinted under P0/...
    os.rename(root / "P0", root / "P1")
    if late:
        w.det.start(sink)
    await w.barrier()
    assert sink.settle() == _tree(root), sink.calls


@pytest.mark.parametrize("scenario", ["child-then-parent", "into-dir-then-dir-renamed"])
async def test_renames_read_late_stay_consistent(root: Path, make_watch: Callable[..., Watch],
                                                 scenario: str) -> None:
    """Directory handles resolve to *current* paths, which already include renames queued later:
    the hints must still bring a manifest from the old tree to the new one."""
    (root / "X" / "sub1").mkdir(parents=True)
    _w(root / "X" / "sub1" / "f")
    _w(root / "X" / "g")
    (root / "Q").mkdir()
    w = make_watch(root, start=False)
    sink = ManifestSink(root, _tree(root))
    w.sink = sink
    if scenario == "child-then-parent":
        os.rename(root / "X" / "sub1", root / "Y")  # read back as Z/sub1 -> Y ...
        os.rename(root / "X", root / "Z")  # ... because X is already Z
    else:
        os.rename(root / "X", root / "Q" / "Y")  # read back as X -> R/Y ...
        os.rename(root / "Q", root / "R")  # ... because Q is already R
    w.det.start(sink)
    await w.barrier()
    assert sink.settle() == _tree(root), sink.calls


def _random_ops(root: Path, outside: Path, rng: random.Random, n: int) -> list[tuple[bytes, bytes]]:
    """Apply n random tree operations (mostly inside root, some across the boundary or outside).

    Returns the renames done inside the root, as root-relative (old, new) at the time they happened.
    """
    renames: list[tuple[bytes, bytes]] = []
    broot, bout = os.fsencode(root), os.fsencode(outside)
    names = [b"a", b"b", b"c", b"caf\xe9", b"n\nl", b"d d"]

    def entries(base: bytes, dirs_only: bool = False) -> list[bytes]:
        out = []
        for dp, dns, fns in os.walk(base):
            out += [os.path.join(dp, x) for x in dns]
            if not dirs_only:
                out += [os.path.join(dp, x) for x in fns]
        return out

    for _ in range(n):
        base = bout if rng.random() < 0.15 else broot
        dirs = [base] + entries(base, dirs_only=True)
        op = rng.choice(["mkdir", "create", "create", "rename", "rename_dir", "delete", "rmtree", "chmod", "cross"])
        try:
            if op == "mkdir":
                os.mkdir(os.path.join(rng.choice(dirs), rng.choice(names)))
            elif op == "create":
                _w(os.path.join(rng.choice(dirs), rng.choice(names) + b".html"), rng.randbytes(rng.randint(0, 64)))
            elif op in ("rename", "rename_dir", "cross"):
                pool = entries(base, dirs_only=(op == "rename_dir"))
                if op == "cross":
                    pool = entries(broot) + entries(bout)
                    dirs = [broot, bout] + entries(broot, True) + entries(bout, True)
                if pool:
                    src = rng.choice(pool)
                    dst = os.path.join(rng.choice(dirs), rng.choice(names))
                    os.rename(src, dst)
                    if src.startswith(broot + b"/") and dst.startswith(broot + b"/"):
                        renames.append((src[len(broot) + 1:], dst[len(broot) + 1:]))
            elif op == "delete":
                files = [p for p in entries(base) if not os.path.isdir(p)]
                if files:
                    os.unlink(rng.choice(files))
            elif op == "rmtree":
                sub = entries(base, dirs_only=True)
                if sub:
                    shutil.rmtree(rng.choice(sub))
            elif op == "chmod":
                pool = entries(base)
                if pool:
                    os.chmod(rng.choice(pool), rng.choice([0o700, 0o755, 0o644]))
        except OSError:
            pass  # EINVAL (dir into itself), ENOTEMPTY, EISDIR...: part of the randomness
    return renames


@pytest.mark.parametrize("scan_now", [pytest.param(True, id="walk-at-once"), pytest.param(False, id="walk-late")])
@pytest.mark.parametrize("late", [pytest.param(True, id="read-late"), pytest.param(False, id="read-live")])
@pytest.mark.parametrize("seed", range(40))
async def test_random_operations_replay_to_the_tree(fs: Path, root: Path, make_watch: Callable[..., Watch],
                                                    seed: int, late: bool, scan_now: bool) -> None:
    """Random operations, read live or all at once afterwards: every move names a real rename,
    and re-checking every hinted path turns the old tree into the new one (no change unhinted)."""
    rng = random.Random(seed)
    (root / "a" / "b").mkdir(parents=True)
    _w(root / "a" / "f.html")
    (fs / "outside" / "o").mkdir()
    w = make_watch(root, start=False)
    sink = ManifestSink(root, _tree(root), verify_sources=True, scan_now=scan_now)
    w.sink = sink
    if not late:
        w.det.start(sink)
    renames: set[tuple[bytes, bytes]] = set()
    for _ in range(4):
        renames.update(_random_ops(root, fs / "outside", rng, 20))
        await asyncio.sleep(0)
    if late:
        w.det.start(sink)
    await w.barrier()
    assert not [c for c in sink.calls if c[0] == "root_lost"], sink.calls
    bad_moves = [c for c in sink.calls if c[0] == "moved" and (c[1], c[2]) not in renames]
    assert not bad_moves, f"moves that name no real rename: {bad_moves}; renames done: {sorted(renames)}"
    assert sink.settle() == _tree(root), sink.calls


# -- hints name the path at their event (regression: a rename applied twice) ---------------------
# Handles resolve to *current* paths. The indexer reads hints in stream order and carries pending
# hints along with every move, so a hint sent with a path that already includes a later rename
# was moved a second time when that rename's move arrived: lost whenever a name was reused.
NAME_REUSE = {
    # X/f written, then X and Y swap names through T: the current path Y/f, carried by Y -> X,
    # became X/f (the file is at Y/f).
    "swap": (["X", "Y"], "X/f", [("X", "T"), ("Y", "X"), ("T", "Y")]),
    # A/B/f written, A -> T, then T/B takes the name A: the current path A/f, carried by A -> T,
    # became T/f.
    "child-takes-parents-name": (["A/B"], "A/B/f", [("A", "T"), ("T/B", "A")]),
    # deeper: a/b/c/f written, the chain of renames brings c back to the name a/b/c by other dirs.
    "deep-chain": (["a/b/c", "z"], "a/b/c/f", [("a/b", "z/b"), ("z/b/c", "a/b"), ("a/b", "a/c"),
                                                ("z/b", "a/b"), ("a/c", "a/b/c")]),
}


def _renames(evs: list[Any]) -> list[int]:
    """Indexes of the FAN_RENAME events in a read."""
    return [i for i, e in enumerate(evs) if e.mask & 0x10000000]


def _split_first_read(det: FanotifyDetector, cuts: Callable[[list[Any]], list[int]]) -> None:
    """Make the detector's first read return only its events up to the first cut, and the reads
    after it the parts between the next cuts: renames that happened while the part before was
    being handled (its paths already resolve to after them)."""
    real_read = det._read_all
    parts: list[list[Any]] = []
    done = False

    def read_split() -> list[Any]:
        nonlocal done
        if parts:
            return parts.pop(0)
        evs = real_read()
        if not done and evs:
            done = True
            bounds = [0] + [c for c in cuts(evs) if 0 < c < len(evs)] + [len(evs)]
            parts.extend(evs[a:b] for a, b in zip(bounds, bounds[1:]) if a < b)
            return parts.pop(0)
        return evs
    det._read_all = read_split  # type: ignore[method-assign]


def _read_in_two(det: FanotifyDetector, nth_rename: int) -> None:
    """Split the first read before its nth directory-entry rename (0-based)."""
    _split_first_read(det, lambda evs: _renames(evs)[nth_rename:nth_rename + 1])


@pytest.mark.parametrize("split", [pytest.param(False, id="one-batch"), pytest.param(True, id="next-batch")])
@pytest.mark.parametrize("scenario", list(NAME_REUSE))
async def test_hint_is_not_moved_twice_when_names_are_reused(root: Path, make_watch: Callable[..., Watch],
                                                              scenario: str, split: bool) -> None:
    """A file written, then directory renames that reuse names, all read after the fact.

    `next-batch` reads the write alone and the renames in the following read, while the write's
    path is already resolved after the renames (the window between a rename's dentry move and its
    event): the hints of the previous batch are sent again after each directory move."""
    dirs, written, renames = NAME_REUSE[scenario]
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    _w(root / "keep.html")
    w = make_watch(root, start=False)
    sink = ManifestSink(root, _tree(root))
    w.sink = sink
    _w(root / written, b"new content")
    for src, dst in renames:
        os.rename(root / src, root / dst)
    if split:
        _read_in_two(w.det, nth_rename=0)
    w.det.start(sink)
    w.det.drain()
    w.det.drain()
    await w.barrier()
    assert sink.settle() == _tree(root), sink.calls


# -- events elsewhere on the filesystem are cheap ------------------------------------------------
async def test_outside_directories_are_cached_as_outside(fs: Path, root: Path, make_watch: Callable[..., Watch],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """After one resolution, events in a directory outside the root are dropped without open_by_handle_at."""
    import fleetsync.detect.fanotify as fan

    out = fs / "outside" / "busy"
    out.mkdir()
    w = make_watch(root)
    w.det.ignored_dirs = -1  # as on kernels without FAN_MARK_IGNORE: every event is read
    _w(out / "first")
    await w.barrier()
    calls: list[bytes] = []
    real = fan.open_by_handle

    def counting(mount_fd: int, handle: bytes, flags: int = os.O_PATH) -> int:
        calls.append(handle)
        return real(mount_fd, handle, flags)
    monkeypatch.setattr(fan, "open_by_handle", counting)
    for i in range(20):
        _w(out / f"f{i}")
        w.det.drain()  # one batch per write: the per-batch memo does not help here
    await w.barrier()
    assert w.det._res.outside_hits >= 20, w.det._res.outside_hits
    assert calls == [], f"{len(calls)} open_by_handle_at calls for events outside the root"
    assert not [p for p in w.sink.paths() if not p.startswith(b".barrier-")], w.sink.calls


async def test_kernel_drops_events_of_directories_outside_the_root(fs: Path, root: Path,
                                                                   make_watch: Callable[..., Watch]) -> None:
    """An ignore mark on a directory known to be outside: the kernel does not even queue its events."""
    out = fs / "outside" / "busy"
    out.mkdir()
    w = make_watch(root)
    _w(out / "first")
    await w.barrier()
    if w.det.ignored_dirs < 0:
        pytest.skip("kernel without FAN_MARK_IGNORE (Linux < 6.0): covered by the userspace cache test")
    assert w.det.ignored_dirs >= 1
    before = w.det.events
    for i in range(50):
        _w(out / f"f{i}")
        (out / f"f{i}").chmod(0o600)
    (out / "sub").mkdir()
    await w.barrier()
    # Only the barrier's own events were read (its create, modify and close in the root).
    assert w.det.events - before <= 4, w.det.events - before
    assert not [p for p in w.sink.paths() if not p.startswith(b".barrier-")], w.sink.calls


@pytest.mark.parametrize("use_rename", RENAME_MODES)
async def test_cached_outside_directory_moved_into_the_root(fs: Path, root: Path, make_watch: Callable[..., Watch],
                                                            use_rename: bool) -> None:
    """A directory (and one below it) known to be outside, moved into the root: later events are reported."""
    sub = fs / "outside" / "D" / "sub"
    sub.mkdir(parents=True)
    w = make_watch(root, use_rename=use_rename)
    _w(sub / "warm")  # resolves D/sub: outside, cached
    _w(fs / "outside" / "D" / "warm")
    await w.barrier()
    assert len(w.det._res.outside) >= 2
    os.rename(fs / "outside" / "D", root / "D")
    # Written before the rename is read: the kernel may still drop its events (ignore marks on D and
    # D/sub) until the detector flushes them; the moved-in directory is rescanned after that flush.
    _w(root / "D" / "sub" / "early.html")
    await w.until(lambda c: c in (("rescan", b"D"), ("changed", b"D/sub/early.html", False, True)),
                  "rescan(D) or changed(D/sub/early.html)")
    _w(root / "D" / "sub" / "later.html")
    await w.until(lambda c: c == ("changed", b"D/sub/later.html", False, True), "changed(D/sub/later.html)")
    (root / "E").mkdir()
    os.rename(root / "D", root / "E" / "D")  # and it keeps being followed inside
    _w(root / "E" / "D" / "sub" / "again.html")
    await w.until(lambda c: c == ("changed", b"E/D/sub/again.html", False, True), "changed(E/D/sub/again.html)")


async def test_neighbour_rm_r_under_an_ignored_directory_does_not_rescan_root(
        fs: Path, root: Path, make_watch: Callable[..., Watch]) -> None:
    """A tree made and removed below a directory with a kernel ignore mark, before its events are read.

    The events from inside the removed directories can only be placed through the deletions of
    those directories; if the kernel dropped those (an ignore mark with FAN_ONDIR on the parent),
    each event became a rescan of the whole root.
    """
    out = fs / "outside" / "busy"
    out.mkdir()
    w = make_watch(root)
    _w(out / "first")
    await w.barrier()
    for i in range(3):  # no await: the loop reads these only after the trees are gone
        d = out / f"t{i}" / "a" / "b"
        d.mkdir(parents=True)
        _w(d / "f")
        shutil.rmtree(out / f"t{i}")
    await w.barrier()
    await asyncio.sleep(LIMBO_WAIT + 0.1)  # anything parked waits this long before it falls back
    await w.barrier()
    assert w.det.fallback_rescans == 0
    assert not [p for p in w.sink.paths() if not p.startswith(b".barrier-")], w.sink.calls


async def test_directory_renamed_between_outside_parents_keeps_the_outside_cache(
        fs: Path, root: Path, make_watch: Callable[..., Watch]) -> None:
    """A neighbour renaming its own directories does not flush what is known to lie outside."""
    a = fs / "outside" / "A" / "sub"
    a.mkdir(parents=True)
    (fs / "other").mkdir()
    w = make_watch(root)
    _w(a / "warm")
    _w(fs / "outside" / "A" / "warm")
    await w.barrier()
    assert len(w.det._res.outside) >= 2
    forgets: list[None] = []
    real_forget = w.det._res.on_forget
    w.det._res.on_forget = lambda: (forgets.append(None), real_forget())[1]  # type: ignore[method-assign]
    os.rename(fs / "outside" / "A", fs / "other" / "A")  # "other" was never seen: resolved, outside
    await w.barrier()
    assert forgets == [], "the outside cache (and the kernel ignore marks) were flushed"
    _w(fs / "other" / "A" / "sub" / "after")
    await w.barrier()
    assert not [p for p in w.sink.paths() if not p.startswith(b".barrier-")], w.sink.calls


# -- a directory renamed while the batch before it is handled (read in the next batch) ----------
@pytest.mark.parametrize("scan_now", [pytest.param(True, id="walk-at-once"), pytest.param(False, id="walk-late")])
@pytest.mark.parametrize("arrival", ["moved-within", "moved-in", "mkdir"])
async def test_directory_placed_in_a_directory_renamed_over_another(fs: Path, root: Path,
                                                                    make_watch: Callable[..., Watch],
                                                                    arrival: str, scan_now: bool) -> None:
    """x (a directory with content) arrives in P0, then P0 is renamed over the empty D; the
    rename is read in the next batch, so x was already resolved as D/x. The indexer replaces
    what it holds under D by P0's entries when the move arrives: x and its content must still
    be found (a hint records only the directory itself, a rescan walks it)."""
    (root / "A" / "x" / "sub").mkdir(parents=True)
    _w(root / "A" / "x" / "sub" / "f.html")
    (root / "P0").mkdir()
    (root / "D").mkdir()
    (fs / "outside" / "x" / "sub").mkdir(parents=True)
    _w(fs / "outside" / "x" / "sub" / "f.html")
    w = make_watch(root, start=False)
    sink = ManifestSink(root, _tree(root), scan_now=scan_now)
    w.sink = sink
    if arrival == "moved-within":
        os.rename(root / "A" / "x", root / "P0" / "x")
        nth = 1
    elif arrival == "moved-in":
        os.rename(fs / "outside" / "x", root / "P0" / "x")
        nth = 1
    else:
        (root / "P0" / "x" / "sub").mkdir(parents=True)
        _w(root / "P0" / "x" / "sub" / "f.html")
        nth = 0
    os.rename(root / "P0", root / "D")
    _read_in_two(w.det, nth_rename=nth)
    w.det.start(sink)
    w.det.drain()
    w.det.drain()
    await w.barrier()
    assert sink.settle() == _tree(root), sink.calls


async def test_rename_read_two_batches_later_after_a_full_read(root: Path, make_watch: Callable[..., Watch],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, with a read in between that stopped at MAX_EVENTS_PER_DRAIN: the rename done
    while the first batch was handled comes two reads later, and still finds its hints."""
    import fleetsync.detect.fanotify as fan
    (root / "A" / "x" / "sub").mkdir(parents=True)
    _w(root / "A" / "x" / "sub" / "f.html")
    (root / "P0").mkdir()
    (root / "D").mkdir()
    w = make_watch(root, start=False)
    sink = ManifestSink(root, _tree(root))
    w.sink = sink
    os.rename(root / "A" / "x", root / "P0" / "x")
    _w(root / "g.html")
    os.rename(root / "P0", root / "D")
    sizes: list[int] = []

    def cuts(evs: list[Any]) -> list[int]:
        r = _renames(evs)
        sizes.append(r[1] - r[0] - 1)  # the middle read: everything between the two renames
        return [r[0] + 1, r[1]]
    _split_first_read(w.det, cuts)
    real_read = w.det._read_all

    def read() -> list[Any]:
        evs = real_read()
        if sizes:  # the middle read is "full" (the kernel had more queued)
            monkeypatch.setattr(fan, "MAX_EVENTS_PER_DRAIN", sizes[0])
        return evs
    w.det._read_all = read  # type: ignore[method-assign]
    w.det.start(sink)
    for _ in range(3):
        w.det.drain()
    monkeypatch.setattr(fan, "MAX_EVENTS_PER_DRAIN", 65536)
    await w.barrier()
    assert w.det.reemitted > 0
    assert sink.settle() == _tree(root), sink.calls
