"""inotify detector against the real kernel: watch bookkeeping across renames."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from fleetsync.detect.inotify import InotifyDetector
from tests.helpers.sinks import RecordingSink

pytestmark = pytest.mark.skipif(not hasattr(os, "uname") or os.uname().sysname != "Linux",
                                reason="inotify is Linux-only")


def _watch(root: Path, steps: Callable[[InotifyDetector], Awaitable[None]]) -> RecordingSink:
    """Run steps against a started detector on root; the hints it sent."""
    async def run() -> RecordingSink:
        det = InotifyDetector(str(root))
        sink = RecordingSink()
        det.start(sink)
        try:
            await steps(det)
        finally:
            det.close()
        return sink
    return asyncio.run(run())


def test_subtree_moved_into_a_directory_created_a_moment_before_stays_watched(tmp_path: Path) -> None:
    """mkdir k/p, and s/sub1 -> k/p/c between the watch on k/p being added and k/p being listed:
    watching k/p then finds c and re-keys the moved subtree's watches (inotify_add_watch returns
    the existing ones), so the move read next must not drop them (a soak lost every later change
    below the moved directory)."""
    root = tmp_path / "root"
    (root / "s" / "sub1" / "xm" / "me").mkdir(parents=True)
    (root / "k").mkdir()

    async def steps(det: InotifyDetector) -> None:
        (root / "k" / "p").mkdir()
        det.drain()  # k/p is watched (and was listed empty)
        os.rename(root / "s" / "sub1", root / "k" / "p" / "c")
        det.watch_tree(b"k/p")  # the listing that raced with the rename (as _appeared does)
        det.drain()
        await asyncio.sleep(0.05)  # the move pair is complete; nothing left to flush
        (root / "k" / "p" / "c" / "xm" / "me" / "f.html").write_bytes(b"new")
        det.drain()

    sink = _watch(root, steps)
    assert ("moved", b"s/sub1", b"k/p/c", True) in sink.calls, sink.calls
    assert ("changed", b"k/p/c/xm/me/f.html", False, True) in sink.calls, sink.calls


def test_directory_renamed_over_an_empty_watched_directory_stays_watched(tmp_path: Path) -> None:
    """s/a -> k/b where k/b was an empty watched directory: the victim's watch ends (IN_IGNORED)
    without taking the moved directory's watches or its path with it."""
    root = tmp_path / "root"
    (root / "s" / "a" / "x").mkdir(parents=True)
    (root / "k" / "b").mkdir(parents=True)

    async def steps(det: InotifyDetector) -> None:
        os.rename(root / "s" / "a", root / "k" / "b")
        det.drain()
        await asyncio.sleep(0.05)
        det.drain()  # the victim's IN_IGNORED, if it came late
        (root / "k" / "b" / "f.html").write_bytes(b"1")
        (root / "k" / "b" / "x" / "g.html").write_bytes(b"2")
        det.drain()

    sink = _watch(root, steps)
    assert ("moved", b"s/a", b"k/b", True) in sink.calls, sink.calls
    assert ("changed", b"k/b/f.html", False, True) in sink.calls, sink.calls
    assert ("changed", b"k/b/x/g.html", False, True) in sink.calls, sink.calls


@pytest.mark.parametrize("reuse", ["moved-in", "mkdir"])
def test_name_reused_after_an_unpaired_move_out_keeps_its_new_watches(tmp_path: Path, reuse: str) -> None:
    """P -> d/new/B where d/new was created a moment before (its watch comes too late for the
    IN_MOVED_TO: the IN_MOVED_FROM stays unpaired), then C -> P (or mkdir P/k). The unpaired move
    is flushed as a move out after the pairing wait; it must drop only the moved-away directory's
    watches, not the ones now keyed under the reused name P (a soak lost every later change below P)."""
    root = tmp_path / "root"
    (root / "s" / "P" / "old").mkdir(parents=True)
    (root / "o" / "C" / "k").mkdir(parents=True)
    (root / "d").mkdir()

    async def steps(det: InotifyDetector) -> None:
        (root / "d" / "new").mkdir()
        os.rename(root / "s" / "P", root / "d" / "new" / "B")  # before d/new is watched
        if reuse == "moved-in":
            os.rename(root / "o" / "C", root / "s" / "P")
        else:
            (root / "s" / "P" / "k").mkdir(parents=True)
        det.drain()
        await asyncio.sleep(0.1)  # past the pairing wait: the unpaired IN_MOVED_FROM is flushed
        det.drain()
        (root / "s" / "P" / "k" / "f.html").write_bytes(b"new")
        (root / "d" / "new" / "B" / "old" / "g.html").write_bytes(b"moved")
        det.drain()

    sink = _watch(root, steps)
    assert ("changed", b"s/P/k/f.html", False, True) in sink.calls, sink.calls
    assert ("changed", b"d/new/B/old/g.html", False, True) in sink.calls, sink.calls
