"""Replacing files on a replica: RENAME_EXCHANGE, then the old versions are unlinked later."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from fleetsync import paths
from fleetsync.entry import DELETE, DIR, FILE, PUT, Entry, Record
from fleetsync.hashing import hash_bytes
from fleetsync.replica.follower import Replica
from fleetsync.replica.fsops import ConfinedRoot


def fe(data: bytes, mode: int = 0o644) -> Entry:
    return Entry(FILE, mode, len(data), 1_700_000_000_000_000_000, hash_bytes(data))


def temps(d: os.PathLike[str] | str) -> list[str]:
    return [n for n in os.listdir(d) if paths.IgnoreRules(()).ignored(os.fsencode(n))]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename"])
def test_replace_is_atomic_and_old_version_goes_at_flush(tmp_path, exchange: bool) -> None:
    r = ConfinedRoot(str(tmp_path / "root"))
    r._exchange = r._exchange and exchange
    r.write_file(b"d/f", b"old", fe(b"old"))
    old_ino = os.lstat(tmp_path / "root/d/f").st_ino
    with open(tmp_path / "root/d/f", "rb") as reader:
        r.write_file(b"d/f", b"new!", fe(b"new!", 0o600))
        # The path switched to the complete new version in one step; an open reader keeps the old one.
        assert (tmp_path / "root/d/f").read_bytes() == b"new!"
        assert os.lstat(tmp_path / "root/d/f").st_mode & 0o777 == 0o600
        assert reader.read() == b"old"
    if exchange:
        # The old version waits under a temp name (ignored by every walk) until the flush.
        assert len(temps(tmp_path / "root/d")) == 1
        assert os.lstat(tmp_path / "root/d" / temps(tmp_path / "root/d")[0]).st_ino == old_ino
    r.flush_trash()
    assert temps(tmp_path / "root/d") == []
    assert sorted(os.listdir(tmp_path / "root/d")) == ["f"]
    r.close()


def test_symlink_target_is_replaced_not_followed(tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("keep")
    r = ConfinedRoot(str(tmp_path / "root"))
    os.symlink(outside, tmp_path / "root/link")
    r.write_file(b"link", b"file now", fe(b"file now"))
    r.flush_trash()
    assert (tmp_path / "root/link").read_bytes() == b"file now"
    assert not os.path.islink(tmp_path / "root/link")
    assert outside.read_text() == "keep"
    assert temps(tmp_path / "root") == []
    r.close()


def test_directory_at_target_is_removed_not_exchanged(tmp_path) -> None:
    r = ConfinedRoot(str(tmp_path / "root"))
    r.write_file(b"x/inner", b"1", fe(b"1"))
    r.write_file(b"x", b"now a file", fe(b"now a file"))
    assert (tmp_path / "root/x").read_bytes() == b"now a file"
    assert r._trash == []
    r.close()


def test_drop_trash_in_a_thread_after_the_directory_went_away(tmp_path) -> None:
    r = ConfinedRoot(str(tmp_path / "root"))
    for d in (b"gone", b"stays"):
        r.write_file(d + b"/f", b"a", fe(b"a"))
        r.write_file(d + b"/f", b"b", fe(b"b"))
    trash = r.take_trash()
    assert len(trash) == 2 and r._trash == []
    r.delete(b"gone")  # removes its temp too
    errors: list[OSError | None] = []
    t = threading.Thread(target=lambda: errors.append(ConfinedRoot.drop_trash(trash)))
    t.start()
    t.join()
    assert errors == [None]
    assert temps(tmp_path / "root/stays") == [] and os.listdir(tmp_path / "root/stays") == ["f"]
    r.close()


def test_directory_move_flushes_first_so_nothing_is_left_under_the_new_name(tmp_path) -> None:
    r = ConfinedRoot(str(tmp_path / "root"))
    r.write_file(b"a/f", b"1", fe(b"1"))
    r.write_file(b"a/f", b"2", fe(b"2"))
    r.rename(b"a", b"b")
    assert os.listdir(tmp_path / "root/b") == ["f"]
    assert r._trash == []
    r.close()


def test_restart_sweeps_replaced_versions_a_crash_left(tmp_path) -> None:
    """A replica killed between the cursor commit and the unlinks sweeps the recorded directories."""
    root, state = tmp_path / "root", tmp_path / "state"
    state.mkdir()
    r = ConfinedRoot(str(root))
    r.write_file(b"d/e/f", b"1", fe(b"1"))
    r.write_file(b"d/e/f", b"2", fe(b"2"))
    r.write_file(b"top", b"1", fe(b"1"))
    r.write_file(b"top", b"2", fe(b"2"))
    dirs = {d for _, d, _ in r.take_trash()}  # "crash": the trash is never unlinked
    assert dirs == {b"d/e", b""} and temps(root / "d/e") and temps(root)

    async def run() -> None:
        rep = Replica(str(root), str(state), "http://127.0.0.1:9", "t")
        rep.journal.set_meta("trash", " ".join(d.hex() or "." for d in dirs))
        await rep.close()
        rep = Replica(str(root), str(state), "http://127.0.0.1:9", "t")
        try:
            await rep.apply_batch([Record(1, PUT, b"other", Entry(DIR, 0o755, 0, 0))])
            assert rep.journal.meta("trash") is None
        finally:
            await rep.close()

    asyncio.run(run())
    assert temps(root / "d/e") == [] and temps(root) == []
    assert (root / "d/e/f").read_bytes() == b"2" and (root / "top").read_bytes() == b"2"


def test_background_cleanup_and_directory_removal_do_not_race(tmp_path) -> None:
    r = ConfinedRoot(str(tmp_path / "root"))
    for i in range(200):
        r.write_file(b"d/f%d" % i, b"a", fe(b"a"))
        r.write_file(b"d/f%d" % i, b"b", fe(b"b"))
    r.write_file(b"keep/f", b"a", fe(b"a"))
    r.write_file(b"keep/f", b"b", fe(b"b"))
    assert r.defer_trash() == {b"d", b"keep"}
    assert r.start_cleanup()
    r.delete(b"d")  # waits for the cleanup instead of racing its unlinks
    assert r.wait_cleanup() is None
    assert not (tmp_path / "root/d").exists()
    assert os.listdir(tmp_path / "root/keep") == ["f"]
    r.close()


def test_deferred_delete_takes_the_path_at_once_and_the_file_at_the_flush(tmp_path) -> None:
    r = ConfinedRoot(str(tmp_path / "root"))
    r.write_file(b"d/f", b"content", fe(b"content"))
    ino = os.lstat(tmp_path / "root/d/f").st_ino
    r.delete(b"d/f", defer=True)
    assert os.listdir(tmp_path / "root/d") == temps(tmp_path / "root/d")  # f is gone from its path
    assert [os.lstat(tmp_path / "root/d" / t).st_ino for t in temps(tmp_path / "root/d")] == [ino]
    assert r.defer_trash() == {b"d"} and r.deferred == 1
    r.flush_trash()
    assert os.listdir(tmp_path / "root/d") == [] and r.deferred == 0
    r.close()


def test_old_versions_wait_across_batches_and_a_crash_leaves_none_behind(tmp_path) -> None:
    """Deleted (and replaced) versions of several committed batches wait for an idle moment; the
    cursor commit names every directory holding one, so a restart after a crash sweeps them all."""
    root, state = tmp_path / "root", tmp_path / "state"
    state.mkdir()
    for rel in ("d1/f", "d2/g", "d2/h"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())

    async def crash() -> None:
        rep = Replica(str(root), str(state), "http://127.0.0.1:9", "t")
        await rep.apply_batch([Record(1, DELETE, b"d1/f", None)])
        await rep.apply_batch([Record(2, DELETE, b"d2/g", None), Record(3, DELETE, b"d2/h", None)])
        assert not (root / "d1/f").exists() and not (root / "d2/g").exists() and not (root / "d2/h").exists()
        assert len(temps(root / "d1")) == 1 and len(temps(root / "d2")) == 2  # not unlinked yet
        assert set(rep.journal.meta("trash").split()) == {b"d1".hex(), b"d2".hex()}
        rep.journal.close()  # "crash": the replica dies with its old versions still on disk

    async def restart() -> None:
        rep = Replica(str(root), str(state), "http://127.0.0.1:9", "t")
        try:
            await rep.apply_batch([Record(4, PUT, b"other", Entry(DIR, 0o755, 0, 0))])
            assert rep.journal.meta("trash") is None
        finally:
            await rep.close()

    asyncio.run(crash())
    asyncio.run(restart())
    assert os.listdir(root / "d1") == [] and os.listdir(root / "d2") == []
