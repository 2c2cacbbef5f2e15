"""The replica apply layer never writes or deletes outside its root (invariant 3)."""

from __future__ import annotations

import os

import pytest

from fleetsync.entry import FILE, Entry, Record
from fleetsync.errors import FleetsyncError, UnsafePath
from fleetsync.hashing import hash_bytes
from fleetsync.replica.fsops import ConfinedRoot


def fe(data: bytes, mode: int = 0o644) -> Entry:
    return Entry(FILE, mode, len(data), 1_700_000_000_123_456_789, hash_bytes(data))


def test_write_file_is_atomic_with_mode_and_ns_mtime(tmp_path) -> None:
    r = ConfinedRoot(str(tmp_path / "root"))
    e = fe(b"hello", 0o640)
    r.write_file(b"a/b/c.txt", b"hello", e)
    st = os.lstat(tmp_path / "root/a/b/c.txt")
    assert (tmp_path / "root/a/b/c.txt").read_bytes() == b"hello"
    assert st.st_mode & 0o7777 == 0o640 and st.st_mtime_ns == e.mtime_ns
    assert not [n for n in os.listdir(tmp_path / "root/a/b") if n.startswith(".fleetsync.")]


def test_symlinked_parent_is_never_followed(tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "evil")
    r = ConfinedRoot(str(root))
    # Writing below a symlinked parent replaces the symlink with a real directory, or refuses;
    # either way nothing outside changes.
    try:
        r.write_file(b"evil/victim", b"pwned", fe(b"pwned"))
    except (UnsafePath, OSError):
        pass
    r.delete(b"evil/victim")
    assert (outside / "victim").read_text() == "keep"
    assert r.lstat(b"evil/victim") is None or not os.path.islink(root / "evil")


def test_delete_of_symlink_to_dir_removes_only_the_link(tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("keep")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "l")
    ConfinedRoot(str(root)).delete(b"l")
    assert not os.path.lexists(root / "l") and (outside / "f").read_text() == "keep"


@pytest.mark.parametrize("wire", [
    {"seq": 1, "op": "put", "path": "../x", "e": {"k": "d", "m": 493}},
    {"seq": 1, "op": "put", "path": "/etc/x", "e": {"k": "d", "m": 493}},
    {"seq": 1, "op": "put", "path": "a%00b", "e": {"k": "d", "m": 493}},
    {"seq": 1, "op": "mv", "path": "ok", "old": "a/%2E%2E/%2E%2E/etc"},
    {"seq": 1, "op": "put", "path": "x" * 300, "e": {"k": "d", "m": 493}},
    {"seq": 1, "op": "put", "path": "a", "e": {"k": "f", "m": 420, "s": 1, "t": 0, "h": "zz"}},
    {"seq": 1, "op": "put", "path": "a", "e": {"k": "f", "m": 99999, "s": 1, "t": 0, "h": "00" * 32}},
    {"seq": 0, "op": "del", "path": "a"},
    {"seq": 1, "op": "chmod", "path": "a"},
    {"seq": 1, "op": "put", "path": "a"},
    ["not", "an", "object"],
])
def test_hostile_records_are_rejected_with_a_clear_error(wire) -> None:
    with pytest.raises(FleetsyncError) as ei:
        Record.from_wire(wire)
    assert str(ei.value)


def test_rename_and_replace_kinds(tmp_path) -> None:
    r = ConfinedRoot(str(tmp_path))
    r.write_file(b"d/a", b"1", fe(b"1"))
    r.write_file(b"d/sub/b", b"2", fe(b"2"))
    r.rename(b"d", b"e")
    assert (tmp_path / "e/sub/b").read_bytes() == b"2" and not (tmp_path / "d").exists()
    # A file replaces a non-empty directory when the upstream says so.
    r.write_file(b"e", b"file now", fe(b"file now"))
    assert (tmp_path / "e").read_bytes() == b"file now"


def test_sweep_temps_removes_only_fleetsync_temps(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".fleetsync.1.2.tmp").write_bytes(b"partial")
    (tmp_path / "d" / "keep.html").write_bytes(b"x")
    (tmp_path / "d" / b"\xff.html".decode("utf-8", "surrogateescape")).write_bytes(b"y")
    assert ConfinedRoot(str(tmp_path)).sweep_temps(b"d") == 1
    assert sorted(os.listdir(tmp_path / "d")) == sorted(["keep.html", b"\xff.html".decode("utf-8", "surrogateescape")])
