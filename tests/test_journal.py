"""The SQLite journal and manifest: sequencing, moves of subtrees, snapshots, compaction."""

from __future__ import annotations

import os

from fleetsync.entry import DELETE, DIR, FILE, LINK, MOVE, PUT, Entry, Record
from fleetsync.journal.sqlite import CACHE_KIB, Change, SnapshotStage, SqliteJournal


def f(h: int, size: int = 3) -> Entry:
    return Entry(FILE, 0o644, size, 123, bytes([h]) * 32)


D = Entry(DIR, 0o755)


def test_commit_assigns_sequential_seqs_and_updates_manifest(tmp_path) -> None:
    j = SqliteJournal(str(tmp_path / "j.db"))
    recs = j.commit([Change(PUT, b"d", D), Change(PUT, b"d/a", f(1)), Change(PUT, b"d/b\xff", f(2))])
    assert [r.seq for r in recs] == [1, 2, 3]
    assert j.head() == 3
    assert j.get(b"d/b\xff") == f(2)
    assert [r.path for r in j.read(1, 10)] == [b"d/a", b"d/b\xff"]
    assert j.paths_with_hash(f(1).hash) == [b"d/a"]


def test_paths_with_hashes_answers_many_digests_at_once(tmp_path) -> None:
    """At most `limit` paths per digest, unknown digests left out, more digests than one statement takes."""
    j = SqliteJournal(str(tmp_path / "j.db"))
    j.commit([Change(PUT, b"d", D)] + [Change(PUT, b"d/s%d" % i, f(7)) for i in range(6)]
             + [Change(PUT, b"d/u%d" % i, Entry(FILE, 0o644, 3, 1, i.to_bytes(32, "big"))) for i in range(600)])
    want = [f(7).hash, f(8).hash] + [i.to_bytes(32, "big") for i in range(600)]
    got = j.paths_with_hashes(want, limit=4)
    assert len(got[f(7).hash]) == 4 and set(got[f(7).hash]) <= {b"d/s%d" % i for i in range(6)}
    assert f(8).hash not in got
    assert all(got[i.to_bytes(32, "big")] == [b"d/u%d" % i] for i in range(600))
    assert j.paths_with_hashes([]) == {}
    origin = SqliteJournal(str(tmp_path / "o.db"), content_index=False)
    origin.commit([Change(PUT, b"a", f(7))])
    assert origin.paths_with_hashes([f(7).hash]) == {}  # no hash index: never a full scan


def test_move_rebases_whole_subtree_and_replaces_target(tmp_path) -> None:
    j = SqliteJournal(str(tmp_path / "j.db"))
    j.commit([Change(PUT, b"d", D), Change(PUT, b"d/x", D), Change(PUT, b"d/x/a", f(1)),
              Change(PUT, b"d-c", f(9)), Change(PUT, b"e", D), Change(PUT, b"e/old", f(3))])
    j.commit([Change(MOVE, b"e", D, b"d")])
    assert j.get(b"d") is None and j.get(b"d/x/a") is None
    assert j.get(b"e/x/a") == f(1)
    assert j.get(b"e/old") is None, "rename over a directory replaces it"
    assert j.get(b"d-c") == f(9), "siblings sharing a prefix are untouched"


def test_delete_is_recursive_and_put_file_over_dir_drops_children(tmp_path) -> None:
    j = SqliteJournal(str(tmp_path / "j.db"))
    j.commit([Change(PUT, b"d", D), Change(PUT, b"d/a", f(1)), Change(PUT, b"q", D), Change(PUT, b"q/z", f(2))])
    j.commit([Change(DELETE, b"d"), Change(PUT, b"q", f(5))])
    assert j.count() == 1 and j.get(b"q") == f(5)


def test_snapshot_is_consistent_and_stage_installs(tmp_path) -> None:
    j = SqliteJournal(str(tmp_path / "j.db"))
    j.commit([Change(PUT, b"a", f(1)), Change(PUT, b"b", f(2))])
    seq, it = j.snapshot()
    j.commit([Change(PUT, b"c", f(3))])  # after the snapshot began: not in it
    rows = list(it)
    assert seq == 2 and [p for p, _ in rows] == [b"a", b"b"]

    r = SqliteJournal(str(tmp_path / "r.db"), durable=False)
    stage = SnapshotStage(r)
    stage.add(rows)
    stage.install(seq, j.journal_id)
    assert r.head() == 2 and r.min_seq() == 3 and r.journal_id == j.journal_id
    assert r.get(b"b") == f(2)
    # A replica stores records with the upstream's seqs, and can serve them on.
    r.apply_records([Record(3, PUT, b"c", f(3))])
    assert r.head() == 3 and [x.seq for x in r.read(2, 10)] == [3]


def test_compaction_and_reopen(tmp_path) -> None:
    path = str(tmp_path / "j.db")
    j = SqliteJournal(path)
    for i in range(10):
        j.commit([Change(PUT, f"p{i}".encode(), f(i))])
    assert j.compact(keep=4) == 6
    assert j.min_seq() == 7 and [r.seq for r in j.read(0, 100)] == [7, 8, 9, 10]
    jid = j.journal_id
    j.close()
    j2 = SqliteJournal(path)
    assert (j2.head(), j2.min_seq(), j2.journal_id) == (10, 7, jid)
    assert os.path.exists(path)


def _true_count(j: SqliteJournal) -> int:
    return j.db.execute("SELECT count(*) FROM manifest").fetchone()[0]


def test_entry_count_is_kept_exact_through_every_kind_of_write(tmp_path) -> None:
    """count() is O(1) (kept in meta) and always equals a real count, also after reopen and rollback."""
    db = str(tmp_path / "j.db")
    j = SqliteJournal(db)
    j.commit([Change(PUT, b"a", Entry(DIR, 0o755)), Change(PUT, b"a/x", f(1)), Change(PUT, b"a/y", f(2)),
              Change(PUT, b"b", f(3))])
    assert j.count() == _true_count(j) == 4
    j.commit([Change(PUT, b"a/x", f(4))])                      # modify: no new entry
    j.commit([Change(MOVE, b"c", None, b"a")])                  # subtree move: same count
    assert j.count() == _true_count(j) == 4
    j.commit([Change(PUT, b"d", Entry(DIR, 0o755)), Change(PUT, b"d/z", f(5))])
    j.commit([Change(MOVE, b"d", None, b"c")])                  # move over an existing subtree
    assert j.count() == _true_count(j) == 4
    j.commit([Change(PUT, b"d", f(6))])                        # file over a dir drops its children
    assert j.count() == _true_count(j) == 2
    try:
        j.commit([Change(PUT, b"e", f(7)), Change("bogus", b"f")])
    except Exception:  # noqa: BLE001 - any failure must roll the count back too
        pass
    assert j.count() == _true_count(j)
    j.commit([Change(DELETE, b"d")])
    assert j.count() == _true_count(j)
    j.close()
    j2 = SqliteJournal(db)
    assert j2.count() == _true_count(j2)
    j2.db.execute("DELETE FROM meta WHERE key='entries'")    # a database from before the counter
    j2.close()
    j3 = SqliteJournal(db)
    assert j3.count() == _true_count(j3)


def test_get_many_with_local_matches_point_lookups(tmp_path) -> None:
    j = SqliteJournal(str(tmp_path / "j.db"))
    j.commit([Change(PUT, b"f%04d" % i, f(i % 250)) for i in range(1200)])
    want = [b"f%04d" % i for i in range(0, 1300, 7)]
    got = j.get_many_with_local(want)
    assert set(got) == {p for p in want if j.get(p) is not None}
    for p, (e, _local) in got.items():
        assert e == j.get(p)


def test_install_replaces_the_manifest_keeps_the_index_and_spares_open_readers(tmp_path) -> None:
    """A resync's install swaps the staged table in: hash index rebuilt, count exact, reopenable;
    a relay's snapshot stream opened before it still reads the old manifest to the end."""
    r = SqliteJournal(str(tmp_path / "r.db"), durable=False)
    stage = SnapshotStage(r, 10)
    stage.add([(b"a", f(1)), (b"d", Entry(DIR, 0o755)), (b"d/x", f(2))])
    stage.install(10, "j1")
    old_seq, reader = r.snapshot_rows(chunk=1)
    first = next(reader)
    stage = SnapshotStage(r, 20)
    stage.add([(b"a", f(3)), (b"b", f(3)), (b"z", Entry(LINK, 0o777, target=b"a"))])
    stage.install(20, "j1")
    assert old_seq == 10 and [row[0] for chunk in [first, *reader] for row in chunk] == [b"a", b"d", b"d/x"]
    assert r.count() == 3 and r.head() == 20 and r.min_seq() == 21
    assert r.get(b"d/x") is None and r.get(b"b") == f(3) and r.get(b"z") == Entry(LINK, 0o777, target=b"a")
    assert sorted(r.paths_with_hash(f(3).hash)) == [b"a", b"b"] and r.paths_with_hash(f(2).hash) == []
    assert r.db.execute("SELECT name FROM sqlite_master WHERE type='index' AND name='manifest_hash'").fetchone()
    assert r.db.execute("PRAGMA cache_size").fetchone()[0] == -CACHE_KIB  # the install's smaller cache is undone
    r.apply_records([Record(21, PUT, b"c", f(4))])
    r.close()
    r2 = SqliteJournal(str(tmp_path / "r.db"), durable=False)
    assert r2.count() == 4 and r2.head() == 21 and r2.paths_with_hash(f(4).hash) == [b"c"]
    assert [p for p, _ in r2.snapshot()[1]] == [b"a", b"b", b"c", b"z"]
