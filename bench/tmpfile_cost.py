#!/usr/bin/env python3
"""What creating many small files atomically costs on this filesystem, by method.

    .venv/bin/python bench/tmpfile_cost.py --files 20000 --procs 3 --trials 3 [--threads N] [--dir DIR]

Each of --procs processes (like three replicas on one host) creates --files new files of --size
bytes, 100 per directory (split over --threads threads, default 1), then calls syncfs. Methods, run in alternating order every trial:

- ``tmpfile``: open(O_TMPFILE) in the destination directory, write, fchmod, utime, linkat into place
  (the replica's default: a crash leaves nothing behind).
- ``named``: open a named ``.fleetsync.*.tmp`` with O_CREAT|O_EXCL, write, fchmod, utime, rename into
  place (a crash leaves a temp file that the replica sweeps).
- ``direct``: open the final name with O_CREAT, write, fchmod, utime (not atomic: the floor).

Prints the wall time to all files created and to all flushed, per method, median over the trials.

Each trial deletes its files. On ext4 without a journal (the machine of BENCHMARKS.md) creating a
file next to inodes freed in the last minutes scans past each of them (`recently_deleted()`), so
later trials pay for earlier ones: give --rest SECONDS (e.g. 400) to let the filesystem settle, or
--keep-files (nothing is deleted until the end; the disk needs room for every trial's files).
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _worker(method: str, root: str, files: int, size: int, threads: int, start: "mp.synchronize.Event",
            out: "mp.Queue") -> None:
    data = os.urandom(size)
    per_dir = 100
    dfds = []
    for d in range((files + per_dir - 1) // per_dir):
        p = os.path.join(root, f"d{d:05d}")
        os.mkdir(p)
        dfds.append(os.open(p, os.O_RDONLY | os.O_DIRECTORY))
    excl = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    mtime = 1_600_000_000_000_000_000

    def fill(fd: int) -> None:
        os.write(fd, data)
        os.fchmod(fd, 0o644)
        os.utime(fd, ns=(mtime, mtime))

    def create(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            dfd = dfds[i // per_dir]
            name = f"f{i:06d}.html"
            if method == "tmpfile":
                fd = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                fill(fd)
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
                os.close(fd)
            elif method == "named":
                tmp = f".fleetsync.{os.getpid()}.{i}.tmp"
                fd = os.open(tmp, excl, 0o600, dir_fd=dfd)
                fill(fd)
                os.close(fd)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            else:
                fd = os.open(name, excl, 0o600, dir_fd=dfd)
                fill(fd)
                os.close(fd)

    start.wait()
    t0 = time.perf_counter()
    if threads <= 1:
        create(0, files)
    else:
        # Interleaved by directory, as a pipeline's writers would be.
        step = -(-files // threads)
        ts = [threading.Thread(target=create, args=(k * step, min(files, (k + 1) * step))) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    t1 = time.perf_counter()
    _syncfs(dfds[0])
    t2 = time.perf_counter()
    for fd in dfds:
        os.close(fd)
    out.put((t0, t1, t2))


def trial(method: str, base: str, files: int, size: int, procs: int, threads: int = 1,
          keep: bool = False) -> tuple[float, float]:
    """One trial: (seconds until every process created its files, seconds until flushed)."""
    roots = [tempfile.mkdtemp(prefix=f"{method}-", dir=base) for _ in range(procs)]
    start = mp.Event()
    out: mp.Queue = mp.Queue()
    ps = [mp.Process(target=_worker, args=(method, r, files, size, threads, start, out)) for r in roots]
    for p in ps:
        p.start()
    time.sleep(0.5)
    os.sync()
    start.set()
    res = [out.get() for _ in ps]
    for p in ps:
        p.join()
    t0 = min(r[0] for r in res)
    created = max(r[1] for r in res) - t0
    flushed = max(r[2] for r in res) - t0
    if not keep:
        for r in roots:
            shutil.rmtree(r)
    os.sync()
    return created, flushed


def main() -> int:
    """Run the trials and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--procs", type=int, default=3)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="threads per process creating the files")
    ap.add_argument("--rest", type=float, default=0.0, help="seconds to wait after each trial's deletion")
    ap.add_argument("--keep-files", action="store_true",
                    help="delete nothing between trials (each writes new directories; no --rest needed)")
    ap.add_argument("--methods", default="tmpfile,named,direct")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir under bench/)")
    a = ap.parse_args()
    base = a.dir or tempfile.mkdtemp(prefix="tmpfile-cost-", dir=os.path.dirname(os.path.abspath(__file__)))
    methods = a.methods.split(",")
    got: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    try:
        for t in range(a.trials):
            order = methods if t % 2 == 0 else methods[::-1]
            for m in order:
                c, f = trial(m, base, a.files, a.size, a.procs, a.threads, a.keep_files)
                time.sleep(a.rest)
                got[m].append((c, f))
                print(f"trial {t + 1} {m:8s} created {c:6.2f} s  flushed {f:6.2f} s", flush=True)
    finally:
        if a.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\n{a.procs} processes x {a.threads} threads, {a.files} files of {a.size} B each process, "
          f"median of {a.trials}:")
    print("| method | created (s) | flushed (s) | per file, created (ms) |")
    print("|---|---|---|---|")
    for m in methods:
        c = statistics.median(x[0] for x in got[m])
        f = statistics.median(x[1] for x in got[m])
        print(f"| {m} | {c:.2f} | {f:.2f} | {1000 * c / a.files:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
