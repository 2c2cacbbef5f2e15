"""Start-up reconcile / rescan: the sorted merge of the tree walk with the manifest finds exactly what changed."""

from __future__ import annotations

import os
import random
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetsync.entry import FILE, PUT, entry_from_stat
from fleetsync.hashing import hash_bytes
from fleetsync.index.indexer import Indexer
from fleetsync.journal.sqlite import Change, LocalStat, SqliteJournal

# Names chosen so that byte order of full paths differs from a naive depth-first walk:
# "a" < "a-b" < "a.c" < "a/…" < "a0" in bytes.
NAMES = [b"a", b"a-b", b"a.c", b"a0", b"a b", b"b", b"\xff\xfe", b"z"]


def _index(ix: Indexer, j: SqliteJournal) -> None:
    """Record the current tree in the manifest, as the first index would."""
    changes = []
    for p, st_ in ix.walk(b""):
        if os.path.isfile(os.path.join(ix.root, p)) and not os.path.islink(os.path.join(ix.root, p)):
            with open(os.path.join(ix.root, p), "rb") as f:
                e = entry_from_stat(st_, hash_=hash_bytes(f.read()))
        else:
            e = entry_from_stat(st_)
        changes.append(Change(PUT, p, e, local=LocalStat(st_.st_ino, st_.st_ctime_ns)))
    j.commit(changes)


def _build(root: bytes, rng: random.Random, depth: int = 0) -> None:
    for name in rng.sample(NAMES, rng.randint(1, 5)):
        p = os.path.join(root, name)
        if depth < 3 and rng.random() < 0.45:
            os.mkdir(p)
            _build(p, rng, depth + 1)
        else:
            with open(p, "wb") as f:
                f.write(name * rng.randint(0, 3))


def _all(root: bytes) -> list[bytes]:
    out = []
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            out.append(os.path.relpath(os.path.join(dp, n), root))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), n_changes=st.integers(0, 6))
def test_diff_subtree_reports_exactly_the_changed_paths(tmp_path_factory, seed: int, n_changes: int) -> None:
    base = tmp_path_factory.mktemp("rec")
    root = os.fsencode(base / "root")
    os.mkdir(root)
    rng = random.Random(seed)
    _build(root, rng)
    j = SqliteJournal(str(base / "j.db"))
    ix = Indexer(os.fsdecode(root), j, allow_empty=True)
    walked = [p for p, _ in ix.walk(b"")]
    assert walked == sorted(walked), "the walk must come in the manifest's byte order"
    _index(ix, j)
    assert list(ix.diff_subtree(b"")) == []

    expected: set[bytes] = set()
    for _ in range(n_changes):
        present = _all(root)
        if not present:
            break
        victim = rng.choice(present)
        full = os.path.join(root, victim)
        action = rng.choice(["edit", "delete", "new", "replace-dir"])
        if action == "edit" and os.path.isfile(full):
            with open(full, "ab") as f:
                f.write(b"more")
            expected.add(victim)
        elif action == "delete":
            gone = [victim] + [os.path.join(victim, q) for q in _all(full)] if os.path.isdir(full) else [victim]
            if os.path.isdir(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
            # Everything removed that the manifest knew is reported (new paths added earlier and
            # removed again are not: the manifest never had them).
            expected.update(p for p in gone if j.get(p) is not None)
            expected.difference_update(p for p in gone if j.get(p) is None)
        elif action == "new":
            d = victim if os.path.isdir(full) else os.path.dirname(victim)
            p = os.path.join(d, b"new-" + bytes([rng.randrange(97, 123)])) if d else b"new-top"
            if not os.path.exists(os.path.join(root, p)):
                with open(os.path.join(root, p), "wb") as f:
                    f.write(b"n")
                expected.add(p)
        elif action == "replace-dir" and os.path.isfile(full):
            os.remove(full)
            os.mkdir(full)
            expected.add(victim)
    got = list(ix.diff_subtree(b""))
    assert len(got) == len(set(got)), "each path is reported once"
    assert set(got) == expected
    j.close()


def test_diff_subtree_of_a_subdirectory_stays_inside_it(tmp_path) -> None:
    root = tmp_path / "root"
    for d in ("a", "a-b", "a/x"):
        (root / d).mkdir(parents=True)
    for f in ("a/1", "a/x/2", "a-b/3", "a0"):
        (root / f).write_bytes(b"1")
    j = SqliteJournal(str(tmp_path / "j.db"))
    ix = Indexer(str(root), j, allow_empty=True)
    _index(ix, j)
    for f in ("a/1", "a/x/2", "a-b/3", "a0"):
        (root / f).write_bytes(b"22")
    (root / "a" / "new").write_bytes(b"n")
    assert list(ix.diff_subtree(b"a")) == [b"a/1", b"a/new", b"a/x/2"]
    assert list(ix.diff_subtree(b"a-b")) == [b"a-b/3"]
    assert FILE == j.get(b"a0").kind
