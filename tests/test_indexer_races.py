"""Indexer races: a rename read while a batch is being observed must not lose what the batch held."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from fleetsync.entry import DIR, FILE
from fleetsync.index import indexer as indexer_mod
from fleetsync.index.indexer import Indexer
from fleetsync.journal.sqlite import SqliteJournal


def _indexer(tmp_path: Path) -> tuple[Path, SqliteJournal, Indexer]:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    j = SqliteJournal(str(tmp_path / "o.db"), content_index=False)
    return root, j, Indexer(str(root), j, settle=0.0)


async def _settle(ix: Indexer) -> None:
    """Run batches until no hint or move is left."""
    for _ in range(50):
        await asyncio.sleep(0.005)
        await ix.process_ready()
        if not ix.pending and not ix._moves and not ix.scanning:
            return
    raise AssertionError(f"indexer did not settle: pending {list(ix.pending)}")


async def _one_batch(ix: Indexer) -> None:
    """Let the hints settle, then run one batch."""
    await asyncio.sleep(0.01)
    await ix.process_ready()


def _batch_with_rename(ix: Indexer, root: Path, old: str, new: str, *, before_look: bool) -> None:
    """Run one batch during which directory old is renamed to new on disk and the move is
    dispatched on the loop (before or after the worker thread looks at the batch), then settle."""
    real_observe = ix._observe

    async def run() -> None:
        loop = asyncio.get_running_loop()
        reported = threading.Event()

        def rename() -> None:
            os.rename(root / old, root / new)
            loop.call_soon_threadsafe(lambda: (ix.moved(old.encode(), new.encode(), True), reported.set()))

        def observe(ready, known, *rest):  # type: ignore[no-untyped-def]
            if before_look:
                rename()
                assert reported.wait(5)  # dispatched before the look
                return real_observe(ready, known, *rest)
            out = real_observe(ready, known, *rest)
            rename()
            return out

        ix._observe = observe  # type: ignore[method-assign]
        await asyncio.sleep(0.005)
        await ix.process_ready()
        ix._observe = real_observe  # type: ignore[method-assign]
        await _settle(ix)

    asyncio.run(run())


@pytest.mark.parametrize("what", ["dir", "file", "nested"])
def test_directory_rename_during_observation_keeps_the_new_entry(tmp_path: Path, what: str) -> None:
    """a/x is being looked at when a -> b happens (and is reported): b/x must still be recorded.

    Without carrying the batch's in-flight paths along with the move, a/x is found gone (the
    manifest never knew it, so nothing is recorded) and the move a -> b knows nothing under a.
    """
    root, j, ix = _indexer(tmp_path)
    ix.changed(b"a", closed=True)
    asyncio.run(_settle(ix))
    assert j.get(b"a") is not None and j.get(b"a").kind == DIR

    target = b"a/x/y" if what == "nested" else b"a/x"
    if what == "file":
        (root / "a" / "x").write_bytes(b"content")
    else:
        (root / "a" / "x" / "y" if what == "nested" else root / "a" / "x").mkdir(parents=True)
    ix.changed(target, closed=True)
    _batch_with_rename(ix, root, "a", "b", before_look=True)
    moved = b"b" + target[1:]
    got = j.get(moved)
    assert got is not None, f"{moved!r} lost: manifest has {sorted(r[0] for r in j.iter_local(b''))}"
    assert got.kind == (FILE if what == "file" else DIR)
    assert j.get(target) is None and j.get(b"a") is None
    if what == "nested":
        assert j.get(b"b/x") is not None


def _walk_hint_across_a_move(tmp_path: Path, *, remembered: bool) -> SqliteJournal:
    """A rescan listed a/x, then a -> b is read before the walk's hint for a/x reaches the loop."""
    root, j, ix = _indexer(tmp_path)
    ix.changed(b"a", closed=True)
    asyncio.run(_settle(ix))
    (root / "a" / "x").mkdir()

    async def run() -> None:
        ix.scanning += 1  # a rescan thread is walking; it has listed a/x
        os.rename(root / "a", root / "b")
        ix.moved(b"a", b"b", True)  # the move is dispatched first ...
        if not remembered:
            assert not ix._scan_moves
        ix._scan_hint(b"a/x")  # ... then the walk's hint arrives, naming the old place
        ix._scan_done()
        assert not ix._scan_moves  # forgotten once no rescan runs
        await _settle(ix)

    asyncio.run(run())
    return j


def test_rescan_hint_in_transit_across_a_directory_move(tmp_path: Path) -> None:
    """A rescan listed a/x, then a -> b was read before the hint reached the loop: b/x is recorded."""
    j = _walk_hint_across_a_move(tmp_path, remembered=True)
    assert j.get(b"b/x") is not None and j.get(b"a") is None


@pytest.mark.parametrize("known", [False, True])
def test_directory_move_reported_after_the_batch(tmp_path: Path, known: bool) -> None:
    """a -> b happened before a/x was looked at, but its event is read only after that batch.

    The batch finds a/x gone (records its deletion if the manifest knew it); the late move must
    still have b/x looked at, or b/x is missing everywhere.
    """
    root, j, ix = _indexer(tmp_path)
    ix.changed(b"a", closed=True)
    if known:
        (root / "a" / "x").write_bytes(b"v1")
        ix.changed(b"a/x", closed=True)
    asyncio.run(_settle(ix))
    (root / "a" / "x").write_bytes(b"v2")
    ix.changed(b"a/x", closed=True)
    os.rename(root / "a", root / "b")

    async def run() -> None:
        await asyncio.sleep(0.005)
        await ix.process_ready()  # a/x: gone
        ix.moved(b"a", b"b", True)  # the delayed event
        await _settle(ix)

    asyncio.run(run())
    got = j.get(b"b/x")
    assert got is not None and got.kind == FILE and j.get(b"a/x") is None


def test_rescans_of_one_path_coalesce_and_the_last_request_is_answered(tmp_path: Path) -> None:
    """Overflows ask for the root again and again: one walk at a time, plus one rerun for them all."""
    root, j, ix = _indexer(tmp_path)
    walks: list[bytes] = []
    gate = threading.Event()
    real = ix.diff_subtree

    def diff(top: bytes):  # type: ignore[no-untyped-def]
        walks.append(top)
        if len(walks) == 1:
            assert gate.wait(5)  # the first walk is slow
        return real(top)

    ix.diff_subtree = diff  # type: ignore[method-assign]

    async def run() -> None:
        ix.rescan(b"")
        await asyncio.sleep(0.05)
        (root / "late.html").write_bytes(b"made while the first walk ran")  # after it listed the root
        for _ in range(5):
            ix.rescan(b"")
        assert ix.scanning == 2  # the running walk and one rerun
        gate.set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            await ix.process_ready()
            if not ix.scanning and not ix.pending:
                break

    asyncio.run(run())
    assert walks == [b"", b""]
    assert j.get(b"late.html") is not None


def test_scanner_mode_writer_finishing_during_the_proc_check(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """No close events (scanner), read leases unavailable (the /proc fallback): a file hashed empty
    whose writer wrote and closed while /proc was being read (so no process holds it any more)
    must not be recorded empty."""
    monkeypatch.setattr(indexer_mod, "open_for_write", lambda fd: None)
    root = tmp_path / "root"
    root.mkdir()
    f = root / "page.html"
    f.write_bytes(b"")
    old = time.time() - 5
    os.utime(f, (old, old))  # quiet for longer than the settle window
    j = SqliteJournal(str(tmp_path / "o.db"), content_index=False)
    ix = Indexer(str(root), j, settle=0.0, close_events=False)
    real = ix._held_open

    def held_open(fresh: bool = False):  # type: ignore[no-untyped-def]
        if fresh:
            f.write_bytes(b"the real content")  # the stalled writer finishes meanwhile
            return set()
        return real(fresh)

    ix._held_open = held_open  # type: ignore[method-assign]
    ix.changed(b"page.html", closed=True)

    async def run() -> None:
        await asyncio.sleep(0.01)
        await ix.process_ready()
        ix._held_open = real  # type: ignore[method-assign]
        await _settle(ix)

    asyncio.run(run())
    got = j.get(b"page.html")
    assert got is not None and got.size == len(b"the real content")
    recs = [r for r in j.read(0, 100) if r.path == b"page.html"]
    assert all(r.entry is not None and r.entry.size > 0 for r in recs), recs


def test_new_parent_moved_before_the_batch_is_recorded_keeps_its_mode(tmp_path: Path) -> None:
    """a/f is looked at; a (new, chmod 0711, not yet settled itself) is renamed to b before the
    batch is recorded. The parent must not be recorded from nothing (a default mode the move then
    carries to b): b must end up with the mode it has on disk."""
    root, j, ix = _indexer(tmp_path)
    (root / "n").mkdir()
    (root / "n" / "f").write_bytes(b"content")
    os.chmod(root / "n", 0o711)
    ix.changed(b"n/f", closed=True)  # n's own hint is not in this batch
    _batch_with_rename(ix, root, "n", "b", before_look=False)  # n/f is there when it is looked at
    b = j.get(b"b")
    assert b is not None and b.kind == DIR and b.mode == 0o711, b
    assert j.get(b"b/f") is not None and j.get(b"n") is None and j.get(b"n/f") is None


def test_move_onto_a_directory_the_manifest_holds_entries_under_rescans_it(tmp_path: Path) -> None:
    """A directory rename can only replace an empty directory on disk. If the manifest holds
    entries under the destination (a move hint placed under the wrong parent), those entries
    would be deleted everywhere with the replaced directory: the destination is compared with
    the disk instead."""
    root, j, ix = _indexer(tmp_path)
    (root / "t" / "d1" / "d0").mkdir(parents=True)
    (root / "t" / "d1" / "d0" / "f").write_bytes(b"kept")
    (root / "s" / "d1").mkdir(parents=True)
    for p in (b"t", b"t/d1", b"t/d1/d0", b"t/d1/d0/f", b"s", b"s/d1"):
        ix.changed(p, closed=True)
    asyncio.run(_settle(ix))
    # On disk the real order was: s/d1 replaced an empty t/d1, then d0 moved in. The detector
    # reported the move of d0 first (under the old t/d1), then s/d1 -> t/d1.
    shutil.rmtree(root / "t" / "d1")
    os.rename(root / "s" / "d1", root / "t" / "d1")
    (root / "t" / "d1" / "d0").mkdir()
    (root / "t" / "d1" / "d0" / "f").write_bytes(b"kept")
    os.utime(root / "t" / "d1" / "d0" / "f", ns=(0, j.get(b"t/d1/d0/f").mtime_ns))

    async def run() -> None:
        ix.moved(b"s/d1", b"t/d1", True)
        await _settle(ix)

    asyncio.run(run())
    assert j.get(b"t/d1/d0") is not None and j.get(b"t/d1/d0/f") is not None
    assert j.get(b"s/d1") is None


def test_directory_moves_past_the_bound_during_a_rescan_walk_their_destination(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SCAN_MOVES_MAX, a move read during a rescan is not remembered for the rescan's hints
    (each hint is checked against all of them); its destination is rescanned instead."""
    import fleetsync.index.indexer as indexer_mod

    monkeypatch.setattr(indexer_mod, "SCAN_MOVES_MAX", 0)
    j = _walk_hint_across_a_move(tmp_path, remembered=False)
    assert j.get(b"b/x") is not None and j.get(b"a") is None


def test_move_under_a_new_parent_moved_on_before_it_is_recorded(tmp_path: Path) -> None:
    """f is moved into a new directory n (chmod 0711), and n is renamed to b, before the moves
    are recorded. n, unknown to the manifest and gone from disk, must not be recorded from
    nothing (a default mode its own move then carries to b): b keeps the mode it has on disk."""
    root, j, ix = _indexer(tmp_path)
    (root / "f").write_bytes(b"content")
    ix.changed(b"f", closed=True)
    asyncio.run(_settle(ix))
    (root / "n").mkdir()
    os.chmod(root / "n", 0o711)
    os.rename(root / "f", root / "n" / "f")
    os.rename(root / "n", root / "b")

    async def run() -> None:
        ix.moved(b"f", b"n/f", False)
        ix.moved(b"n", b"b", True)
        await _settle(ix)

    asyncio.run(run())
    b = j.get(b"b")
    assert b is not None and b.kind == DIR and b.mode == 0o711, b
    got = j.get(b"b/f")
    assert got is not None and got.kind == FILE and got.size == len(b"content")
    assert j.get(b"f") is None and j.get(b"n") is None and j.get(b"n/f") is None


def test_moves_into_a_directory_an_earlier_move_of_the_batch_made(tmp_path: Path) -> None:
    """q/iow -> w/iow, then g -> w/iow/g, w/iow/else/x -> w/iow/b and w/iow -> k/iow, all reported
    in one batch after the fact. w/iow is in the manifest only through the first move of the
    batch and no longer on disk: the moves into it must still be recorded (a soak lost both)."""
    root, j, ix = _indexer(tmp_path)
    for d in ("q/iow/else/x/sub", "g", "w", "k"):
        (root / d).mkdir(parents=True)
    (root / "q" / "iow" / "else" / "x" / "sub" / "f").write_bytes(b"f")
    (root / "g" / "h").write_bytes(b"h")
    os.chmod(root / "q" / "iow", 0o711)
    for p in (b"q", b"q/iow", b"q/iow/else", b"q/iow/else/x", b"q/iow/else/x/sub", b"q/iow/else/x/sub/f",
              b"g", b"g/h", b"w", b"k"):
        ix.changed(p, closed=True)
    asyncio.run(_settle(ix))
    moves = [("q/iow", "w/iow"), ("g", "w/iow/g"), ("w/iow/else/x", "w/iow/b"), ("w/iow", "k/iow")]
    for old, new in moves:
        os.rename(root / old, root / new)

    async def run() -> None:
        for old, new in moves:
            ix.moved(old.encode(), new.encode(), True)
        await _settle(ix)

    asyncio.run(run())
    want = {b"q", b"w", b"k", b"k/iow", b"k/iow/else", b"k/iow/g", b"k/iow/g/h", b"k/iow/b", b"k/iow/b/sub",
            b"k/iow/b/sub/f"}
    assert {p for p, _ in j.snapshot()[1]} == want
    iow = j.get(b"k/iow")
    assert iow is not None and iow.mode == 0o711, iow
    assert not [r for r in j.read(0, 1000) if r.op == "del"], "nothing was deleted"


def test_move_into_a_parent_gone_from_disk_is_found_where_the_batch_took_it(tmp_path: Path) -> None:
    """d -> a/n/d, where the manifest lacks n and n is no longer on disk because a -> c followed
    in the same batch: the move cannot be recorded, but d and its content are found at c/n/d
    (and n keeps its mode)."""
    root, j, ix = _indexer(tmp_path)
    (root / "d").mkdir()
    (root / "d" / "g").write_bytes(b"content")
    for p in (b"d", b"d/g", b"a"):
        ix.changed(p, closed=True)
    asyncio.run(_settle(ix))
    (root / "a" / "n").mkdir()
    os.chmod(root / "a" / "n", 0o701)
    os.rename(root / "d", root / "a" / "n" / "d")
    os.rename(root / "a", root / "c")

    async def run() -> None:
        ix.moved(b"d", b"a/n/d", True)
        ix.moved(b"a", b"c", True)
        await _settle(ix)

    asyncio.run(run())
    assert {p for p, _ in j.snapshot()[1]} == {b"c", b"c/n", b"c/n/d", b"c/n/d/g"}
    n = j.get(b"c/n")
    assert n is not None and n.mode == 0o701, n


def test_misplaced_move_source_carried_by_a_later_move_is_looked_at_there(tmp_path: Path) -> None:
    """s/f -> s/sub/new/f, where s/sub/new was never a directory (the detector resolved a parent
    through a rename it had not read yet), then s -> t. The move cannot be placed; f's entry,
    which the move s -> t carries to t/f, must not stay in the manifest (a soak found it there)."""
    root, j, ix = _indexer(tmp_path)
    (root / "s" / "sub").mkdir(parents=True)
    (root / "s" / "f").write_bytes(b"content")
    for p in (b"s", b"s/sub", b"s/f"):
        ix.changed(p, closed=True)
    asyncio.run(_settle(ix))
    (root / "x").mkdir()
    os.rename(root / "s" / "f", root / "x" / "f")
    os.rename(root / "s", root / "t")

    async def run() -> None:
        ix.moved(b"s/f", b"s/sub/new/f", False)  # wrong: f went to x/f
        ix.moved(b"s", b"t", True)
        ix.changed(b"x", closed=True)
        await _settle(ix)

    asyncio.run(run())
    assert j.get(b"t/f") is None and j.get(b"s/f") is None
    assert j.get(b"t/sub/new") is None and j.get(b"t/sub") is not None


def _known_dir_with_content(root: Path, j: SqliteJournal, ix: Indexer) -> None:
    """a/d/e/f recorded in the manifest."""
    (root / "a" / "d" / "e").mkdir(parents=True)
    (root / "a" / "d" / "e" / "f").write_bytes(b"f")
    for p in (b"a", b"a/d", b"a/d/e", b"a/d/e/f"):
        ix.changed(p, closed=True)
    asyncio.run(_settle(ix))
    assert j.get(b"a/d/e/f") is not None


def test_known_directory_found_gone_during_a_move_keeps_its_content(tmp_path: Path) -> None:
    """a/d (a known directory with content) is looked at after a -> b happened on disk, and the
    move is read while that batch is observed: the batch records a/d deleted (with everything
    the manifest holds below it), so looking at b/d again must bring back its content too
    (a soak lost b/d/e and b/d/e/f, the hint restored only b/d)."""
    root, j, ix = _indexer(tmp_path)
    _known_dir_with_content(root, j, ix)
    ix.changed(b"a/d")  # e.g. a chmod
    _batch_with_rename(ix, root, "a", "b", before_look=True)
    assert {p for p, _ in j.snapshot()[1]} == {b"b", b"b/d", b"b/d/e", b"b/d/e/f"}


def test_known_directory_found_gone_before_a_late_move_keeps_its_content(tmp_path: Path) -> None:
    """As above, with the move a -> b read only after the batch that found a/d gone was recorded."""
    root, j, ix = _indexer(tmp_path)
    _known_dir_with_content(root, j, ix)
    ix.changed(b"a/d")
    os.rename(root / "a", root / "b")

    async def run() -> None:
        await asyncio.sleep(0.005)
        await ix.process_ready()  # a/d: gone, deleted with its subtree
        ix.moved(b"a", b"b", True)  # the delayed event
        await _settle(ix)

    asyncio.run(run())
    assert {p for p, _ in j.snapshot()[1]} == {b"b", b"b/d", b"b/d/e", b"b/d/e/f"}


def test_directory_made_again_under_a_name_just_moved_away_is_recorded(tmp_path: Path) -> None:
    """x -> y, then a new x (same mode): the detector sends the move, then a rescan of x. A walk
    of x run before the move is committed compares the new x with the manifest's old x, finds
    them equal and hints nothing; the move then takes x away (a soak lost the new x)."""
    root, j, ix = _indexer(tmp_path)
    (root / "x" / "sub").mkdir(parents=True)
    for p in (b"x", b"x/sub"):
        ix.changed(p, closed=True)
    asyncio.run(_settle(ix))
    os.rename(root / "x", root / "y")
    (root / "x").mkdir()

    async def run() -> None:
        ix.moved(b"x", b"y", True)
        ix.rescan(b"x")
        await _settle(ix)

    asyncio.run(run())
    assert {p for p, _ in j.snapshot()[1]} == {b"x", b"y", b"y/sub"}


def test_directory_made_again_while_a_walk_of_its_parent_runs(tmp_path: Path) -> None:
    """As above, with a walk of the root already running when the move is read: the old name is
    walked again once the move is committed."""
    root, j, ix = _indexer(tmp_path)
    (root / "x" / "sub").mkdir(parents=True)
    for p in (b"x", b"x/sub"):
        ix.changed(p, closed=True)
    asyncio.run(_settle(ix))

    async def run() -> None:
        ix._walks[b""] = False  # a walk of the root is running (it compared x before the move)
        ix.scanning += 1
        os.rename(root / "x", root / "y")
        (root / "x").mkdir()
        ix.moved(b"x", b"y", True)
        ix._walk_done(b"")
        await _settle(ix)

    asyncio.run(run())
    assert {p for p, _ in j.snapshot()[1]} == {b"x", b"y", b"y/sub"}


def test_scanner_mode_truncated_file_held_open_with_part_of_proc_unreadable(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """No close events (scanner), read leases unavailable (the /proc fallback): a file truncated by a
    writer that still holds it open must not be recorded empty when the /proc walk after hashing
    cannot read every process (it still sees ours)."""
    monkeypatch.setattr(indexer_mod, "open_for_write", lambda fd: None)
    root = tmp_path / "root"
    root.mkdir()
    f = root / "page.html"
    j = SqliteJournal(str(tmp_path / "o.db"), content_index=False)
    ix = Indexer(str(root), j, settle=0.0, close_events=False)
    ix._held_open()  # a cached view from before the writer opened the file
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # the writer stalls after O_TRUNC
    try:
        real_listdir = os.listdir

        def listdir(path):  # type: ignore[no-untyped-def]
            if path == "/proc":
                return [*real_listdir(path), "999999999"]
            if path == "/proc/999999999/fd":
                raise PermissionError(13, "Permission denied", path)  # e.g. another user's process
            return real_listdir(path)

        monkeypatch.setattr(os, "listdir", listdir)
        ix.changed(b"page.html", closed=True)

        asyncio.run(_one_batch(ix))
        assert j.get(b"page.html") is None, "an empty version held open by its writer was recorded"
        assert b"page.html" in ix.pending, "the path must stay pending until the writer is done"
    finally:
        os.close(fd)


def _leases_work(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("close_events", [True, False], ids=["close-events", "scanner"])
def test_truncating_open_still_in_the_kernel_is_not_recorded(tmp_path: Path, close_events: bool) -> None:
    """An open(O_TRUNC) still inside the kernel shows the file empty with its old mtime and ctime
    and has no descriptor in /proc yet (seen on ext4 under write load: a scanner soak recorded
    such an empty version); the indexer must not record it. Simulated by a write descriptor in
    flight in a unix socket: open for writing, in no process's descriptor table."""
    root = tmp_path / "root"
    root.mkdir()
    f = root / "page.html"
    if not _leases_work(f):
        pytest.skip("read leases unavailable here (fs.leases-enable=0, or not the file's owner)")
    j = SqliteJournal(str(tmp_path / "o.db"), content_index=False)
    ix = Indexer(str(root), j, settle=0.0, close_events=close_events)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
        old = time.time() - 5
        os.utime(fd, (old, old))  # quiet for longer than any settle window
        socket.send_fds(a, [b"w"], [fd])
        os.close(fd)  # now held only by the message in flight
        ix.changed(b"page.html", closed=True)

        asyncio.run(_one_batch(ix))
        assert j.get(b"page.html") is None, "an empty version still open for writing was recorded"
        assert b"page.html" in ix.pending and ix.pending[b"page.html"].writing
        # The writer gets its descriptor, writes and closes: that version is recorded.
        _, fds, _, _ = socket.recv_fds(b, 1, 1)
        os.write(fds[0], b"the real content")
        os.close(fds[0])
    finally:
        a.close()
        b.close()
    ix.changed(b"page.html", closed=True)
    asyncio.run(_settle(ix))
    got = j.get(b"page.html")
    assert got is not None and got.size == len(b"the real content")
    assert all(r.entry is not None and r.entry.size > 0 for r in j.read(0, 100) if r.path == b"page.html")


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_removal_a_running_walk_compared_before_the_batch_commit_is_not_lost(tmp_path: Path, kind: str) -> None:
    """New a/f is looked at by a batch; then it is removed, its event lost in a queue overflow, and
    the walk that overflow asked for lists a/ and reads the manifest before the batch commits a/f:
    the walk sees nothing to do (neither disk nor manifest has a/f), the commit then records a/f.
    What the batch recorded must be looked at again after the commit (found by the 20k-burst
    overflow test in tests/test_e2e_detect_limits.py: a delete lost this way). A change other than a
    removal needs nothing more: the walk finds the disk differing from the manifest and hints it.
    """
    root, j, ix = _indexer(tmp_path)
    asyncio.run(_settle(ix))
    f = root / "a" / "f"
    if kind == "file":
        f.write_bytes(b"content")
    else:
        f.mkdir()
    ix.changed(b"a/f", closed=True)
    real_observe, real_diff = ix._observe, ix.diff_subtree
    walked = threading.Event()

    def diff(top: bytes):  # type: ignore[no-untyped-def]
        yield from real_diff(top)
        walked.set()

    async def run() -> None:
        loop = asyncio.get_running_loop()

        def observe(ready, known, *rest):  # type: ignore[no-untyped-def]
            out = real_observe(ready, known, *rest)  # a/f seen
            f.unlink() if kind == "file" else f.rmdir()
            # The removal's event was lost in an overflow, which asks for a walk of the root; the
            # walk lists a/ and reads the manifest before this batch commits.
            loop.call_soon_threadsafe(ix.rescan, b"")
            assert walked.wait(10)
            return out

        ix._observe = observe  # type: ignore[method-assign]
        ix.diff_subtree = diff  # type: ignore[method-assign]
        await _one_batch(ix)
        ix._observe = real_observe  # type: ignore[method-assign]
        await _settle(ix)

    asyncio.run(run())
    assert b"a/f" not in dict(j.snapshot()[1])
