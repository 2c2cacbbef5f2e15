#!/usr/bin/env python3
"""How often a stat sees a file mid-truncate (size 0, previous mtime and ctime), and whether a read
lease is refused then.

    .venv/bin/python bench/truncate_window.py --seconds 10 [--dir DIR]

One process rewrites a 256 KiB file with open(O_TRUNC) + write + close in a loop; another stats it
as fast as it can. A stat showing size 0 with the mtime and ctime of the last non-empty version is
an open(O_TRUNC) still inside the kernel: the state fleetsync's indexer must not record. For each
such sighting the prober tries `F_SETLEASE F_RDLCK` on a read-only descriptor and counts how often
the lease is refused (a writer is at work) or granted while the state is still torn (it must not be).
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time


def _writer(path: str, stop: "mp.synchronize.Event") -> None:
    data = os.urandom(256 << 10)
    while not stop.is_set():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
        time.sleep(0.002)


def _prober(path: str, stop: "mp.synchronize.Event", out: "mp.Queue") -> None:
    last = None
    c = {"stats": 0, "torn_seen": 0, "lease_refused": 0, "lease_granted_still_torn": 0, "lease_unavailable": 0}
    while not stop.is_set():
        st = os.stat(path)
        c["stats"] += 1
        if st.st_size > 0:
            last = (st.st_mtime_ns, st.st_ctime_ns)
            continue
        if last is None or (st.st_mtime_ns, st.st_ctime_ns) != last:
            continue
        c["torn_seen"] += 1
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            except BlockingIOError:
                c["lease_refused"] += 1
                continue
            except OSError:
                c["lease_unavailable"] += 1
                continue
            st2 = os.fstat(fd)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            if st2.st_size == 0 and (st2.st_mtime_ns, st2.st_ctime_ns) == last:
                c["lease_granted_still_torn"] += 1
        finally:
            os.close(fd)
    out.put(c)


def main() -> int:
    """Run the writer and the prober for --seconds and print the counts."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--dir", default=None, help="directory on the filesystem to probe (default: bench/)")
    a = ap.parse_args()
    base = tempfile.mkdtemp(prefix="truncate-window-", dir=a.dir or os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(base, "f")
    try:
        with open(path, "wb") as f:
            f.write(b"x")
        stop = mp.Event()
        out: mp.Queue = mp.Queue()
        ps = [mp.Process(target=_writer, args=(path, stop)), mp.Process(target=_prober, args=(path, stop, out))]
        for p in ps:
            p.start()
        time.sleep(a.seconds)
        stop.set()
        c = out.get()
        for p in ps:
            p.join()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(" ".join(f"{k}={v}" for k, v in c.items()))
    return 1 if c["lease_granted_still_torn"] else 0


if __name__ == "__main__":
    sys.exit(main())
