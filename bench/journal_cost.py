#!/usr/bin/env python3
"""Journal cost per change round versus manifest size, without a real tree (issue 3 benchmark aid).

The origin's per-round cost that grows with the tree is almost all SQLite (see
bench/results-detect.md). This script isolates it: it builds a synthetic manifest of N files
(directories of ~500 entries, BLAKE3-sized hashes, realistic inode numbers) and then replays what
the indexer does for a 1,000-change round (60 % new, 25 % modified, 10 % deleted, 5 % renamed) in
commits of `--per-commit` changes: a point lookup on the indexer's reader connection, the shadow
lookup, the inode lookup for new files, and the commit. It reports /proc/self/io and CPU per round;
run it under `strace -c -f` for a syscall count:

    .venv/bin/python bench/journal_cost.py build "$WORK"/j100k.db 100000
    strace -f -c -o "$WORK"/s100k .venv/bin/python bench/journal_cost.py rounds "$WORK"/j100k.db --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))

from fleetsync.entry import DELETE, FILE, MOVE, PUT, Entry  # noqa: E402
from fleetsync.journal.sqlite import Change, LocalStat, SqliteJournal  # noqa: E402


def _path(d: int, f: int) -> bytes:
    return b"d%02d/d%02d/x%05d/f%06d-asset.js" % (d % 31, (d // 31) % 31, d, f)


def build(db: str, n: int) -> None:
    """Write a manifest of n files (plus their directories) into db."""
    if os.path.exists(db):
        os.remove(db)
    j = SqliteJournal(db, durable=False)
    rng = random.Random(1)
    batch: list[Change] = []
    ino = 1000
    for i in range(n):
        d, f = divmod(i, 500)
        ino += 1
        e = Entry(FILE, 0o644, rng.randint(100, 100000), time.time_ns(), rng.randbytes(32))
        batch.append(Change(PUT, _path(d, f), e, local=LocalStat(ino, time.time_ns())))
        if len(batch) >= 5000:
            j.commit(batch)
            batch = []
    j.commit(batch)
    j.set_meta("bench_n", str(n))
    j.close()


def rounds(db: str, n_rounds: int, per_commit: int, changes: int, pragmas: list[str],
           same_conn: bool = False) -> dict[str, float]:
    """Replay change rounds like the indexer does; returns averages per round."""
    j = SqliteJournal(db, durable=True)
    for pragma in pragmas:
        j.db.execute(f"PRAGMA {pragma}")
    n = int(j.meta("bench_n") or 0)
    rng = random.Random(2)
    next_f = n + 10
    ino = 10_000_000
    io0, cpu0 = _io(), _cpu()
    t0 = time.monotonic()
    for _ in range(n_rounds):
        todo: list[tuple[str, int]] = []
        for _k in range(changes):
            r = rng.random()
            kind = "new" if r < 0.6 else "mod" if r < 0.85 else "del" if r < 0.95 else "mv"
            todo.append((kind, rng.randrange(n)))
        for i in range(0, len(todo), per_commit):
            items: list[tuple[str, bytes, int]] = []
            for kind, idx in todo[i:i + per_commit]:
                if kind == "new":
                    p = _path(rng.randrange(max(1, n // 500)), next_f)
                    next_f += 1
                else:
                    p = _path(*divmod(idx, 500))
                items.append((kind, p, idx))
            paths = sorted(p for _, p, _ in items)
            if same_conn:  # what the indexer does: one batched lookup on the journal's connection
                known = j.get_many_with_local(paths)
            else:  # what it did before: a reader connection per batch
                reader = SqliteJournal(db, durable=False)
                known = {p: r for p in paths if (r := reader.get_with_local(p)) is not None}
                reader.close()
            batch: list[Change] = []
            for kind, p, idx in items:
                j.get(p)
                if kind == "new":
                    ino += 1
                    j.paths_with_ino(ino)
                    e = Entry(FILE, 0o644, rng.randint(100, 100000), time.time_ns(), rng.randbytes(32))
                    batch.append(Change(PUT, p, e, local=LocalStat(ino, time.time_ns())))
                    continue
                row = known.get(p)
                if row is None:
                    continue
                if kind == "mod":
                    e = Entry(FILE, 0o644, rng.randint(100, 100000), time.time_ns(), rng.randbytes(32))
                    batch.append(Change(PUT, p, e, local=LocalStat(row[1].ino if row[1] else 1, time.time_ns())))
                elif kind == "del":
                    batch.append(Change(DELETE, p))
                else:
                    batch.append(Change(MOVE, p + b".moved", None, p))
            j.commit(batch)
    wall = time.monotonic() - t0
    io1, cpu1 = _io(), _cpu()
    out = {k: (io1[k] - io0[k]) / n_rounds for k in io0}
    out["cpu_s"] = (cpu1 - cpu0) / n_rounds
    out["wall_s"] = wall / n_rounds
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["n"] = n
    return out


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("db")
    b.add_argument("n", type=int)
    r = sub.add_parser("rounds")
    r.add_argument("db")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--per-commit", type=int, default=35)
    r.add_argument("--changes", type=int, default=1000)
    r.add_argument("--same-conn", action="store_true", help="batched lookups on the journal's connection (current indexer)")
    r.add_argument("--pragma", action="append", default=[], help="extra PRAGMA for both connections")
    a = p.parse_args()
    if a.cmd == "build":
        build(a.db, a.n)
    else:
        print(json.dumps(rounds(a.db, a.rounds, a.per_commit, a.changes, a.pragma, a.same_conn)))


if __name__ == "__main__":
    main()
